"""Blockwise NF4 quantisation and 8-bit double quantisation of the block scales.

The torch reference here is the definition: bitsandbytes' CUDA bytes, computed in chunks so
that memory stays near twice the chunk whatever the tensor's size.
"""
from __future__ import annotations

import torch

from qlora.codebook import dynamic_map, nf4_thresholds

# Elements per chunk of the reference (a multiple of every allowed blocksize).
REFERENCE_CHUNK = 1 << 22
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


def quantize_nf4_blocks(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching entry point: (packed, absmax) for a tensor of any shape."""
    return quantize_nf4_blocks_reference(x, blocksize)


def quantize_absmax(absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE):
    """Dispatching entry point: (codes, nested_absmax, offset)."""
    return quantize_absmax_reference(absmax, nested_blocksize)
