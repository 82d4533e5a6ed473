"""Blockwise NF4 quantisation and 8-bit double quantisation of the block scales.

The torch reference here is the definition: bitsandbytes' CUDA bytes, computed in chunks so
that memory stays near twice the chunk whatever the tensor's size.
"""
from __future__ import annotations

import functools

import torch

from qlora.codebook import dynamic_map, nf4_thresholds, quant_table
from qlora.kernels import backend

from qlora.kernels.backend import tl, triton

# Elements per chunk of the reference (a multiple of every allowed blocksize).
REFERENCE_CHUNK = 1 << 20
NESTED_BLOCKSIZE = 256


def check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")


def count_nonfinite(x: torch.Tensor) -> int:
    """NaN and Inf elements of x, counted a chunk at a time (no temporary of x's size)."""
    flat = x.detach().reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + REFERENCE_CHUNK])).sum()) for i in range(0, flat.numel(), REFERENCE_CHUNK))


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


# The NF4 code by bins: y in [-1, 1] falls in bin floor((y + 1) * 16) of 32 (33 with y = 1). Each bin
# holds at most one threshold, none within 1/40 of a bin's width from its edges, so the bin that the
# float32 arithmetic picks is the true one, and code = (thresholds below the bin) + (y > the bin's own
# threshold): one table lookup and one exact compare instead of a 15-way or a 4-step search.
CODE_BINS = 32


def nf4_bin_table() -> torch.Tensor:
    """int64 [64]: per bin, the bits of its threshold (float32, +inf if none) in the high word and the
    number of thresholds below the bin in the low word. Checked: one threshold per bin, far from edges."""
    thresholds = nf4_thresholds()
    position = (thresholds.double() + 1) * (CODE_BINS // 2)
    bins = position.floor().long()
    if bins.unique().numel() != bins.numel() or float((position - position.round()).abs().min()) < 0.02:
        raise AssertionError("NF4 thresholds do not separate into bins")  # a fact of the fixed table
    threshold = torch.full((64,), float("inf"))
    threshold[bins] = thresholds
    below = torch.tensor([int((bins < b).sum()) for b in range(64)], dtype=torch.int64)
    return (threshold.view(torch.int32).to(torch.int64) << 32) | below


@triton.jit
def _nf4_code(y, table, SIZE: tl.constexpr, ON_GPU: tl.constexpr):
    """Number of the 15 thresholds strictly below y (0..15) from nf4_bin_table; NaN (an all-zero
    block) gets code 0: bin 0 holds no threshold, and NaN exceeds none."""
    position = y * 16.0 + 16.0
    if ON_GPU:  # cvt.rzi takes NaN to 0 (PTX's rule; LLVM's fptosi leaves it undefined)
        bin_idx = tl.inline_asm_elementwise("cvt.rzi.s32.f32 $0, $1;", "=r,r", [position], dtype=tl.int32,
                                            is_pure=True, pack=1)
    else:
        bin_idx = tl.where(position == position, position, 0.0).to(tl.int32)
    entry = tl.reshape(tl.gather(table, tl.reshape(bin_idx, [SIZE]), 0), y.shape)
    threshold = (entry >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    if ON_GPU:  # set.gt gives the all-ones mask (-1) for true: one instruction, no select
        above = tl.inline_asm_elementwise("set.gt.s32.f32 $0, $1, $2;", "=r,r,r", [y, threshold],
                                          dtype=tl.int32, is_pure=True, pack=1)
        return entry.to(tl.int32) - above
    else:
        return entry.to(tl.int32) + (y > threshold).to(tl.int32)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_tile(x_ptr, table, packed_ptr, absmax_ptr, tile, numel, elem_limit, n_blocks,
                   BLOCKSIZE: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr, MASKED: tl.constexpr,
                   ON_GPU: tl.constexpr):
    # A [blocks, elements-of-a-block] tile: the row max is the block's absmax. The packed output is
    # padded to whole tiles; only the last tile is masked, and its mask (elem_limit) ends on a 16-byte
    # segment: loads and stores stay wide.
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = _tile_ids(tile, BLOCKS_PER_TILE)
    elem_idx = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    if MASKED:
        x = tl.load(x_ptr + elem_idx, mask=elem_idx < elem_limit, other=0.0).to(tl.float32)
        # Elements past the end count as 0.0, as the reference pads: the pad nibble of an odd numel is code(0).
        x = tl.where(elem_idx < numel, x, 0.0)
    else:
        x = tl.load(x_ptr + elem_idx).to(tl.float32)
    # A NaN anywhere makes the block's absmax NaN (as torch's amax): quantize_nf4 checks the
    # scales, 1/blocksize of the input, for NaN and Inf instead of reading the input twice.
    if ON_GPU:
        absmax = tl.reduce(tl.abs(x), 1, _max_keeping_nan)
    else:  # the interpreter's max drops NaN, and a Python combine function is very slow there
        absmax = tl.max(tl.abs(x), axis=1)
        absmax = tl.where(tl.max((x != x).to(tl.int32), axis=1) > 0, float("nan"), absmax)
    # IEEE reciprocal (div.rn, not the approximate one): the thresholds are compared exactly.
    # An all-zero block gets 1/0 = inf and y = 0 * inf = NaN, which exceeds no threshold: code 0.
    y = x * tl.div_rn(tl.full([BLOCKS_PER_TILE], 1.0, tl.float32), absmax)[:, None]
    code = _nf4_code(y, table, BLOCKS_PER_TILE * BLOCKSIZE, ON_GPU)
    # Element 2i to the high nibble, 2i+1 to the low one.
    hi, lo = tl.split(tl.reshape(code, [BLOCKS_PER_TILE, HALF, 2]))
    byte_idx = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    tl.store(packed_ptr + byte_idx, ((hi << 4) | lo).to(tl.uint8))
    if MASKED:
        tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)
    else:
        tl.store(absmax_ptr + blocks, absmax)


@triton.jit
def _quantize_kernel(x_ptr, bin_table_ptr, packed_ptr, absmax_ptr, numel, elem_limit, n_blocks, full_tiles,
                     BLOCKSIZE: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr, HAS_TAIL: tl.constexpr,
                     ON_GPU: tl.constexpr):
    # Persistent: the table is read once per program, whole tiles go unmasked, the one partial tile last.
    table = tl.load(bin_table_ptr + tl.arange(0, 64))
    for tile in range(tl.program_id(0), full_tiles, tl.num_programs(0)):
        _quantize_tile(x_ptr, table, packed_ptr, absmax_ptr, tile, numel, elem_limit, n_blocks,
                       BLOCKSIZE, BLOCKS_PER_TILE, False, ON_GPU)
    if HAS_TAIL:
        if tl.program_id(0) == full_tiles % tl.num_programs(0):
            _quantize_tile(x_ptr, table, packed_ptr, absmax_ptr, full_tiles, numel, elem_limit, n_blocks,
                           BLOCKSIZE, BLOCKS_PER_TILE, True, ON_GPU)


@functools.lru_cache(maxsize=None)
def device_code_table(name: str, device: torch.device) -> torch.Tensor:
    """A 4-bit type's 16 values ("nf4", "fp4") or the dynamic map ("dynamic") on device, copied there
    once: callers clone it (a device-side copy) instead of copying from pageable host memory each time."""
    return (dynamic_map() if name == "dynamic" else quant_table(name)).to(device)


@functools.lru_cache(maxsize=None)
def _device_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 bin table and the dynamic-map midpoints on device, copied there once (not per call)."""
    code = dynamic_map()
    return nf4_bin_table().to(device), ((code[1:] + code[:-1]) * 0.5).to(device)


def segment_limit(t: torch.Tensor, numel: int) -> int:
    """Elements a kernel may read from t: numel rounded up to the end of t's last 16-byte segment in
    memory. A 16-byte aligned segment never crosses a page, so the extra elements are readable (the
    kernels never use them), and a multiple of 16 bytes lets the loads stay 16 bytes wide."""
    size = t.element_size()
    misalign = t.data_ptr() % 16
    return (-(-(misalign + numel * size) // 16) * 16 - misalign) // size


# Elements per program of the quantise kernel (a [blocks, blocksize] tile).
QUANT_TILE = 8192
# Programs per SM of the persistent quantise: what 127 registers a thread allow (bench/sass_report.py).
QUANT_PROGRAMS_PER_SM = 4


def quantize_nf4_blocks_triton(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of quantize_nf4_blocks_reference: the same bytes, one launch."""
    check_blocksize(blocksize)
    x = x.reshape(-1).contiguous()
    numel = x.numel()
    n_blocks = -(-numel // blocksize)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), absmax
    per_tile = max(1, QUANT_TILE // blocksize)
    tile_elements = per_tile * blocksize
    tiles = -(-numel // tile_elements)
    packed = torch.empty(tiles * tile_elements // 2, dtype=torch.uint8, device=x.device)
    _quantize_kernel[(min(tiles, QUANT_PROGRAMS_PER_SM * backend.sm_count(x.device)),)](
        x, _device_tables(x.device)[0], packed, absmax, numel, segment_limit(x, numel), n_blocks,
        numel // tile_elements, BLOCKSIZE=blocksize, BLOCKS_PER_TILE=per_tile,
        HAS_TAIL=numel % tile_elements != 0, ON_GPU=backend.on_gpu(x), num_warps=4,
    )
    return packed[:(numel + 1) // 2], absmax


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
