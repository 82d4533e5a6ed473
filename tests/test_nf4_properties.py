"""Property tests of the NF4 round trip (hypothesis): any shape, blocksize, dtype and magnitude.

For every block b with true absmax A_b, every element of the float32 reconstruction is within
    (largest gap between neighbouring NF4 codes / 2) * A_b  +  |A_b - stored A_b|,
and the stored absmax itself is within (largest gap of the dynamic map / 2) * nested scale of
A_b under double quantisation (exact without it). The output in the weight's dtype is that
float32 reconstruction rounded, and nothing is ever NaN.

"tiny" stays in the normal range: a block whose absmax is below about 2.9e-39 (float32/bf16
subnormals) has 1/absmax = inf, as in bitsandbytes' CUDA kernel whose bytes we reproduce, and
its error can reach the whole absmax (never NaN, and far below any real weight's scale).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora.codebook import dynamic_map, nf4_codebook
from qlora.nf4 import quantize_nf4

BLOCKSIZES = [32 << i for i in range(8)]  # 32 .. 4096
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF_NF4_GAP = float(nf4_codebook().diff().max()) / 2
HALF_DYNAMIC_GAP = float(dynamic_map().diff().max()) / 2
# Typical scales of each magnitude class, kept inside each dtype's normal range, with headroom:
# float16 stops at 65504, and a value near it can round up to inf once its scale is double-quantised.
SCALES = {
    torch.float32: {"tiny": 1e-30, "normal": 0.02, "huge": 1e30},
    torch.bfloat16: {"tiny": 1e-30, "normal": 0.02, "huge": 1e30},
    torch.float16: {"tiny": 1e-5, "normal": 0.02, "huge": 1e4},
}
# Spread of per-block scales (powers of ten) for "mixed" tensors: blocks of very different size
# are what stresses the double quantisation of the absmax.
MIXED_DECADES = {torch.float32: 25, torch.bfloat16: 25, torch.float16: 4}

odd = st.integers(0, 45).map(lambda k: 2 * k + 1)
size = st.one_of(odd, st.integers(1, 96))


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    ndim = draw(st.integers(1, 3))
    if ndim == 1:
        shape = (draw(st.one_of(st.integers(1, 9001), odd)),)
    else:
        shape = tuple(draw(size) for _ in range(ndim))
    magnitude = draw(st.sampled_from(["tiny", "normal", "huge", "mixed"]))
    seed = draw(st.integers(0, 2**31 - 1))
    zero_fraction = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    constant_fraction = draw(st.sampled_from([0.0, 0.1, 0.5]))
    double_quant = draw(st.booleans())
    return dtype, blocksize, shape, magnitude, seed, zero_fraction, constant_fraction, double_quant


def make_weight(dtype, blocksize, shape, magnitude, seed, zero_fraction, constant_fraction) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    n_blocks = -(-numel // blocksize)
    x = torch.randn(n_blocks * blocksize, generator=g, dtype=torch.float64).view(n_blocks, blocksize)
    if magnitude == "mixed":
        decades = MIXED_DECADES[dtype]
        x *= 10.0 ** ((torch.rand(n_blocks, 1, generator=g, dtype=torch.float64) * 2 - 1) * decades)
        x *= SCALES[dtype]["normal"]
    else:
        x *= SCALES[dtype][magnitude]
    kind = torch.rand(n_blocks, generator=g)
    zero = kind < zero_fraction
    constant = ~zero & (kind < zero_fraction + constant_fraction)
    x[zero] = 0.0
    x[constant] = x[constant, :1]  # every element equal to the block's first
    return x.view(-1)[:numel].view(shape).to(dtype)


def check_round_trip(w: torch.Tensor, blocksize: int, double_quant: bool) -> None:
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    restored_f32 = q.dequantize(torch.float32).reshape(-1)
    restored = q.dequantize()
    assert restored.dtype == w.dtype and restored.shape == w.shape
    assert not torch.isnan(restored_f32).any() and not torch.isnan(restored).any()
    assert torch.isfinite(restored).all()
    # the output in the weight's dtype is the float32 reconstruction, rounded once
    assert torch.equal(restored.reshape(-1), restored_f32.to(w.dtype))

    x = w.reshape(-1).to(torch.float32)
    numel, n_blocks = x.numel(), q.n_blocks
    padded = torch.nn.functional.pad(x, (0, n_blocks * blocksize - numel)).view(n_blocks, blocksize)
    true_absmax = padded.abs().amax(dim=1)
    if double_quant:
        nested_scale = q.nested_absmax.repeat_interleave(q.nested_blocksize)[:n_blocks]
        stored_absmax = q.nested_code[q.absmax.long()] * nested_scale + q.offset
        rounding = 1e-6 * (nested_scale + q.offset.abs())
        absmax_error = (stored_absmax - true_absmax).abs()
        assert (absmax_error <= HALF_DYNAMIC_GAP * nested_scale + rounding).all()
    else:
        stored_absmax = q.absmax
        assert torch.equal(stored_absmax, true_absmax)  # float32 scales are exact
        absmax_error = torch.zeros_like(true_absmax)
        # an all-zero block comes back as exact zeros
        zero_blocks = (true_absmax == 0).repeat_interleave(blocksize)[:numel]
        assert (restored_f32[zero_blocks] == 0).all()

    per_block = HALF_NF4_GAP * true_absmax + absmax_error + 1e-6 * torch.maximum(true_absmax, stored_absmax.abs())
    bound = per_block.repeat_interleave(blocksize)[:numel]
    error = (restored_f32 - x).abs()
    worst = int(torch.argmax(error - bound))
    assert (error <= bound).all(), (
        f"element {worst} (block {worst // blocksize}): |{float(restored_f32[worst])} - {float(x[worst])}| "
        f"= {float(error[worst])} > bound {float(bound[worst])}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_round_trip_within_each_blocks_nf4_bound(case):
    dtype, blocksize, shape, magnitude, seed, zero_fraction, constant_fraction, double_quant = case
    w = make_weight(dtype, blocksize, shape, magnitude, seed, zero_fraction, constant_fraction)
    check_round_trip(w, blocksize, double_quant)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7,), (65, 3), (2, 3, 129)])
def test_all_zero_tensors_come_back_as_zeros(dtype, double_quant, shape):
    q = quantize_nf4(torch.zeros(shape, dtype=dtype), blocksize=32, double_quant=double_quant)
    assert torch.equal(q.dequantize(), torch.zeros(shape, dtype=dtype))
    assert (q.packed == 0).all()  # code 0 in every nibble, as bitsandbytes' CUDA kernel writes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_constant_blocks_are_exact_without_double_quant(dtype, blocksize):
    # y = x / absmax is exactly +-1, which NF4 holds: the round trip is lossless.
    values = torch.tensor([0.5, -3.0, 1e-3, 7.0], dtype=torch.float64)
    w = values.repeat_interleave(blocksize)[: 3 * blocksize + 5].to(dtype)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(q.dequantize(), w)
