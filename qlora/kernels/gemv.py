"""x @ W^T for a few rows of x (decoding: M = 1..GEMV_MAX_M) on CUDA cores, W in NF4.

At M = 1 the tensor cores have nothing to do: the time is the 4-bit bytes of W plus the decode.
So each 4-bit weight is read once, decoded by a byte-pair table built from quant_map, multiplied by x
and, at M = 1, summed in-thread over its 16-byte run; the block's scale is applied once per run, not
once per weight.
Too few output rows to fill the GPU are made up for by splitting K (float32 partials, summed in
a fixed order: deterministic).
"""
from __future__ import annotations

import functools

import torch

from qlora.kernels import backend
from qlora.kernels.dequantize import _block_scales, _decode_bytes, _pair_table, _round_to, weight_args
from qlora.kernels.quantize import NESTED_BLOCKSIZE

from qlora.kernels.backend import tl, triton

# Up to this many rows the CUDA cores keep up (M fused multiply-adds per decoded weight);
# beyond it matmul.py's tensor-core tiles take over.
GEMV_MAX_M = 4


# What a program costs beyond its steps, in steps: the prologue (table, pipeline fill) and storing
# its float32 partials, which the host sum reads back: a few steps' loads. A guess until a GPU tunes it.
PROGRAM_OVERHEAD_STEPS = 4


@functools.lru_cache(maxsize=4096)
def steps_per_split(tiles: int, k_steps: int, slots: int) -> int:
    """Steps of the reduced dimension per split that finish soonest when tiles output tiles share
    slots program slots (ctas_per_sm x SMs): time ~ waves x (steps per program + overhead), where
    waves = ceil(tiles x splits / slots). Ties go to fewer splits. A split count that overshoots a
    wave by a few programs costs a whole second wave: 4096x4096 at M = 128 on two slots per SM takes
    8 splits of 8 steps (256 programs, 0.97 of a wave), not 10 of 7 (320 programs, 1.2 waves)."""
    if tiles >= slots:
        return k_steps
    best = None
    for per in range(k_steps, 0, -1):  # descending: the first of equal cost has the fewest splits
        cost = -(-tiles * -(-k_steps // per) // slots) * (per + PROGRAM_OVERHEAD_STEPS)
        if best is None or cost < best[0]:
            best = (cost, per)
    return best[1]


def plan_split_k(split_k: int, k_steps: int, step: int, K: int) -> tuple[int, int]:
    """(splits, elements of K per split) for split_k splits asked of k_steps steps of step elements:
    clamped to 1..k_steps, then recounted so that no split is empty."""
    split_k = max(1, min(split_k, k_steps))
    k_per_split = (k_steps // split_k) * step  # rounded down: at least split_k splits, none empty
    return backend.cdiv(K, k_per_split), k_per_split


def choose_split(split: int | None, tiles: int, steps: int, step: int, length: int, device,
                 ctas_per_sm: int) -> tuple[int, int]:
    """(splits, elements per split) of the reduced dimension (length, in steps of step elements):
    `split` when given, else what steps_per_split finds quickest on this device."""
    if split is None:
        per = steps_per_split(tiles, steps, ctas_per_sm * backend.sm_count(device))
        return backend.cdiv(length, per * step), per * step
    return plan_split_k(split, steps, step, length)


def split_k_output(split_k: int, M: int, N: int, x2: torch.Tensor) -> torch.Tensor:
    """What a split-K launch writes: float32 partials [split_k, M, N], or with one split the
    [M, N] result itself in x2's dtype."""
    if split_k > 1:
        return torch.empty(split_k, M, N, dtype=torch.float32, device=x2.device)
    return torch.empty(M, N, dtype=x2.dtype, device=x2.device)


def finish_split_k(out: torch.Tensor, split_k: int, bias, dtype: torch.dtype) -> torch.Tensor:
    """The result from split_k_output's buffer after the launch (which adds the bias itself when
    there is one split): the partials summed in a fixed order (deterministic, unlike atomics),
    plus the bias, rounded once to dtype."""
    if split_k == 1:
        return out
    out = out.sum(0)
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(dtype)


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, qmap_ptr,
                     bias_ptr, out_ptr, M, N, K, row_bytes, k_per_split,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     NESTED_BLOCKSIZE: tl.constexpr, ON_GPU: tl.constexpr):
    # Tiles: W bytes [BLOCK_N rows, BLOCKS_K blocks, CHUNKS, CHUNK bytes]; x [M_PAD, BLOCKS_K, BLOCKSIZE].
    # A thread holds whole CHUNK-byte runs (one 16-byte load): it sums its run's products in its
    # own registers, then applies the block's scale once per run, not once per weight. acc keeps
    # one partial sum per run: the one cross-lane reduction comes after the K loop.
    HALF: tl.constexpr = BLOCKSIZE // 2
    CHUNK: tl.constexpr = 16 if HALF > 16 else HALF
    CHUNKS: tl.constexpr = HALF // CHUNK
    TILE_BYTES: tl.constexpr = BLOCK_N * BLOCKS_K * HALF
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rm = tl.arange(0, M_PAD).to(tl.int64)
    n_mask = rn < N
    m_mask = rm < M
    row_blocks = K // BLOCKSIZE
    table = _pair_table(qmap_ptr)
    ACC_LAST: tl.constexpr = CHUNKS if M_PAD == 1 else HALF
    acc = tl.zeros([M_PAD, BLOCK_N, BLOCKS_K, ACC_LAST], dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCKS_K * BLOCKSIZE):
        kb = k0 // BLOCKSIZE + tl.arange(0, BLOCKS_K)
        kb_mask = kb < row_blocks
        w_mask = n_mask[:, None] & kb_mask[None, :]
        byte_idx = ((rn * row_bytes)[:, None, None, None] + (kb * HALF)[None, :, None, None]
                    + (tl.arange(0, CHUNKS) * CHUNK)[None, None, :, None] + tl.arange(0, CHUNK)[None, None, None, :])
        byte = tl.load(packed_ptr + byte_idx, mask=w_mask[:, :, None, None], other=0)
        hi, lo = _decode_bytes(table, tl.reshape(byte, [TILE_BYTES]))
        scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                              rn[:, None] * row_blocks + kb[None, :], w_mask,
                              DOUBLE_QUANT, NESTED_BLOCKSIZE, ON_GPU)
        # Even elements meet the high nibbles, odd ones the low nibbles.
        x_idx = (rm * K)[:, None, None] + (kb * BLOCKSIZE)[None, :, None] + tl.arange(0, BLOCKSIZE)[None, None, :]
        x = tl.load(x_ptr + x_idx, mask=m_mask[:, None, None] & kb_mask[None, :, None], other=0.0).to(tl.float32)
        if M_PAD == 1:  # no row axis: the products keep the bytes' layout, so the run's sum stays in-thread
            hi = tl.reshape(hi, [BLOCK_N, BLOCKS_K, CHUNKS, CHUNK])
            lo = tl.reshape(lo, [BLOCK_N, BLOCKS_K, CHUNKS, CHUNK])
            x_even, x_odd = tl.split(tl.reshape(x, [BLOCKS_K, CHUNKS, CHUNK, 2]))
            run = tl.sum(hi * x_even[None, :, :, :] + lo * x_odd[None, :, :, :], axis=3)
            acc += (run * scale[:, :, None])[None, :, :, :]
        else:  # rows of x: a row axis in the products would spread a run over lanes; scale each weight
            hi = tl.reshape(hi, [BLOCK_N, BLOCKS_K, HALF]) * scale[:, :, None]
            lo = tl.reshape(lo, [BLOCK_N, BLOCKS_K, HALF]) * scale[:, :, None]
            x_even, x_odd = tl.split(tl.reshape(x, [M_PAD, BLOCKS_K, HALF, 2]))
            acc += hi[None, :, :, :] * x_even[:, None, :, :]
            acc += lo[None, :, :, :] * x_odd[:, None, :, :]
    acc2 = tl.sum(tl.sum(acc, axis=3), axis=2)  # the one cross-lane reduction

    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.store(out_ptr + split.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :], acc2, mask=mask)
    else:
        if HAS_BIAS:
            acc2 += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], _round_to(acc2, out_ptr.dtype.element_ty, ON_GPU),
                 mask=mask)


def nf4_gemv_triton(x2, packed, absmax, quant_map, N, K, blocksize, nested_absmax=None, nested_code=None,
                    offset=None, bias=None, split_k=None, block_n=None) -> torch.Tensor:
    """out [M, N] = x2 [M, K] @ W^T (+ bias) for M <= GEMV_MAX_M and K % blocksize == 0."""
    M = x2.shape[0]
    assert M <= GEMV_MAX_M and K % blocksize == 0 and blocksize >= 32
    # 64 weights a thread. At M = 1, 8 rows x 1024 columns a step: N / 8 programs fill an H100 from
    # N ~ 4096 without split-K (no partial sums to add on the host). At M >= 2, 16 rows x 256. A step
    # holds whole blocks: past those widths, fewer rows keep the tile (and the accumulator at M >= 2,
    # one partial sum per weight column) the same size instead of spilling.
    columns = 1024 if M == 1 else 256
    if block_n is None:
        block_n = max(1, (8 if M == 1 else 16) * columns // max(columns, blocksize))
    blocks_k = max(1, columns // blocksize)
    step = blocks_k * blocksize
    k_steps = backend.cdiv(K, step)
    tiles = backend.cdiv(N, block_n)
    # Programs per SM in the sm_90a build (bench/sass_report.py): 4 at M <= 2 (128 registers), 3 at M = 4.
    split_k, k_per_split = choose_split(split_k, tiles, k_steps, step, K, x2.device, ctas_per_sm=4 if M <= 2 else 3)
    out = split_k_output(split_k, M, N, x2)
    weights = weight_args(packed, absmax, quant_map, nested_absmax, nested_code, offset)
    _nf4_gemv_kernel[(tiles, split_k)](
        x2, *weights, bias if bias is not None else x2, out, M, N, K, K // 2, k_per_split,
        M_PAD=backend.next_power_of_2(M), BLOCK_N=block_n, BLOCKS_K=blocks_k, BLOCKSIZE=blocksize,
        HAS_BIAS=bias is not None, SPLIT_K=split_k, DOUBLE_QUANT=nested_absmax is not None,
        NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, ON_GPU=backend.on_gpu(x2), num_warps=4,
    )
    return finish_split_k(out, split_k, bias, x2.dtype)
