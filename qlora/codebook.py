"""The two fixed code tables of the format: NF4 and the signed 8-bit dynamic map.

Both are built from their definitions (QLoRA paper section 3; bitsandbytes' dynamic
map) and come out bit-identical to the tables bitsandbytes hard-codes.
"""
from __future__ import annotations

import functools

import torch

# Quantile range of the NF4 construction: halfway between 1 - 1/(2*15) and 1 - 1/(2*16),
# so the outermost quantiles stay finite and zero is exactly representable.
NF4_QUANTILE_OFFSET = 0.9677083

# Decision thresholds of bitsandbytes' CUDA quantiser, as IEEE float32 bit patterns.
# Eleven are the float32 midpoints of neighbouring NF4 codes; k = 0, 8, 12, 14 are one
# ulp off them. Using the exact patterns reproduces the world's NF4 checkpoints byte for byte.
NF4_THRESHOLD_BITS = (
    0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871,
    0x3D22FAFF, 0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF,
    0x3F5C89D9,
)


@functools.lru_cache(maxsize=None)
def _nf4_codebook() -> torch.Tensor:
    from scipy.stats import norm

    # float32 linspace and float32 division, as in the paper's reference code: this is
    # what makes the table bit-identical (float64 throughout is off by up to 6 ulps).
    positive = norm.ppf(torch.linspace(NF4_QUANTILE_OFFSET, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(NF4_QUANTILE_OFFSET, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return values / values.max()


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values, ascending, float32; index 7 is 0.0, the ends are -1 and +1."""
    return _nf4_codebook().clone()


@functools.lru_cache(maxsize=None)
def _nf4_thresholds() -> torch.Tensor:
    bits = torch.tensor(NF4_THRESHOLD_BITS, dtype=torch.int64).to(torch.int32)
    return bits.view(torch.float32)


def nf4_thresholds() -> torch.Tensor:
    """The 15 float32 thresholds: code = number of thresholds strictly below y."""
    return _nf4_thresholds().clone()


@functools.lru_cache(maxsize=None)
def _dynamic_map() -> torch.Tensor:
    # Signed 8-bit dynamic map: for decimal exponent e = -6..0 there are 2**(e+6) linearly
    # spaced fractions in (0.1, 1) (the midpoints of 2**(e+6)+1 boundaries), scaled by
    # 10**e, mirrored for the sign; plus 0 and 1.0. 127 + 127 + 2 = 256 values.
    values: list[float] = [0.0, 1.0]
    for level in range(7):
        boundaries = torch.linspace(0.1, 1.0, 2**level + 1, dtype=torch.float32)
        midpoints = (boundaries[:-1] + boundaries[1:]) / 2.0
        scaled = midpoints * (10.0 ** (level - 6))
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 float32 values, ascending)."""
    return _dynamic_map().clone()
