"""Blockwise FP4 quantisation: the bytes bitsandbytes' CUDA kernel writes for quant_type="fp4".

Per block: r = 1/absmax (IEEE float32), y = x*r; the code is the sign bit (y < 0) over the magnitude
code of rank #{k : |y| > T_k}, T being the 7 thresholds of codebook.FP4_THRESHOLD_BITS. Dequantising
needs nothing new: the table-driven NF4 kernels read FP4 codes through the FP4 quant_map.
"""
from __future__ import annotations

import functools

import torch

from qlora.codebook import FP4_CODE_OF_RANK, fp4_thresholds
from qlora.kernels import backend
from qlora.kernels.quantize import REFERENCE_CHUNK, QUANT_TILE, _quantize_nf4_blocks_fake, _tile_ids, check_blocksize

from qlora.kernels.backend import tl, triton


def fp4_codes_reference(y: torch.Tensor) -> torch.Tensor:
    """uint8 FP4 codes of float32 values y already divided by their block's absmax.

    As in the CUDA kernel: NaN (0 * inf, an all-zero block) fails every comparison and gets code 0;
    -0.0 is not below zero and gets code 0; a tiny negative y gets 0b1000."""
    # bucketize counts the thresholds strictly below |y| (a tie goes to the smaller magnitude), but
    # counts NaN as above them all: hence NaN -> 0 first.
    rank = torch.bucketize(torch.nan_to_num(y.abs(), nan=0.0), fp4_thresholds().to(y.device), out_int32=True)
    codes = torch.tensor(FP4_CODE_OF_RANK, dtype=torch.uint8, device=y.device)[rank]
    return codes | ((y < 0).to(torch.uint8) << 3)


def _empty_outputs(numel: int, blocksize: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (packed uint8 [(numel+1)//2], absmax float32 [n_blocks]), for the quantiser to fill."""
    return (torch.empty((numel + 1) // 2, dtype=torch.uint8, device=device),
            torch.empty(-(-numel // blocksize), dtype=torch.float32, device=device))


def quantize_fp4_blocks_reference(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a tensor of any shape to FP4: (packed uint8 [(n+1)//2], absmax float32 [n_blocks]).

    Element 2i goes to the high nibble of byte i, 2i+1 to the low one; the pad nibble of an odd
    numel is code 0. Works through the tensor in chunks of whole blocks (an even number of
    elements, so no byte straddles two chunks): memory stays near a few times the chunk."""
    check_blocksize(blocksize)
    flat = x.reshape(-1)
    packed, absmax = _empty_outputs(flat.numel(), blocksize, x.device)
    step = max(REFERENCE_CHUNK // blocksize, 1) * blocksize
    for start in range(0, flat.numel(), step):
        values = flat[start:start + step].to(torch.float32)
        count = values.numel()
        blocks = torch.nn.functional.pad(values, (0, -count % blocksize)).view(-1, blocksize)
        scale = blocks.abs().amax(dim=1)
        codes = fp4_codes_reference(blocks * torch.reciprocal(scale)[:, None]).view(-1)[: count + count % 2]
        packed[start // 2:start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
        absmax[start // blocksize:start // blocksize + scale.numel()] = scale
    return packed, absmax


@triton.jit
def _fp4_code(y, thresholds_ptr, rank_codes_ptr):
    # Rank = thresholds strictly below |y| (none for NaN), mapped to its magnitude code, plus the sign.
    magnitude = tl.abs(y)
    rank = tl.zeros(y.shape, dtype=tl.int32)
    for k in tl.static_range(7):
        rank += (magnitude > tl.load(thresholds_ptr + k)).to(tl.int32)
    return tl.load(rank_codes_ptr + rank) | tl.where(y < 0, 0b1000, 0)


@triton.jit
def _quantize_fp4_kernel(x_ptr, thresholds_ptr, rank_codes_ptr, packed_ptr, absmax_ptr, numel, n_blocks,
                         BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    # A [blocks, bytes-of-a-block] tile, read as two interleaved halves: element 2i (high nibble)
    # and element 2i+1 (low nibble) of each byte, so packing needs no reshuffle.
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = _tile_ids(tl.program_id(0), BLOCKS_PER_PROGRAM)
    byte_idx = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    high = tl.load(x_ptr + 2 * byte_idx, mask=2 * byte_idx < numel, other=0.0).to(tl.float32)
    low = tl.load(x_ptr + 2 * byte_idx + 1, mask=2 * byte_idx + 1 < numel, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(high), axis=1), tl.max(tl.abs(low), axis=1))
    # IEEE reciprocal: the thresholds are compared exactly. 1/0 = inf makes an all-zero block NaN: code 0.
    reciprocal = tl.div_rn(tl.full([BLOCKS_PER_PROGRAM], 1.0, tl.float32), absmax)[:, None]
    byte = (_fp4_code(high * reciprocal, thresholds_ptr, rank_codes_ptr) << 4) \
        | _fp4_code(low * reciprocal, thresholds_ptr, rank_codes_ptr)
    tl.store(packed_ptr + byte_idx, byte.to(tl.uint8), mask=byte_idx < (numel + 1) // 2)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)


@functools.lru_cache(maxsize=None)
def _device_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 thresholds and rank -> code table on device, copied there once."""
    return fp4_thresholds().to(device), torch.tensor(FP4_CODE_OF_RANK, dtype=torch.int32, device=device)


def quantize_fp4_blocks_triton(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of quantize_fp4_blocks_reference: the same bytes, one launch."""
    check_blocksize(blocksize)
    flat = x.reshape(-1).contiguous()
    packed, absmax = _empty_outputs(flat.numel(), blocksize, x.device)
    if flat.numel():
        per_program = max(1, QUANT_TILE // blocksize)
        _quantize_fp4_kernel[(triton.cdiv(absmax.numel(), per_program),)](
            flat, *_device_tables(x.device), packed, absmax, flat.numel(), absmax.numel(),
            BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=per_program, num_warps=4,
        )
    return packed, absmax


# The same op shape as NF4's (packed bytes, absmax per block), so its fake serves under torch.compile.
backend.dispatching_op("quantize_fp4_blocks", "(Tensor x, int blocksize) -> (Tensor, Tensor)",
                       _quantize_nf4_blocks_fake)(
    lambda use_triton: quantize_fp4_blocks_triton if use_triton else quantize_fp4_blocks_reference)


def quantize_fp4_blocks(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching entry point: (packed, absmax) for a tensor of any shape; Triton on CUDA tensors,
    the reference on CPU ones (see backend.py), a torch.library op that torch.compile keeps."""
    check_blocksize(blocksize)
    return tuple(torch.ops.qlora.quantize_fp4_blocks(x, blocksize))
