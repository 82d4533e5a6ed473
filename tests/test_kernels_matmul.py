"""nf4_linear / nf4_linear_grad_input: every Triton path (interpreter on CPU) against float64."""
import pytest
import torch

from qlora.codebook import dynamic_map, nf4_codebook
from qlora.kernels import gemv as G
from qlora.kernels import matmul as MM
from qlora.kernels.quantize import quantize_absmax_reference, quantize_nf4_blocks_reference

from helpers import IGNORE_ZERO_BLOCK_WARNINGS

pytestmark = IGNORE_ZERO_BLOCK_WARNINGS  # all-zero blocks divide by zero on purpose


def make_weight(N, K, blocksize=64, double_quant=True, seed=0):
    """(kernel args, float64 W as the reference dequantises it)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w.view(-1)[:blocksize] = 0.0  # an all-zero block
    packed, absmax = quantize_nf4_blocks_reference(w, blocksize)
    nested = (None, None, None)
    if double_quant:
        codes, nested_absmax, offset = quantize_absmax_reference(absmax)
        absmax, nested = codes, (nested_absmax, dynamic_map(), offset)
    args = (packed, absmax, nf4_codebook(), N, K, blocksize, *nested)
    w64 = MM._dequantize_matrix(*args, torch.float32).double()
    return args, w64


def rel_err(got, want):
    assert not torch.isnan(got).any(), "unwritten (poisoned) or NaN output"
    return ((got.double() - want).norm() / want.norm()).item()


def inputs(M, K, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(dtype)


DTYPES = [torch.bfloat16, torch.float16]
# N, K not multiples of the tiles (64 / 128 output, 64 reduction); K a multiple of the blocksize.
SHAPES = [(70, 192, 64), (33, 320, 64), (50, 96, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 17, 64, 130])
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
def test_forward_and_grad_input(poison, dtype, M, N, K, blocksize):
    args, w64 = make_weight(N, K, blocksize, double_quant=(N != 50))
    x = inputs(M, K, dtype)
    bias = inputs(1, N, dtype, seed=2)[0]
    y = MM.nf4_linear_triton(x, *args, bias=bias)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, x.double() @ w64.T + bias.double()) <= 1e-2
    g = inputs(M, N, dtype, seed=3)
    gi = MM.nf4_linear_grad_input_triton(g, *args)
    assert gi.dtype == dtype and gi.shape == (M, K)
    assert rel_err(gi, g.double() @ w64) <= 1e-2


@pytest.mark.parametrize("M", [1, 3, 4])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_gemv_split_k(poison, M, split_k):
    # K: 3 steps of 1024 at M = 1 (the last one partial), 9 steps of 256 at M >= 2.
    args, w64 = make_weight(37, 64 * 33, 64)
    x = inputs(M, 64 * 33, torch.bfloat16)
    bias = inputs(1, 37, torch.bfloat16)[0]
    y = G.nf4_gemv_triton(x, *args, bias=bias, split_k=split_k)
    assert rel_err(y, x.double() @ w64.T + bias.double()) <= 1e-2


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("blocksize", [32, 128, 256, 2048])
def test_gemv_blocksizes(poison, M, blocksize):
    # M = 1 sums each 16-byte run in-thread and scales it once (runs of 16 bytes: one per 32-block,
    # four per 128-block); M >= 2 scales each weight. Both to float32 accuracy.
    args, w64 = make_weight(9, blocksize * 3, blocksize)
    x = inputs(M, blocksize * 3, torch.float32)
    assert rel_err(G.nf4_gemv_triton(x, *args, split_k=2), x.double() @ w64.T) <= 1e-6


@pytest.mark.parametrize("M", [5, 17, 64, 70])
@pytest.mark.parametrize("split_k", [1, 4])
def test_fused_split_k_and_tiles(poison, M, split_k):
    args, w64 = make_weight(70, 64 * 5, 64)
    x = inputs(M, 64 * 5, torch.float16)
    y = MM.nf4_linear_fused(x, *args, split_k=split_k)
    assert rel_err(y, x.double() @ w64.T) <= 1e-2
    # The large-M tile configuration on a small problem.
    big = MM._fused_config(4096, 64)
    assert big["BLOCK_M"] == 128
    assert rel_err(MM.nf4_linear_fused(x, *args, config=big), x.double() @ w64.T) <= 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 17])
def test_blocks_straddling_rows(poison, dtype, M):
    # in_features 100 with blocksize 64: blocks cross row ends; routed to dequantise + matmul.
    args, w64 = make_weight(21, 100, 64)
    x = inputs(M, 100, dtype)
    assert rel_err(MM.nf4_linear_triton(x, *args), x.double() @ w64.T) <= 1e-2
    g = inputs(M, 21, dtype)
    assert rel_err(MM.nf4_linear_grad_input_triton(g, *args), g.double() @ w64) <= 1e-2


def test_blocksize_4096_one_block_many_rows(poison):
    args, w64 = make_weight(40, 128, 4096)  # 32 rows per block
    x = inputs(3, 128, torch.bfloat16)
    assert rel_err(MM.nf4_linear_triton(x, *args), x.double() @ w64.T) <= 1e-2
    x = inputs(20, 128, torch.bfloat16)
    assert rel_err(MM.nf4_linear_triton(x, *args), x.double() @ w64.T) <= 1e-2


def test_leading_dims_and_empty():
    args, w64 = make_weight(24, 128, 64)
    x = inputs(6, 128, torch.bfloat16).view(2, 3, 128)
    y = MM.nf4_linear_triton(x, *args)
    assert y.shape == (2, 3, 24)
    assert rel_err(y, x.double() @ w64.T) <= 1e-2
    assert MM.nf4_linear_triton(x[:0], *args).shape == (0, 3, 24)
    assert MM.nf4_linear_grad_input_triton(y[:, :0], *args).shape == (2, 0, 128)


def test_entry_points_dispatch_and_autograd(monkeypatch):
    args, w64 = make_weight(24, 128, 64)
    calls = []
    real = MM.nf4_linear_triton
    monkeypatch.setattr(MM, "nf4_linear_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("QLORA_BACKEND", raising=False)
    x = inputs(5, 128, torch.bfloat16).requires_grad_()
    bias = inputs(1, 24, torch.bfloat16)[0].requires_grad_()
    y_ref = MM.nf4_linear(x, *args, bias=bias)
    assert calls == []  # CPU: reference
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    y = MM.nf4_linear(x, *args, bias=bias)
    assert calls == [1]
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    g = inputs(5, 24, torch.bfloat16, seed=7)
    y.backward(g)
    assert rel_err(x.grad, g.double() @ w64) <= 1e-2
    torch.testing.assert_close(bias.grad, g.sum(0))
    gi = MM.nf4_linear_grad_input(g, *args)
    assert torch.equal(gi, x.grad)


@pytest.mark.parametrize("M", [2, 17])
def test_float32_inputs_stay_float32(monkeypatch, M):
    # The fused tiles feed tl.dot, which rounds float32 operands to TF32 on a GPU: float32 must take
    # the GEMV (exact products) or dequantise + cuBLAS instead, and match float64 to float32 accuracy.
    def no_tf32_tiles(*args, **kwargs):
        raise AssertionError("float32 input reached the tensor-core tiles")

    monkeypatch.setattr(MM, "nf4_linear_fused", no_tf32_tiles)
    monkeypatch.setattr(MM, "nf4_linear_grad_input_fused", no_tf32_tiles)
    args, w64 = make_weight(70, 192)
    x = inputs(M, 192, torch.float32)
    assert rel_err(MM.nf4_linear_triton(x, *args), x.double() @ w64.T) <= 1e-6
    g = inputs(M, 70, torch.float32, seed=3)
    assert rel_err(MM.nf4_linear_grad_input_triton(g, *args), g.double() @ w64) <= 1e-6


@pytest.mark.parametrize("M", [17, 130])
@pytest.mark.parametrize("split_n", [3])
def test_grad_input_split_n(poison, M, split_n):
    # The input gradient splits N (its reduction) when its output has too few tiles for a wave.
    args, w64 = make_weight(200, 64 * 3, 64)
    g = inputs(M, 200, torch.bfloat16)
    got = MM.nf4_linear_grad_input_fused(g, *args, split_n=split_n)
    assert got.shape == (M, 64 * 3) and got.dtype == torch.bfloat16
    assert rel_err(got, g.double() @ w64) <= 1e-2


def test_split_rule_fills_waves(monkeypatch):
    monkeypatch.setattr(G.backend, "sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    # 32 tiles x 64 steps on 2 x 132 slots: 8 splits of 8 steps is 256 programs, one wave. Asking for
    # "at least 264 programs" (the old rule) gave 10 splits of 7 steps: 320 programs, two waves.
    assert G.choose_split(None, 32, 64, 64, 64 * 64, cpu, 2) == (8, 8 * 64)
    assert G.choose_split(None, 300, 64, 64, 64 * 64, cpu, 2) == (1, 64 * 64)  # tiles already fill it
    # 448 tiles x 128 steps on 6 x 132 slots: one split is 448 programs (0.57 of a wave) of 128 steps;
    # 5 splits of 26 are 2240 programs, 2.8 waves of 26 + 4: 90 against 132.
    assert G.choose_split(None, 448, 128, 64, 128 * 64, cpu, 6) == (5, 26 * 64)
    for tiles, k_steps, ctas in [(32, 64, 1), (64, 64, 4), (7, 128, 6), (4, 16, 3), (600, 64, 1), (10, 448, 2)]:
        splits, per_split = G.choose_split(None, tiles, k_steps, 64, k_steps * 64, cpu, ctas)
        per, slots = per_split // 64, ctas * 132
        assert (splits - 1) * per < k_steps <= splits * per  # every step covered, no split empty
        # Never slower, in waves x (steps + overhead) per program, than the old rule's split.
        old_splits, old_per = G.plan_split_k(max(1, min(k_steps, -(-slots // tiles))), k_steps, 64, k_steps * 64)
        extra = G.PROGRAM_OVERHEAD_STEPS
        assert -(-tiles * splits // slots) * (per + extra) <= -(-tiles * old_splits // slots) * (old_per // 64 + extra)


def test_large_m_model_and_one_scratch_buffer(poison):
    from qlora.kernels import large_m
    # Worked by hand for M = N = K = 4096 (H100: 687 TFLOP/s, 3.02 TB/s, 132 SMs x 4 x 1.755 GHz):
    # MMA 2 * 4096^3 / 687e12 = 200.06 us; forward decode 4096^2 * 32 tiles of rows * 5.4 / 32 /
    # 926.64e9 = 97.77 us; dequantise (8388608 + 262144 + 33554432 B) / 3.02e12 = 13.97 us.
    fused_1cta = large_m.fused_seconds(4096, 4096, 4096, ctas_per_sm=1)
    assert fused_1cta == pytest.approx(297.83e-6, rel=1e-3)
    assert large_m.fused_seconds(4096, 4096, 4096) == pytest.approx(200.06e-6, rel=1e-3)  # decode hidden
    assert large_m.dequant_cublas_seconds(4096, 4096, 4096) == pytest.approx(214.03e-6, rel=1e-3)
    # Two CTAs per SM overlap decode with the MMA: fused at every M; lockstep tiles would lose at 4096.
    assert MM._fused_config(4096, 64)["ctas_per_sm"] == large_m.FUSED_CTAS_PER_SM == 2
    for M in (128, 4096):
        assert large_m.prefer_fused(M, 4096, 4096) and large_m.prefer_fused(M, 11008, 4096, "grad_input")
    assert fused_1cta > large_m.dequant_cublas_seconds(4096, 4096, 4096)
    # Two layers' weights dequantise into the same buffer (one per device), with the right results.
    first, w1 = make_weight(40, 128, 64, seed=1)
    second, w2 = make_weight(24, 192, 64, seed=2)
    x1, x2 = inputs(5, 128, torch.bfloat16), inputs(5, 192, torch.bfloat16)
    y1 = MM.nf4_linear_dequant_matmul(x1, *first)
    buffer = large_m._scratch[torch.device("cpu")]
    y2 = MM.nf4_linear_dequant_matmul(x2, *second)
    assert large_m._scratch[torch.device("cpu")].data_ptr() == buffer.data_ptr()
    assert rel_err(y1, x1.double() @ w1.T) <= 1e-2 and rel_err(y2, x2.double() @ w2.T) <= 1e-2
