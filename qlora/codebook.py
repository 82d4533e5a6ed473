"""The fixed code tables of the format: NF4, FP4 and the signed 8-bit dynamic map.

Each is built from its definition (QLoRA paper section 3; bitsandbytes' FP4 and dynamic
maps) and comes out bit-identical to the table bitsandbytes hard-codes. docs/FP4.md gives
the FP4 facts.
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


# FP4 (bitsandbytes' other 4-bit type): 1 sign bit, then 3 magnitude bits that bitsandbytes reads as
# 2 exponent + 1 mantissa bits. The magnitudes of codes 0b000..0b111, before normalising by the
# largest (12): subnormal 0 and 0.0625, then 8, 12 (exponent field 01), 4, 6 (10), 2, 3 (11).
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# The magnitude code of each rank, smallest magnitude first: rank k is chosen when |y| exceeds
# exactly k of the thresholds below.
FP4_CODE_OF_RANK = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
# bitsandbytes' CUDA quantiser (dQuantizeFP4) compares |y| with these float32 literals, written as
# decimals in its source (0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f,
# 0.8333333f). They are the midpoints of neighbouring magnitudes only approximately: five are
# 1 to 14 ulps off the float32 midpoints, so these exact patterns are what reproduce its bytes.
FP4_THRESHOLD_BITS = (0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555)
FP4_SIGN_BIT = 0b1000


@functools.lru_cache(maxsize=None)
def _fp4_codebook() -> torch.Tensor:
    magnitudes = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32) / 12.0
    # The sign bit's half holds +0.0 at code 0b1000, as bitsandbytes' table does (its CUDA kernel
    # decodes that code to -0.0; the two are equal as numbers).
    table = torch.cat([magnitudes, -magnitudes])
    table[FP4_SIGN_BIT] = 0.0
    return table


def fp4_codebook() -> torch.Tensor:
    """The 16 FP4 values in code order (not sorted), float32: code c has sign c >> 3 and magnitude
    FP4_MAGNITUDES[c & 7] / 12, so the ends are -1 (0b1011) and +1 (0b0011)."""
    return _fp4_codebook().clone()


@functools.lru_cache(maxsize=None)
def _fp4_thresholds() -> torch.Tensor:
    return torch.tensor(FP4_THRESHOLD_BITS, dtype=torch.int64).to(torch.int32).view(torch.float32)


def fp4_thresholds() -> torch.Tensor:
    """The 7 float32 magnitude thresholds: rank = number of thresholds strictly below |y|."""
    return _fp4_thresholds().clone()


QUANT_TYPES = ("nf4", "fp4")


def quant_table(quant_type: str) -> torch.Tensor:
    """The 16-value table of a 4-bit type: nf4_codebook() or fp4_codebook()."""
    if quant_type == "nf4":
        return nf4_codebook()
    if quant_type == "fp4":
        return fp4_codebook()
    raise ValueError(f"quant_type must be one of {', '.join(map(repr, QUANT_TYPES))}, got {quant_type!r}")
