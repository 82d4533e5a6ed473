"""bitsandbytes' 4-bit functional properties, checked on qlora (NF4 and FP4).

Each test names in its docstring the bitsandbytes test (bitsandbytes-foundation/bitsandbytes,
tests/test_functional.py and tests/test_linear4bit.py) whose property it checks; the tests are
written here, and where a bound is bitsandbytes' own it says so. bitsandbytes runs on the CPU here,
so the state round trips and the orientation check use the real QuantState and matmul_4bit.
"""
import math

import pytest
import torch

from qlora.nf4 import NF4Weight, nf4_linear, quantize_4bit

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")

QUANT_TYPES = ["nf4", "fp4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]

# bitsandbytes' test_4bit_quant bounds: mean absolute and mean relative error of N(0, 1) data per
# blocksize, "averaged over 1k samples per configuration"; a test passes below bound + 1e-3.
BNB_MEAN_ERROR = {
    "fp4": dict(zip(BLOCKSIZES, [0.096545, 0.102947, 0.108685, 0.114087, 0.119312, 0.124460, 0.129573])),
    "nf4": dict(zip(BLOCKSIZES, [0.072792, 0.076835, 0.080326, 0.083535, 0.086603, 0.089592, 0.092537])),
}
BNB_MEAN_REL_ERROR = {
    "fp4": dict(zip(BLOCKSIZES, [0.260130, 0.275734, 0.289842, 0.302852, 0.314982, 0.326402, 0.337228])),
    "nf4": dict(zip(BLOCKSIZES, [0.203299, 0.215252, 0.226044, 0.236021, 0.245365, 0.254146, 0.262457])),
}


def errors(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[float, float]:
    err = (a - b).abs().float()
    return float(err.mean()), float((err / (a.abs().float() + eps)).mean())


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_error_bounds_per_blocksize_and_dtype(quant_type, blocksize):
    """bitsandbytes tests/test_functional.py::TestQuantize4BitFunctional::test_4bit_quant: N(0, 1) data
    [1024, 1024] quantised without double quantisation dequantises in the input dtype, with mean
    absolute and mean relative errors under bitsandbytes' per-blocksize bounds. (The dtype cycles
    with the blocksize, so that every dtype meets every type in CI time.)"""
    dtype = DTYPES[BLOCKSIZES.index(blocksize) % len(DTYPES)]
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(blocksize)).to(dtype)
    b = quantize_4bit(a, quant_type, blocksize, double_quant=False).dequantize()
    assert b.dtype == dtype and b.shape == a.shape
    err, relerr = errors(a, b, 1e-8)
    assert err < BNB_MEAN_ERROR[quant_type][blocksize] + 1e-3, err
    assert relerr < BNB_MEAN_REL_ERROR[quant_type][blocksize] + 1e-3, relerr


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_double_quantisation_error_bounds(quant_type, blocksize, dtype):
    """bitsandbytes tests/test_functional.py::TestQuantize4BitFunctional::test_4bit_compressed_stats:
    with and without compressed statistics (double quantisation) the mean error stays under 0.11 and
    the mean relative error under 0.28 (its bounds); and compressing the statistics costs little."""
    a = torch.randn(256, 1024, generator=torch.Generator().manual_seed(blocksize)).to(dtype)
    plain = errors(a, quantize_4bit(a, quant_type, blocksize, double_quant=False).dequantize(), 1e-15)
    compressed = errors(a, quantize_4bit(a, quant_type, blocksize, double_quant=True).dequantize(), 1e-15)
    for err, relerr in (plain, compressed):
        assert err < 0.11 and relerr < 0.28
    assert compressed[0] < plain[0] * 1.01


def bnb_state_dict(packed: torch.Tensor, state) -> dict[str, torch.Tensor]:
    return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_quant_state_round_trips_both_ways(quant_type, double_quant, blocksize):
    """bitsandbytes tests/test_functional.py::TestQuantize4BitFunctional::test_4bit_quant (its
    QuantState.as_dict -> from_dict round trip) and tests/test_linear4bit.py::test_linear_serialization
    (the packed state dict): qlora's keys rebuild a bitsandbytes QuantState that dequantises to qlora's
    weights, and bitsandbytes' as_dict(packed=True) rebuilds an NF4Weight that dequantises to its own."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    # Rows a multiple of the blocksize: bitsandbytes' native CPU dequantiser mis-decodes other shapes.
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)

    ours = quantize_4bit(w, quant_type, blocksize, double_quant)
    keys = ours.state_dict()
    their_state = bnb_functional.QuantState.from_dict(
        {k[len("weight."):]: v for k, v in keys.items() if k != "weight"}, device=torch.device("cpu"))
    assert (their_state.quant_type, their_state.blocksize, their_state.nested) == (quant_type, blocksize, double_quant)
    assert their_state.dtype == torch.bfloat16 and tuple(their_state.shape) == (96, 512)
    assert torch.equal(bnb_functional.dequantize_4bit(keys["weight"], their_state), ours.dequantize())
    # And back: bitsandbytes' as_dict of that state gives the same tensors qlora wrote.
    again = NF4Weight.from_state_dict(bnb_state_dict(keys["weight"], their_state))
    assert torch.equal(again.packed, ours.packed) and torch.equal(again.absmax, ours.absmax)

    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                                 quant_type=quant_type)
    theirs = NF4Weight.from_state_dict(bnb_state_dict(packed, state))
    assert (theirs.quant_type, theirs.blocksize, theirs.double_quant) == (quant_type, blocksize, double_quant)
    assert torch.equal(theirs.dequantize(), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype,kind", [(torch.float32, "fc1"), (torch.float16, "fc2"), (torch.bfloat16, "attn")])
def test_gemv_against_dequantise_and_matmul(monkeypatch, quant_type, dtype, kind):
    """bitsandbytes tests/test_functional.py::TestQuantize4BitFunctional::test_gemv_4bit: a one-row
    product with the 4-bit weight (qlora's Triton GEMV kernel, under the interpreter here) agrees with
    torch.matmul of the dequantised weight; errors divided by sqrt(dim) under bitsandbytes' bounds for
    its inference-versus-training comparison (fp16 7e-5, fp32 5e-8, bf16 6e-4 for dim <= 512)."""
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    dim = 64
    out_in = {"fc1": (4 * dim, dim), "fc2": (dim, 4 * dim), "attn": (dim, dim)}[kind]
    g = torch.Generator().manual_seed(dim)
    a = torch.randn(1, out_in[1], generator=g).to(dtype)
    w = (torch.randn(*out_in, generator=g) / math.sqrt(dim)).to(dtype)
    q = quantize_4bit(w, quant_type, 64, double_quant=True)
    got = nf4_linear(a, q)
    expected = torch.matmul(a.float(), q.dequantize(torch.float32).t()).to(dtype)
    err = float((got.float() - expected.float()).abs().mean()) / math.sqrt(dim)
    bound = {torch.float16: 7e-5, torch.float32: 5e-8, torch.bfloat16: 6e-4}[dtype]
    assert got.dtype == dtype and got.shape == (1, out_in[0]) and err < bound, err


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_with_the_identity_is_exact(monkeypatch, quant_type, dtype):
    """bitsandbytes tests/test_functional.py::TestQuantize4BitFunctional::test_gemv_eye_4bit: the
    identity quantises exactly (every block's values are 0 and its absmax 1), so x @ I^T is x, through
    the GEMV kernel and the reference alike."""
    a = torch.normal(0, 0.1, size=(1, 1, 192), generator=torch.Generator().manual_seed(3)).to(dtype)
    q = quantize_4bit(torch.eye(192, dtype=dtype), quant_type, 64, double_quant=False)
    assert torch.equal(nf4_linear(a, q), a)
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    assert torch.equal(nf4_linear(a, q), a)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_weight_orientation_matches_matmul_4bit(quant_type):
    """bitsandbytes tests/test_functional.py::test_gemv_4bit and tests/test_linear4bit.py (Linear4bit's
    forward): a weight W [out, in] is quantised as stored and used as x @ W^T, written
    bnb.matmul_4bit(x, qW.t(), state). With the same bytes, qlora's nf4_linear(x, W) gives the same
    product; a non-square W catches a transposed reading."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(192, 320, generator=torch.Generator().manual_seed(5))
    ours = quantize_4bit(w, quant_type, 64, double_quant=True)
    keys = ours.state_dict()
    state = bnb.functional.QuantState.from_dict(
        {k[len("weight."):]: v for k, v in keys.items() if k != "weight"}, device=torch.device("cpu"))
    x = torch.randn(5, 320, generator=torch.Generator().manual_seed(6))
    theirs = bnb.matmul_4bit(x, keys["weight"].t(), state)
    assert theirs.shape == (5, 192)
    torch.testing.assert_close(nf4_linear(x, ours), theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, x @ ours.dequantize().t(), rtol=1e-5, atol=1e-5)
