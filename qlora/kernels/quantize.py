"""Blockwise NF4 quantisation and 8-bit double quantisation of the block scales.

The torch reference here is the definition: bitsandbytes' CUDA bytes, computed in chunks so
that memory stays near twice the chunk whatever the tensor's size.
"""
from __future__ import annotations

import functools

import torch

from qlora.codebook import dynamic_map, nf4_thresholds
from qlora.kernels import backend

from qlora.kernels.backend import tl, triton

# Elements per chunk of the reference (a multiple of every allowed blocksize).
REFERENCE_CHUNK = 1 << 20
NESTED_BLOCKSIZE = 256


def check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")


def quantize_nf4_blocks_reference(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a flat tensor to NF4: returns (packed uint8 [(n+1)//2], absmax float32 [n_blocks]).

    Per block: r = 1/absmax (IEEE), y = x*r, code = #{k : y > T_k}. An all-zero block has
    r = inf and y = NaN, which exceeds no threshold, so it gets code 0 as the CUDA kernel writes.
    Element 2i goes in the high nibble, 2i+1 in the low one; the padding of an odd numel is a zero.
    """
    check_blocksize(blocksize)
    x = x.reshape(-1)
    numel = x.numel()
    n_blocks = -(-numel // blocksize)
    thresholds = nf4_thresholds().to(x.device)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    chunk = max(REFERENCE_CHUNK // blocksize, 1) * blocksize
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        part = x[start:stop].to(torch.float32)
        padded_len = -(-(stop - start) // blocksize) * blocksize
        if padded_len != part.numel():
            part = torch.nn.functional.pad(part, (0, padded_len - part.numel()))
        blocks = part.view(-1, blocksize)
        block_absmax = blocks.abs().amax(dim=1)
        y = blocks * torch.reciprocal(block_absmax).unsqueeze(1)
        # bucketize(right=False) counts the boundaries strictly below y; NaN counts as above all.
        codes = torch.bucketize(y, thresholds, out_int32=True)
        codes[block_absmax == 0] = 0
        codes = codes.view(-1).to(torch.uint8)
        if codes.numel() % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        pairs = codes.view(-1, 2)
        byte_start = start // 2
        n_bytes = min((stop - start + 1) // 2, packed.numel() - byte_start)
        packed[byte_start:byte_start + n_bytes] = ((pairs[:, 0] << 4) | pairs[:, 1])[:n_bytes]
        absmax[start // blocksize:start // blocksize + blocks.shape[0]] = block_absmax
    return packed, absmax


def quantize_absmax_reference(
    absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation: (uint8 codes [n], nested_absmax float32 [ceil(n/256)], offset float32 []).

    offset = mean(absmax); (absmax - offset) is quantised blockwise to the nearest value of the
    signed dynamic map, each 256-block scaled by its own absmax.
    """
    absmax = absmax.reshape(-1).to(torch.float32)
    # The mean rounded once from float64: what a float32 tree reduction lands on.
    offset = absmax.to(torch.float64).mean().to(torch.float32)
    centered = absmax - offset
    n = centered.numel()
    padded = torch.nn.functional.pad(centered, (0, -n % nested_blocksize)).view(-1, nested_blocksize)
    nested_absmax = padded.abs().amax(dim=1)
    y = padded * torch.reciprocal(nested_absmax).unsqueeze(1)
    code = dynamic_map().to(absmax.device)
    midpoints = (code[1:] + code[:-1]) * 0.5
    codes = torch.bucketize(y, midpoints, out_int32=True)
    codes[nested_absmax == 0] = 0
    return codes.view(-1)[:n].to(torch.uint8), nested_absmax, offset


@triton.jit
def _tile_ids(pid, SIZE: tl.constexpr):
    """The SIZE consecutive indices of program pid, in int64: offsets past 2**31 elements stay exact."""
    return tl.cast(pid, tl.int64) * SIZE + tl.arange(0, SIZE)


@triton.jit
def _quantize_kernel(x_ptr, thresholds_ptr, packed_ptr, absmax_ptr, numel, n_blocks,
                     BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    # A [blocks, elements-of-a-block] tile: the row max is the block's absmax.
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = _tile_ids(tl.program_id(0), BLOCKS_PER_PROGRAM)
    elem_idx = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    # Elements past the end read as 0.0, as the reference pads: the pad nibble of an odd numel is code(0).
    x = tl.load(x_ptr + elem_idx, mask=elem_idx < numel, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    # IEEE reciprocal (div.rn, not the approximate one): the thresholds are compared exactly.
    # An all-zero block gets 1/0 = inf and y = 0 * inf = NaN, which exceeds no threshold: code 0.
    y = x * tl.div_rn(tl.full([BLOCKS_PER_PROGRAM], 1.0, tl.float32), absmax)[:, None]
    code = tl.zeros([BLOCKS_PER_PROGRAM, BLOCKSIZE], dtype=tl.int32)
    for k in tl.static_range(15):
        code += (y > tl.load(thresholds_ptr + k)).to(tl.int32)
    # Element 2i to the high nibble, 2i+1 to the low one.
    hi, lo = tl.split(tl.reshape(code, [BLOCKS_PER_PROGRAM, HALF, 2]))
    byte_idx = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    tl.store(packed_ptr + byte_idx, ((hi << 4) | lo).to(tl.uint8), mask=byte_idx < (numel + 1) // 2)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)


@functools.lru_cache(maxsize=None)
def _device_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 thresholds and dynamic-map midpoints on device, copied there once (not per call)."""
    code = dynamic_map()
    return nf4_thresholds().to(device), ((code[1:] + code[:-1]) * 0.5).to(device)


# Elements per program of the quantise kernel (a [blocks, blocksize] tile).
QUANT_TILE = 4096


def quantize_nf4_blocks_triton(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of quantize_nf4_blocks_reference: the same bytes, one launch."""
    check_blocksize(blocksize)
    x = x.reshape(-1).contiguous()
    numel = x.numel()
    n_blocks = -(-numel // blocksize)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if numel == 0:
        return packed, absmax
    per_program = max(1, QUANT_TILE // blocksize)
    _quantize_kernel[(triton.cdiv(n_blocks, per_program),)](
        x, _device_tables(x.device)[0], packed, absmax, numel, n_blocks,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=per_program, num_warps=4,
    )
    return packed, absmax


@triton.jit
def _quantize_absmax_kernel(absmax_ptr, offset_ptr, midpoints_ptr, codes_ptr, nested_absmax_ptr, n,
                            NESTED_BLOCKSIZE: tl.constexpr):
    # One program per 256-block of block scales.
    pid = tl.program_id(0)
    idx = _tile_ids(pid, NESTED_BLOCKSIZE)
    mask = idx < n
    centered = tl.where(mask, tl.load(absmax_ptr + idx, mask=mask, other=0.0) - tl.load(offset_ptr), 0.0)
    scale = tl.max(tl.abs(centered), axis=0)
    y = centered * tl.div_rn(1.0, scale)
    # Nearest of the 256 map values = number of the 255 midpoints strictly below y (as bucketize):
    # a binary search, 8 steps of 128, 64, ..., 1. NaN (a block of zeros) stays at code 0.
    pos = tl.zeros([NESTED_BLOCKSIZE], dtype=tl.int32)
    for i in tl.static_range(8):
        step = 128 >> i
        probe = tl.load(midpoints_ptr + pos + (step - 1))
        pos = tl.where(probe < y, pos + step, pos)
    tl.store(codes_ptr + idx, pos.to(tl.uint8), mask=mask)
    tl.store(nested_absmax_ptr + pid, scale)


def quantize_absmax_triton(absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE):
    """Triton version of quantize_absmax_reference: the mean in torch (a global reduction), then one launch."""
    absmax = absmax.reshape(-1).to(torch.float32).contiguous()
    n = absmax.numel()
    offset = absmax.to(torch.float64).mean().to(torch.float32)
    n_nested = -(-n // nested_blocksize)
    codes = torch.empty(n, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(n_nested, dtype=torch.float32, device=absmax.device)
    if n:
        _quantize_absmax_kernel[(n_nested,)](absmax, offset, _device_tables(absmax.device)[1], codes, nested_absmax, n,
                                             NESTED_BLOCKSIZE=nested_blocksize, num_warps=4)
    return codes, nested_absmax, offset


def _quantize_nf4_blocks_fake(x, blocksize):
    numel = x.numel()
    return (x.new_empty((numel + 1) // 2, dtype=torch.uint8),
            x.new_empty(-(-numel // blocksize), dtype=torch.float32))


def _quantize_absmax_fake(absmax, nested_blocksize):
    n = absmax.numel()
    return (absmax.new_empty(n, dtype=torch.uint8),
            absmax.new_empty(-(-n // nested_blocksize), dtype=torch.float32),
            absmax.new_empty((), dtype=torch.float32))


@backend.dispatching_op("quantize_nf4_blocks", "(Tensor x, int blocksize) -> (Tensor, Tensor)",
                        _quantize_nf4_blocks_fake)
def _quantize_nf4_blocks_op(use_triton: bool):
    return quantize_nf4_blocks_triton if use_triton else quantize_nf4_blocks_reference


@backend.dispatching_op("quantize_absmax", "(Tensor absmax, int nested_blocksize) -> (Tensor, Tensor, Tensor)",
                        _quantize_absmax_fake)
def _quantize_absmax_op(use_triton: bool):
    return quantize_absmax_triton if use_triton else quantize_absmax_reference


def quantize_nf4_blocks(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching entry point: (packed, absmax) for a tensor of any shape (see backend.py)."""
    check_blocksize(blocksize)
    packed, absmax = torch.ops.qlora.quantize_nf4_blocks(x, blocksize)
    return packed, absmax


def quantize_absmax(absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE):
    """Dispatching entry point: (codes, nested_absmax, offset)."""
    codes, nested_absmax, offset = torch.ops.qlora.quantize_absmax(absmax, nested_blocksize)
    return codes, nested_absmax, offset
