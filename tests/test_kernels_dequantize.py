"""Triton dequantise kernel (under the interpreter on CPU) against the torch reference: bit-identical."""
import os

import pytest
import torch

from qlora.codebook import dynamic_map, nf4_codebook
from qlora.kernels import backend
from qlora.kernels import dequantize as D
from qlora.kernels.quantize import quantize_absmax_reference, quantize_nf4_blocks_reference

import triton
import triton.language as tl

from helpers import IGNORE_ZERO_BLOCK_WARNINGS

pytestmark = IGNORE_ZERO_BLOCK_WARNINGS  # all-zero blocks divide by zero on purpose

INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def make_weight(numel, blocksize, double_quant, seed=0, zero_block=True):
    """Reference-quantised random weights (N(0, 0.02), one all-zero and one constant block)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(numel, generator=g) * 0.02
    if zero_block and numel >= 2 * blocksize:
        w[:blocksize] = 0.0
        w[blocksize:2 * blocksize] = 0.5
    packed, absmax = quantize_nf4_blocks_reference(w, blocksize)
    if not double_quant:
        return packed, absmax, None, None, None
    codes, nested_absmax, offset = quantize_absmax_reference(absmax)
    return packed, codes, nested_absmax, dynamic_map(), offset


def reference(packed, absmax, nested_absmax, nested_code, offset, numel, blocksize, dtype):
    if nested_absmax is not None:
        absmax = D.dequantize_absmax_reference(absmax, nested_absmax, nested_code, offset)
    return D.dequantize_nf4_reference(packed, absmax, nf4_codebook(), numel, blocksize, dtype)


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("numel,blocksize", [
    (64 * 37, 64),        # whole blocks
    (64 * 37 + 5, 64),    # partial last block, odd numel (padded low nibble)
    (333 * 197, 64),      # fp16_odd's shape
    (32 * 300 + 18, 32),  # more than 256 blocks: several nested blocks, the last partial
    (256 * 9 + 100, 256),
    (5000, 4096),         # one program per block, the second partial
])
def test_triton_bit_identical_to_reference(poison, dtype, double_quant, numel, blocksize):
    packed, absmax, nested_absmax, nested_code, offset = make_weight(numel, blocksize, double_quant)
    got = D.dequantize_nf4_triton(packed, absmax, nf4_codebook(), numel, blocksize, dtype,
                                  nested_absmax, nested_code, offset)
    want = reference(packed, absmax, nested_absmax, nested_code, offset, numel, blocksize, dtype)
    assert got.shape == (numel,)
    assert not torch.isnan(got).any()
    assert same_bits(got, want)


def test_zero_block_dequantises_to_exact_zeros():
    packed, absmax, nested_absmax, nested_code, offset = make_weight(64 * 8, 64, double_quant=False)
    assert absmax[0] == 0
    got = D.dequantize_nf4_triton(packed, absmax, nf4_codebook(), 64 * 8, 64, torch.bfloat16)
    assert got[:64].abs().max().item() == 0.0
    assert got[64:].abs().max().item() > 0.0


def test_nested_absmax_decoded_without_fma():
    # absmax = code2[q] * absmax2 + offset with two roundings. A fused multiply-add (one rounding)
    # differs on this triple; the kernel must agree with the two-rounding reference.
    code = torch.tensor([0.3333333432674408], dtype=torch.float32)
    scale = torch.tensor([3.0000002384185791], dtype=torch.float32)
    offset = torch.tensor([-1.0000000000000000], dtype=torch.float32)
    two_roundings = (code * scale + offset).item()
    fused = float((code.double() * scale.double() + offset.double()).float())
    assert two_roundings != fused  # the triple does tell the two apart
    nested_code = torch.zeros(256)
    nested_code[5] = code
    packed = torch.full((32,), 0xFF, dtype=torch.uint8)  # code 15 = 1.0: w = absmax
    got = D.dequantize_nf4_triton(packed, torch.tensor([5], dtype=torch.uint8), nf4_codebook(), 64, 64,
                                  torch.float32, scale, nested_code, offset)
    assert got[0].item() == two_roundings


def test_entry_point_dispatch(monkeypatch):
    packed, absmax, *_ = make_weight(64 * 4, 64, double_quant=False)
    calls = []
    real = D.dequantize_nf4_triton
    monkeypatch.setattr(D, "dequantize_nf4_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("QLORA_BACKEND", raising=False)
    want = D.dequantize_nf4(packed, absmax, nf4_codebook(), 256, 64, torch.bfloat16)
    assert calls == []  # CPU tensors: the reference
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    got = D.dequantize_nf4(packed, absmax, nf4_codebook(), 256, 64, torch.bfloat16)
    assert calls == [1] and same_bits(got, want)
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    D.dequantize_nf4(packed, absmax, nf4_codebook(), 256, 64, torch.bfloat16)
    assert calls == [1]
    monkeypatch.setenv("QLORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="QLORA_BACKEND"):
        backend.use_triton(packed)


def test_interpreter_on_without_gpu():
    if not torch.cuda.is_available():
        assert backend.INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tile_ids_probe(pid_ptr, out_ptr, SIZE: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, SIZE), D._tile_ids(tl.load(pid_ptr), SIZE))


def test_tile_ids_are_int64_past_2_to_31():
    # Indices of the last program over a 2**32-element weight, without allocating one: they
    # overflow int32 (the interpreter wraps, like the GPU) unless the kernels' helper widens first.
    size = 64
    pid = (1 << 32) // size - 1
    out = torch.empty(size, dtype=torch.int64)
    _tile_ids_probe[(1,)](torch.tensor([pid], dtype=torch.int32), out, SIZE=size)
    expected = torch.arange(size, dtype=torch.int64) + pid * size
    assert expected[-1].item() > 2**31
    assert torch.equal(out, expected)


@pytest.mark.parametrize("blocksize", [64, 4096])
def test_persistent_programs_take_several_tiles(poison, monkeypatch, blocksize):
    # One SM's worth of programs (3) for 5 tiles: programs loop; the last tile is partial.
    monkeypatch.setattr(backend, "sm_count", lambda device: 1)
    numel = 4 * D.DEQUANT_TILE_BYTES * 2 + 3 * blocksize + 7
    packed, absmax, nested_absmax, nested_code, offset = make_weight(numel, blocksize, True, seed=3)
    assert -(-numel // (D.DEQUANT_TILE_BYTES * 2)) > D.DEQUANT_PROGRAMS_PER_SM
    got = D.dequantize_nf4_triton(packed, absmax, nf4_codebook(), numel, blocksize, torch.bfloat16,
                                  nested_absmax, nested_code, offset)
    assert same_bits(got, reference(packed, absmax, nested_absmax, nested_code, offset, numel, blocksize,
                                    torch.bfloat16))


@pytest.mark.parametrize("shift", [1, 5, 16])
def test_packed_not_16_byte_aligned(poison, shift):
    # byte_limit rounds the readable bytes to the 16-byte segments of the data as it lies in memory.
    numel = 64 * 21 + 3
    packed, absmax, *_ = make_weight(numel, 64, False, seed=4)
    storage = torch.zeros(packed.numel() + shift, dtype=torch.uint8)
    storage[shift:] = packed
    view = storage[shift:]
    assert view.data_ptr() % 16 == shift % 16
    assert D.byte_limit(view, packed.numel()) >= packed.numel()
    assert (view.data_ptr() + D.byte_limit(view, packed.numel())) % 16 == 0
    got = D.dequantize_nf4_triton(view, absmax, nf4_codebook(), numel, 64, torch.float32)
    assert same_bits(got, reference(packed, absmax, None, None, None, numel, 64, torch.float32))


def test_weight_tensors_of_any_layout(poison):
    # The kernels take pointers: [n, 1] packed passes as it is, a strided view is made contiguous.
    numel = 64 * 9
    packed, absmax, *_ = make_weight(numel, 64, False, seed=6)
    want = reference(packed, absmax, None, None, None, numel, 64, torch.float32)
    strided = torch.stack((packed.view(-1), torch.full_like(packed.view(-1), 0x77)), 1)[:, 0]
    spread_absmax = torch.stack((absmax, -absmax), 1)[:, 0]
    for p, a in ((packed.view(-1, 1), absmax), (strided, spread_absmax)):
        assert same_bits(D.dequantize_nf4_triton(p, a, nf4_codebook(), numel, 64, torch.float32), want)


def test_decode_reads_the_given_table(poison):
    # Any 16-entry table decodes (FP4 reuses these kernels with its own): a permuted, rescaled one.
    numel = 64 * 9
    packed, absmax, *_ = make_weight(numel, 64, False, seed=5)
    table = nf4_codebook().flip(0) * 0.75
    got = D.dequantize_nf4_triton(packed, absmax, table, numel, 64, torch.float32)
    want = D.dequantize_nf4_reference(packed, absmax, table, numel, 64, torch.float32)
    assert same_bits(got, want)


@triton.jit
def _row_offsets_probe(rows_ptr, out_ptr, row_bytes, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.load(rows_ptr + tl.arange(0, ROWS))
    offsets = D._row_byte_offsets(rows, row_bytes, tl.arange(0, COLS))
    tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :], offsets)


def test_row_byte_offsets_are_int64_past_2_to_31():
    # The fused tiles address W's rows as row * (K / 2): the last rows of a 28672 x 300000 weight lie
    # past 2**31 bytes. int32 row indices (as the kernels have them) must be widened before the product.
    row_bytes = 150000
    rows = torch.tensor([0, 1, 14316, 28671], dtype=torch.int32)
    out = torch.empty(4, 8, dtype=torch.int64)
    _row_offsets_probe[(1,)](rows, out, row_bytes, ROWS=4, COLS=8)
    expected = rows.long()[:, None] * row_bytes + torch.arange(8)[None, :]
    assert expected.max().item() > 2**31 and torch.equal(out, expected)
