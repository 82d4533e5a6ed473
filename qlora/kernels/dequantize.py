"""NF4 dequantisation, nested absmax decoded on the way: w = table[code] * absmax, in float32.

The Triton kernel and its two helpers (_mul_rn, _block_scales) are shared with the matmul kernels,
which decode weight tiles the same way so that every path sees the same weights.
"""
from __future__ import annotations

import torch

from qlora.kernels import backend
from qlora.kernels.quantize import NESTED_BLOCKSIZE, REFERENCE_CHUNK, _tile_ids

from qlora.kernels.backend import tl, triton


def dequantize_absmax_reference(
    codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: torch.Tensor,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """absmax[b] = code2[q8[b]] * absmax2[b // 256] + offset: a product and a sum, each rounded
    to float32 (no fused multiply-add), as bitsandbytes computes it."""
    codes = codes.reshape(-1).long()
    scale = nested_absmax.reshape(-1).repeat_interleave(nested_blocksize)[: codes.numel()]
    return nested_code[codes] * scale + offset.reshape(())


def dequantize_nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                             numel: int, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Flat [numel] tensor of dtype from packed codes and float32 block scales."""
    packed = packed.reshape(-1)
    absmax = absmax.reshape(-1).to(torch.float32)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    chunk = max(REFERENCE_CHUNK // blocksize, 1) * blocksize
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        pairs = packed[start // 2:(stop + 1) // 2]
        codes = torch.stack((pairs >> 4, pairs & 0xF), dim=1).view(-1)[: stop - start].long()
        scales = absmax[start // blocksize:-(-stop // blocksize)].repeat_interleave(blocksize)[: stop - start]
        out[start:stop] = (quant_map[codes] * scales).to(dtype)
    return out


@triton.jit
def _mul_rn(a, b, ON_GPU: tl.constexpr):
    # a * b rounded to float32 on its own. On the GPU the explicit `.rn` keeps ptxas from contracting
    # it with a following add into one FMA (one rounding instead of two): bitsandbytes rounds twice.
    if ON_GPU:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _round_to(x, dtype: tl.constexpr, ON_GPU: tl.constexpr):
    # float32 -> dtype, rounding to nearest even. The GPU's cvt does that; the interpreter truncates
    # to bfloat16, so there it is done by hand on the bits (weights are finite: no NaN case needed).
    if (not ON_GPU) and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks, mask,
                  DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, ON_GPU: tl.constexpr):
    """float32 absmax of the blocks (int64 indices of any shape); with double quantisation decoded
    here, in registers: code2[q8[b]] * absmax2[b // 256] + offset."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        code = tl.load(nested_code_ptr + q)
        scale = tl.load(nested_absmax_ptr + blocks // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return _mul_rn(code, scale, ON_GPU) + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blocks, mask=mask, other=0.0)


@triton.jit
def _row_byte_offsets(rows, row_bytes, cols):
    """rows[:, None] * row_bytes + cols[None, :] in int64: a weight's rows reach past 2**31 bytes."""
    return rows.to(tl.int64)[:, None] * row_bytes + cols[None, :]


@triton.jit
def _pair_table(qmap_ptr):
    """The 256 possible bytes decoded: bits of (quant_map[byte >> 4], quant_map[byte & 15]) in a uint64,
    high nibble's value in the high word. Built from quant_map at run time (any 16-entry table
    decodes: NF4, FP4), once per program, so that each byte costs one lookup and no interleave."""
    byte = tl.arange(0, 256)
    hi = tl.load(qmap_ptr + (byte >> 4)).to(tl.uint32, bitcast=True).to(tl.uint64)
    lo = tl.load(qmap_ptr + (byte & 15)).to(tl.uint32, bitcast=True).to(tl.uint64)
    return (hi << 32) | lo


@triton.jit
def _decode_bytes(table, byte):
    """(value of the high nibble, value of the low nibble) of each byte, float32, via _pair_table."""
    pair = tl.gather(table, byte.to(tl.int32), 0)
    hi = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    lo = pair.to(tl.uint32).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, qmap_ptr,
                       out_ptr, byte_limit, n_blocks, n_tiles,
                       BLOCKSIZE: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       NESTED_BLOCKSIZE: tl.constexpr, ON_GPU: tl.constexpr):
    # Persistent: each program builds the byte table once, then takes every num_programs-th tile of
    # whole blocks: bytes [BLOCKS * HALF] in, elements [BLOCKS * BLOCKSIZE] out. The output is padded
    # to whole tiles (no store mask) and the byte mask covers whole 16-byte segments (see byte_limit):
    # loads and stores stay 16 bytes wide.
    HALF: tl.constexpr = BLOCKSIZE // 2
    TILE_BYTES: tl.constexpr = BLOCKS_PER_TILE * HALF
    table = _pair_table(qmap_ptr)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        byte_idx = _tile_ids(tile, TILE_BYTES)
        byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < byte_limit, other=0)
        hi, lo = _decode_bytes(table, byte)
        blocks = _tile_ids(tile, BLOCKS_PER_TILE)
        scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks,
                              blocks < n_blocks, DOUBLE_QUANT, NESTED_BLOCKSIZE, ON_GPU)
        # High nibble is element 2i, low nibble 2i+1: interleaving restores the order.
        w = _mul_rn(tl.reshape(tl.interleave(hi, lo), [BLOCKS_PER_TILE, BLOCKSIZE]), scale[:, None], ON_GPU)
        elem_idx = _tile_ids(tile, TILE_BYTES * 2)
        tl.store(out_ptr + elem_idx, tl.reshape(_round_to(w, out_ptr.dtype.element_ty, ON_GPU), [TILE_BYTES * 2]))


# Bytes of packed input per tile: 16384 outputs, 128 per thread of 4 warps. Fewer per thread and the
# per-tile work (block scales, layout changes) pushes the sm_90a loop past 4 instructions per element
# (bench/sass_report.py: 4.14 at 4096 bytes, 3.92 here); the cost is 162 registers, 3 programs per SM.
DEQUANT_TILE_BYTES = 8192
# Programs per SM of the persistent dequantise: what fits at once (see above), 12 warps with 32 KB in flight.
DEQUANT_PROGRAMS_PER_SM = 3
DEQUANT_WARPS = 4


def byte_limit(packed: torch.Tensor, n_bytes: int) -> int:
    """Bytes a kernel may read from packed: n_bytes rounded up to the end of the last 16-byte
    segment in memory. A 16-byte aligned segment never crosses a page, so the extra bytes are
    readable (and never used); a multiple of 16 lets the loads stay 16 bytes wide."""
    misalign = packed.data_ptr() % 16
    return -(-(misalign + n_bytes) // 16) * 16 - misalign


def _flat(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    # A kernel takes the pointer: any contiguous shape is flat already (packed is [n, 1]); a strided
    # view is copied (reshape(-1) of a 1-D view would keep its strides). Only what is needed: each
    # reshape or .to costs a microsecond of host time even when a no-op.
    if t.device != device or (dtype is not None and t.dtype != dtype):
        t = t.to(device=device, dtype=dtype or t.dtype)
    return t if t.is_contiguous() else t.contiguous()


def weight_args(packed, absmax, quant_map, nested_absmax, nested_code, offset):
    """Flat, on-device kernel arguments; placeholders for the unused nested tensors."""
    device, f32 = packed.device, torch.float32
    if nested_absmax is None:
        absmax = _flat(absmax, device, f32)
        nested_absmax = nested_code = offset = absmax
    else:
        absmax = _flat(absmax, device)
        nested_absmax, nested_code, offset = (_flat(t, device, f32) for t in (nested_absmax, nested_code, offset))
    return _flat(packed, device), absmax, nested_absmax, nested_code, offset, _flat(quant_map, device, f32)


def dequantize_nf4_triton(packed, absmax, quant_map, numel, blocksize, dtype,
                          nested_absmax=None, nested_code=None, offset=None, scratch=None) -> torch.Tensor:
    """Triton version of dequantize_nf4: one launch, the nested absmax decoded inside it. With
    scratch(numel, dtype, device) given, the output lives in the buffer it returns."""
    if numel == 0:
        return torch.empty(0, dtype=dtype, device=packed.device)
    n_blocks = -(-numel // blocksize)
    per_tile = max(1, DEQUANT_TILE_BYTES // (blocksize // 2))
    tiles = backend.cdiv(n_blocks, per_tile)
    padded = tiles * per_tile * blocksize
    out = (scratch or torch.empty)(padded, dtype=dtype, device=packed.device)
    weights = weight_args(packed, absmax, quant_map, nested_absmax, nested_code, offset)
    _dequantize_kernel[(min(tiles, DEQUANT_PROGRAMS_PER_SM * backend.sm_count(packed.device)),)](
        *weights, out, byte_limit(weights[0], (numel + 1) // 2), n_blocks, tiles,
        BLOCKSIZE=blocksize, BLOCKS_PER_TILE=per_tile, DOUBLE_QUANT=nested_absmax is not None,
        NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, ON_GPU=backend.on_gpu(packed), num_warps=DEQUANT_WARPS,
    )
    return out[:numel]


def _dequantize_nf4_any_reference(packed, absmax, quant_map, numel, blocksize, dtype,
                                  nested_absmax=None, nested_code=None, offset=None) -> torch.Tensor:
    """dequantize_nf4's contract in torch: a nested absmax is decoded first."""
    if nested_absmax is not None:
        absmax = dequantize_absmax_reference(absmax, nested_absmax, nested_code, offset)
    return dequantize_nf4_reference(packed, absmax, quant_map, numel, blocksize, dtype)


def _dequantize_nf4_fake(packed, absmax, quant_map, numel, blocksize, dtype, nested_absmax, nested_code, offset):
    return packed.new_empty(numel, dtype=dtype)


@backend.dispatching_op(
    "dequantize_nf4",
    "(Tensor packed, Tensor absmax, Tensor quant_map, int numel, int blocksize, ScalarType dtype, "
    "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset) -> Tensor",
    _dequantize_nf4_fake,
)
def _dequantize_nf4_op(use_triton: bool):
    return dequantize_nf4_triton if use_triton else _dequantize_nf4_any_reference


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatching entry point: flat [numel] weights from the bitsandbytes layout. With
    nested_absmax given, absmax holds the uint8 codes of the double quantisation.
    Triton on CUDA tensors, the reference on CPU (see backend.py); a torch.library op, so
    torch.compile keeps it in the graph."""
    return torch.ops.qlora.dequantize_nf4(packed, absmax, quant_map, numel, blocksize, dtype,
                                          nested_absmax, nested_code, offset)
