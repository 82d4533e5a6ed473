"""Triton quantise kernels (under the interpreter on CPU) against the torch reference: identical bytes."""
import pytest
import torch

from qlora.codebook import nf4_codebook, nf4_thresholds
from qlora.kernels import quantize as Q

from helpers import IGNORE_ZERO_BLOCK_WARNINGS

pytestmark = IGNORE_ZERO_BLOCK_WARNINGS  # all-zero blocks divide by zero on purpose


def random_input(numel, dtype, blocksize, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * 0.02
    # Scales over six decades, an all-zero block, a constant block and a negative-max block.
    x *= 10.0 ** torch.randint(-3, 3, (numel,), generator=g).float()
    if numel >= 4 * blocksize:
        x[:blocksize] = 0.0
        x[blocksize:2 * blocksize] = -0.25
        x[2 * blocksize] = -7.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel,blocksize", [
    (64 * 40, 64), (64 * 37 + 5, 64), (333 * 197, 64), (32 * 300 + 18, 32), (256 * 9 + 100, 256), (5000, 4096),
])
def test_quantise_bytes_identical(poison, dtype, numel, blocksize):
    x = random_input(numel, dtype, blocksize)
    packed, absmax = Q.quantize_nf4_blocks_triton(x, blocksize)
    want_packed, want_absmax = Q.quantize_nf4_blocks_reference(x, blocksize)
    assert packed.shape == ((numel + 1) // 2,) and absmax.shape == (-(-numel // blocksize),)
    assert torch.equal(packed, want_packed)
    assert torch.equal(absmax, want_absmax)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
def test_double_quant_identical(poison, n):
    g = torch.Generator().manual_seed(n)
    absmax = torch.rand(n, generator=g) * 0.1
    absmax[: n // 3] = 0.0  # zero blocks pull the mean down
    codes, nested_absmax, offset = Q.quantize_absmax_triton(absmax)
    want = Q.quantize_absmax_reference(absmax)
    assert torch.equal(codes, want[0])
    assert torch.equal(nested_absmax, want[1])
    assert torch.equal(offset, want[2])


def test_double_quant_constant_absmax():
    # Every block scale equal: centred values all 0, nested absmax 0, codes 0 (no NaN written).
    codes, nested_absmax, offset = Q.quantize_absmax_triton(torch.full((300,), 0.125))
    assert offset.item() == 0.125
    assert nested_absmax.tolist() == [0.0, 0.0]
    assert codes.tolist() == [0] * 300


def test_codes_at_and_around_thresholds():
    # Each block: 1.0 first (absmax = 1, y = x), then every threshold exactly (a tie goes to the
    # lower code) and one ulp either side of it. Expected codes counted here by definition.
    thr = nf4_thresholds()
    vals = torch.stack([thr, torch.nextafter(thr, torch.full_like(thr, -2)), torch.nextafter(thr, torch.full_like(thr, 2))])
    vals = torch.cat([torch.ones(1), vals.flatten(), -vals.flatten()[:16]])  # 1 + 45 + 16 = 62 values
    x = torch.cat([vals, torch.zeros(2)])  # one block of 64
    packed, absmax = Q.quantize_nf4_blocks_triton(x, 64)
    assert absmax.item() == 1.0
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).flatten().long()
    expected = (x[:, None] > thr[None, :]).sum(dim=1)
    assert torch.equal(codes, expected)
    # And the nearest code, up to the ulp-wide ties the thresholds decide.
    table = nf4_codebook()
    assert (table[codes] - x).abs().max() <= (table[1:] - table[:-1]).max() / 2 + 1e-6


def test_all_zero_block_bytes_and_odd_padding():
    x = torch.zeros(64 * 3 + 1, dtype=torch.bfloat16)
    x[64:128] = torch.linspace(-1, 1, 64, dtype=torch.bfloat16)
    x[-1] = 0.5  # last block is a single element: its pad nibble is code(0.0) = 7
    packed, absmax = Q.quantize_nf4_blocks_triton(x, 64)
    assert packed[:32].tolist() == [0] * 32          # all-zero block: 0x00, as the CUDA kernel writes
    assert packed[64:96].tolist() == [0] * 32
    assert packed[-1].item() == 0xF7                   # 0.5 / 0.5 -> code 15, pad -> code 7
    assert absmax.tolist() == [0.0, 1.0, 0.0, 0.5]


def test_entry_points_dispatch(monkeypatch):
    x = random_input(64 * 8, torch.bfloat16, 64)
    calls = []
    real = Q.quantize_nf4_blocks_triton
    monkeypatch.setattr(Q, "quantize_nf4_blocks_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("QLORA_BACKEND", raising=False)
    want = Q.quantize_nf4_blocks(x, 64)
    assert calls == []
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    got = Q.quantize_nf4_blocks(x, 64)
    assert calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(Q.quantize_absmax(got[1]), Q.quantize_absmax_reference(want[1])))
    with pytest.raises(ValueError, match="blocksize"):
        Q.quantize_nf4_blocks(x, 48)


def test_codes_on_a_dense_grid_and_at_bin_edges():
    # The kernel finds a code from its bin (Q.CODE_BINS of [-1, 1]) and the one threshold in it:
    # every bin edge, one ulp either side, and a dense grid, against counting the thresholds.
    edges = torch.arange(Q.CODE_BINS + 1, dtype=torch.float32) * (2 / Q.CODE_BINS) - 1
    around = torch.cat([edges, torch.nextafter(edges, edges - 1), torch.nextafter(edges, edges + 1)])
    values = torch.cat([around, torch.linspace(-1, 1, 3001)]).clamp(-1, 1)
    values = torch.nn.functional.pad(values, (0, -values.numel() % 63))
    x = torch.cat([torch.ones(values.numel() // 63, 1), values.view(-1, 63)], dim=1).flatten()  # absmax 1
    packed, absmax = Q.quantize_nf4_blocks_triton(x, 64)
    assert (absmax == 1).all()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).flatten().long()
    assert torch.equal(codes, (x[:, None] > nf4_thresholds()[None, :]).sum(dim=1))


def test_persistent_programs_and_partial_last_tile(poison, monkeypatch):
    # 4 programs (one SM's worth) for 5 whole tiles and a partial one, from an input not 16-byte aligned.
    monkeypatch.setattr(Q.backend, "sm_count", lambda device: 1)
    numel = 5 * Q.QUANT_TILE + 64 * 3 + 37
    x = random_input(numel + 3, torch.bfloat16, 64, seed=7)[3:]
    assert x.data_ptr() % 16 and -(-numel // Q.QUANT_TILE) > Q.QUANT_PROGRAMS_PER_SM
    packed, absmax = Q.quantize_nf4_blocks_triton(x, 64)
    want_packed, want_absmax = Q.quantize_nf4_blocks_reference(x, 64)
    assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax)


def test_bin_table_is_the_thresholds():
    table = Q.nf4_bin_table()
    thresholds = (table >> 32).to(torch.int32).view(torch.float32)
    assert torch.equal(thresholds[torch.isfinite(thresholds)], nf4_thresholds())
    below = table & 0xFFFFFFFF
    edges = torch.arange(64, dtype=torch.float64) * (2 / Q.CODE_BINS) - 1
    assert torch.equal(below, (nf4_thresholds().double()[None, :] < edges[:, None]).sum(1))
