"""FP4 quantisation (bitsandbytes' quant_type="fp4") against its definition, bitsandbytes' CUDA
decision tree (transcribed below from csrc/kernels.cu's dQuantizeFP4) and bitsandbytes' CPU functions."""
import pytest
import torch

from qlora.codebook import fp4_codebook, fp4_thresholds
from qlora.kernels import quantize_fp4 as Q
from qlora.nf4 import NF4Weight, quantize_4bit, quantize_nf4

from helpers import IGNORE_ZERO_BLOCK_WARNINGS
from test_codebook import CUDA_FP4_THRESHOLDS, nearest_float32

pytestmark = IGNORE_ZERO_BLOCK_WARNINGS  # all-zero blocks divide by zero on purpose

QUANTIZERS = {"reference": Q.quantize_fp4_blocks_reference, "triton": Q.quantize_fp4_blocks_triton}


def cuda_fp4_code(y: float) -> int:
    """dQuantizeFP4 of one float32 value, as the CUDA source writes it: sign bit for y < 0, then a
    binary search of |y| over the literal pivots (a NaN fails every comparison: code 0)."""
    t = [nearest_float32(v) for v in CUDA_FP4_THRESHOLDS]
    sign = 0b1000 if y < 0 else 0
    x = abs(y)
    if x > t[3]:
        if x > t[5]:
            return (0b0011 if x > t[6] else 0b0010) + sign
        return (0b0101 if x > t[4] else 0b0100) + sign
    if x > t[1]:
        return (0b0111 if x > t[2] else 0b0110) + sign
    return (0b0001 if x > t[0] else 0b0000) + sign


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    packed = packed.reshape(-1)
    return torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:numel]


def values_around_thresholds() -> torch.Tensor:
    """Blocks of 64 that start with 1.0 (absmax 1, so y = x exactly), then each threshold exactly and
    1 and 2 ulps either side of it, both signs, zeros of both signs and tiny values."""
    base = fp4_thresholds()
    probes = [base]
    for direction in (1.0, -1.0):
        step = base
        for _ in range(2):
            step = torch.nextafter(step, torch.full_like(step, direction))
            probes.append(step)
    magnitudes = torch.cat(probes + [torch.tensor([0.0, 1e-30, 1e-3, 0.5, 1.0])])
    values = torch.cat([magnitudes, -magnitudes])
    per_block = 63
    values = torch.nn.functional.pad(values, (0, -values.numel() % per_block)).view(-1, per_block)
    return torch.cat([torch.ones(values.shape[0], 1), values], dim=1).reshape(-1)


@pytest.mark.parametrize("kernel", QUANTIZERS)
def test_codes_at_and_around_every_threshold_follow_the_cuda_tree(poison, kernel):
    x = values_around_thresholds()
    packed, absmax = QUANTIZERS[kernel](x, 64)
    assert absmax.tolist() == [1.0] * (x.numel() // 64)
    expected = [cuda_fp4_code(v) for v in x.tolist()]
    assert unpack(packed, x.numel()).tolist() == expected
    # The exact threshold is not above itself: the lower magnitude; -0.0 is not below zero: code 0.
    assert cuda_fp4_code(fp4_thresholds()[5].item()) == 0b0101 and cuda_fp4_code(-0.0) == 0


@pytest.mark.parametrize("kernel", QUANTIZERS)
def test_all_zero_blocks_write_code_zero_and_decode_to_zero(poison, kernel):
    x = torch.randn(64 * 4)
    x[64:128] = 0.0
    x[128:192] = -0.0
    packed, absmax = QUANTIZERS[kernel](x, 64)
    assert absmax[1:3].tolist() == [0.0, 0.0]
    assert packed[32:96].tolist() == [0] * 64  # as the CUDA kernel writes: 0 * (1/0) is NaN, code 0
    w = NF4Weight(packed=packed.view(-1, 1), absmax=absmax, shape=(256,), dtype=torch.float32, quant_type="fp4")
    out = w.dequantize()
    assert torch.equal(out[64:192], torch.zeros(128)) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel,blocksize", [(64 * 37 + 5, 64), (333 * 197, 32), (256 * 9 + 100, 256), (5001, 4096)])
def test_triton_kernel_writes_the_reference_bytes(poison, dtype, numel, blocksize):
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g) * 10.0 ** torch.randint(-3, 2, (numel,), generator=g).float()
    x[:blocksize] = 0.0
    x = x.to(dtype)
    packed, absmax = Q.quantize_fp4_blocks_triton(x, blocksize)
    want_packed, want_absmax = Q.quantize_fp4_blocks_reference(x, blocksize)
    assert packed.shape == ((numel + 1) // 2,) and torch.equal(packed, want_packed)
    assert torch.equal(absmax, want_absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_codes_agree_with_bitsandbytes_cpu_except_where_documented(dtype, blocksize):
    """bitsandbytes' CPU quantiser rounds to the float32 midpoints of its table, its CUDA kernel (and
    qlora) compares with the literal thresholds: they differ only where |y| lies between the two, and
    below the first threshold, where CPU and CUDA pick opposite zero codes (0b0000 / 0b1000, both 0.0)."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(blocksize)
    numel = 16 * 1024 + 6
    x = torch.randn(numel, generator=g).to(dtype)
    theirs, state = bnb_functional.quantize_4bit(x, blocksize=blocksize, quant_type="fp4")
    packed, absmax = Q.quantize_fp4_blocks_reference(x, blocksize)
    assert torch.equal(absmax, state.absmax)
    ours_codes, their_codes = unpack(packed, numel).long(), unpack(theirs, numel).long()

    flat = torch.nn.functional.pad(x.float(), (0, -numel % blocksize)).view(-1, blocksize)
    y = (flat * torch.reciprocal(absmax)[:, None]).reshape(-1)[:numel].abs()
    magnitudes = fp4_codebook()[:8].sort().values
    midpoints, literals = (magnitudes[1:] + magnitudes[:-1]) / 2, fp4_thresholds()
    lo, hi = torch.minimum(midpoints, literals), torch.maximum(midpoints, literals)
    between = ((y[:, None] >= lo) & (y[:, None] <= hi)).any(dim=1)
    near_zero = y <= literals[0]
    same = ours_codes == their_codes
    assert bool(same[~between & ~near_zero].all())
    table = fp4_codebook()
    assert torch.equal(table[ours_codes[near_zero]], table[their_codes[near_zero]])
    assert int(between.sum()) <= numel // 100  # bf16 ratios land exactly on midpoints more often
    # Where they differ, qlora is the CUDA tree.
    for i in torch.nonzero(~same & ~near_zero).flatten().tolist():
        y_signed = float(flat.reshape(-1)[i] * torch.reciprocal(absmax[i // blocksize]))
        assert ours_codes[i].item() == cuda_fp4_code(y_signed)


def test_quantize_4bit_names_the_types_and_keeps_nf4_as_default():
    w = torch.randn(8, 64)
    assert quantize_4bit(w).quant_type == "nf4"
    assert torch.equal(quantize_4bit(w).packed, quantize_nf4(w).packed)
    fp4 = quantize_4bit(w, "fp4", 32, False)
    assert (fp4.quant_type, fp4.blocksize, fp4.double_quant) == ("fp4", 32, False)
    assert torch.equal(fp4.quant_map, fp4_codebook())
    with pytest.raises(ValueError, match=r"layer\.weight: quant_type must be 'nf4' or 'fp4', got 'int4'"):
        quantize_4bit(w, "int4", name="layer.weight")


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_uses_the_fp4_key_and_round_trips(double_quant):
    w = torch.randn(48, 80, dtype=torch.bfloat16)
    q = quantize_4bit(w, "fp4", 64, double_quant)
    state = q.state_dict("model.layers.0.mlp.up_proj")
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4"
    assert key in state and not any(k.endswith("__nf4") for k in state)
    assert b'"quant_type": "fp4"' in bytes(state[key].tolist())
    back = NF4Weight.from_state_dict(state, "model.layers.0.mlp.up_proj")
    assert back.quant_type == "fp4" and torch.equal(back.dequantize(), q.dequantize())
    # A quant state whose JSON contradicts its key is refused by name.
    state[key] = torch.frombuffer(bytearray(bytes(state[key].tolist()).replace(b'"fp4"', b'"nf4"')),
                                  dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"up_proj\.weight\.quant_state\.bitsandbytes__fp4: quant_type 'nf4'"):
        NF4Weight.from_state_dict(state, "model.layers.0.mlp.up_proj")


def test_fp4_layer_forward_state_dict_and_merge_keep_fp4():
    from qlora.layer import QuantLoRALinear

    torch.manual_seed(0)
    layer = QuantLoRALinear.from_nf4(quantize_4bit(torch.randn(32, 64), "fp4"), r=4, alpha=8,
                                     compute_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 64)
    base = x @ layer.nf4_weight.dequantize(torch.float32).T
    torch.testing.assert_close(layer(x), base + layer.scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    state = layer.state_dict()
    assert "weight.quant_state.bitsandbytes__fp4" in state and "weight.quant_state.bitsandbytes__nf4" not in state
    layer.merge()
    assert layer.nf4_weight.quant_type == "fp4" and torch.equal(layer.nf4_weight.quant_map, fp4_codebook())


@pytest.mark.parametrize("kernel", QUANTIZERS)
def test_nonfinite_values_get_the_cuda_codes(kernel):
    """With allow_nonfinite, NaN fails every comparison (code 0) and an infinite block scale makes the
    block's finite values 0 and its inf NaN: code 0 throughout, in both implementations."""
    x = torch.randn(128)
    x[3], x[70] = float("nan"), float("inf")
    packed, _ = QUANTIZERS[kernel](x, 64)
    codes = unpack(packed, 128)
    assert codes[3].item() == 0 and codes[64:].tolist() == [0] * 64
