"""x @ W^T and g @ W with W in NF4: the forward and input gradient of every quantised layer.

W [N, K] (out_features, in_features) stays in bitsandbytes' bytes; both directions read them as
they are (no transposed copy). Which kernel runs, for x with M rows (see also gemv.py):

  K % blocksize != 0   blocks straddle rows: dequantise (Triton) then cuBLAS. Correct, not fused;
                       real layers have in_features a multiple of 64.
  M <= GEMV_MAX_M      gemv.py: CUDA cores, every 4-bit weight read once, split-K.
  M <= SMALL_M         fused tiles (dequantise in registers, tl.dot) with BLOCK_M 16..64 and
                       split-K: still one read of W, the tensor cores do the multiply-adds.
  otherwise            fused tiles, 128 x 128 x 64, one warpgroup per CTA and two CTAs per SM,
                       split to fill a wave, while large_m.py's cost model puts them at or below
                       dequantise-to-scratch + cuBLAS (for the Llama shapes: at every M); beyond, that.

Large M is chosen by a model until a GPU measures both paths (bench/kernels.py times the
`dequant+cuBLAS` column beside the fused one): in the sm_90a build (bench/sass_report.py) each CTA
waits for its wgmma before decoding the next W tile, but its decode (~5.4-5.8 instructions per weight
element per 128 rows of x, 0.5-0.8 of its MMA time) can run while the other CTA's wgmma does.
"""
from __future__ import annotations

import torch

from qlora.kernels import backend, large_m
from qlora.kernels.dequantize import (_block_scales, _decode_bytes, _pair_table, _round_to, _row_byte_offsets,
                                      dequantize_nf4, dequantize_nf4_triton, weight_args)
from qlora.kernels.gemv import GEMV_MAX_M, choose_split, finish_split_k, nf4_gemv_triton, split_k_output
from qlora.kernels.quantize import NESTED_BLOCKSIZE

from qlora.kernels.backend import tl, triton

SMALL_M = 64


def _dequantize_matrix(packed, absmax, quant_map, out_features, in_features, blocksize,
                       nested_absmax, nested_code, offset, dtype) -> torch.Tensor:
    flat = dequantize_nf4(packed, absmax, quant_map, out_features * in_features, blocksize, dtype,
                          nested_absmax, nested_code, offset)
    return flat.view(out_features, in_features)


def nf4_linear_reference(x, packed, absmax, quant_map, out_features, in_features, blocksize,
                         nested_absmax=None, nested_code=None, offset=None, bias=None) -> torch.Tensor:
    w = _dequantize_matrix(packed, absmax, quant_map, out_features, in_features, blocksize,
                           nested_absmax, nested_code, offset, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def nf4_linear_grad_input_reference(grad_out, packed, absmax, quant_map, out_features, in_features, blocksize,
                                    nested_absmax=None, nested_code=None, offset=None) -> torch.Tensor:
    w = _dequantize_matrix(packed, absmax, quant_map, out_features, in_features, blocksize,
                           nested_absmax, nested_code, offset, grad_out.dtype)
    return grad_out @ w


@triton.jit
def _w_tile(byte, scale, table, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """W tile [ROWS, BLOCK_K] in float32 from its packed bytes [ROWS, BLOCK_K // 2] and one scale per
    row: each row of the tile lies in one quantisation block (BLOCK_K divides the blocksize and tiles
    start at multiples of BLOCK_K)."""
    hi, lo = _decode_bytes(table, tl.reshape(byte, [ROWS * (BLOCK_K // 2)]))
    w = tl.interleave(tl.reshape(hi, [ROWS, BLOCK_K // 2]), tl.reshape(lo, [ROWS, BLOCK_K // 2]))
    return w * scale[:, None]


@triton.jit
def _tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, row_blocks, k0,
                 BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                 ON_GPU: tl.constexpr):
    """Scales of the rows whose first block is row_blocks (int64, rows * (K // BLOCKSIZE)) at column k0."""
    blocks = row_blocks + k0 // BLOCKSIZE
    # Rows were clamped in range: the mask is always true (one compare per row, not per element).
    return _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks, blocks >= 0,
                         DOUBLE_QUANT, NESTED_BLOCKSIZE, ON_GPU)


@triton.jit
def _dot(a, b, acc, ON_GPU: tl.constexpr):
    # The interpreter multiplies bfloat16 operands as their integer bits: give it the same values
    # in float32 (exact). On the GPU: bf16 tensor-core MMA, float32 accumulation.
    if (not ON_GPU) and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _grouped_tile(pid, grid_m, grid_other, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid in grouped order: GROUP_M row-tiles of x in turn
    take each column tile, so that they share its W tile while it is in L2."""
    width = GROUP_M * grid_other
    first_m = (pid // width) * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit
def _nf4_linear_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, qmap_ptr,
                       bias_ptr, out_ptr, M, N, K, row_bytes, k_per_split,
                       HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                       DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, ON_GPU: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # out[M, N] = x[M, K] @ W[N, K]^T, W dequantised tile by tile in registers. row_bytes = K // 2, an
    # argument so that its divisibility by 16 is known and W's bytes load 16 at a time. With SPLIT_K > 1,
    # program (., s) sums k in [s * k_per_split, (s+1) * k_per_split) into float32 partials out[s].
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    split = tl.program_id(1)

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    table = _pair_table(qmap_ptr)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # Rows past M or N read the last row instead (finite, never stored): the loads need no masks, and
    # K is a multiple of BLOCK_K (it is one of the blocksize): no k masks. Pointers step by a tile.
    x_rows = tl.minimum(rm, M - 1)
    w_rows = tl.minimum(rn, N - 1).to(tl.int64)
    # k_start is a multiple of BLOCK_K: said, so that the loads stay 16 bytes wide.
    k_start = tl.multiple_of(k_start, BLOCK_K)
    x_ptrs = x_ptr + x_rows[:, None] * K + (k_start + tl.arange(0, BLOCK_K))[None, :]
    byte_ptrs = packed_ptr + _row_byte_offsets(w_rows, row_bytes, k_start // 2 + tl.arange(0, BLOCK_K // 2))
    row_blocks = w_rows * (K // BLOCKSIZE)
    for k0 in range(k_start, k_end, BLOCK_K):
        a = tl.load(x_ptrs)
        scale = _tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, row_blocks, k0,
                             BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, ON_GPU)
        w = _w_tile(tl.load(byte_ptrs), scale, table, BLOCK_N, BLOCK_K)
        acc = _dot(a, tl.trans(_round_to(w, dtype, ON_GPU)), acc, ON_GPU)
        x_ptrs += BLOCK_K
        byte_ptrs += BLOCK_K // 2

    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K > 1:
        out = out_ptr + split.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :]
        tl.store(out, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], _round_to(acc, out_ptr.dtype.element_ty, ON_GPU), mask=mask)


@triton.jit
def _nf4_linear_grad_input_kernel(g_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                  qmap_ptr, out_ptr, M, N, K, row_bytes, n_per_split,
                                  SPLIT_N: tl.constexpr, EVEN_N: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                                  NESTED_BLOCKSIZE: tl.constexpr, ON_GPU: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  GROUP_M: tl.constexpr):
    # out[M, K] = g[M, N] @ W[N, K]: the same [rows of W, k] tiles as the forward, used untransposed.
    # With SPLIT_N > 1, program (., s) sums n in [s * n_per_split, (s+1) * n_per_split) into float32
    # partials out[s].
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), K // BLOCK_K, GROUP_M)
    split = tl.program_id(1)

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    dtype = g_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    table = _pair_table(qmap_ptr)
    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    # Rows of g past M read its last row (never stored). Columns of g past N (the last tile) are
    # zeros, and W's rows past N read its last row (finite), so they add nothing.
    g_rows = g_ptr + tl.minimum(rm, M - 1)[:, None] * N
    for n0 in range(n_start, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        if EVEN_N:
            g = tl.load(g_rows + rn[None, :])
        else:
            g = tl.load(g_rows + rn[None, :], mask=(rn < N)[None, :], other=0.0)
        w_rows = tl.minimum(rn, N - 1).to(tl.int64)
        byte = tl.load(packed_ptr + _row_byte_offsets(w_rows, row_bytes, k0 // 2 + tl.arange(0, BLOCK_K // 2)))
        scale = _tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, w_rows * (K // BLOCKSIZE),
                             k0, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, ON_GPU)
        acc = _dot(g, _round_to(_w_tile(byte, scale, table, BLOCK_N, BLOCK_K), dtype, ON_GPU), acc, ON_GPU)
    if SPLIT_N > 1:
        tl.store(out_ptr + split.to(tl.int64) * M * K + rm[:, None] * K + rk[None, :], acc, mask=(rm < M)[:, None])
    else:
        tl.store(out_ptr + rm[:, None] * K + rk[None, :], _round_to(acc, out_ptr.dtype.element_ty, ON_GPU),
                 mask=(rm < M)[:, None])


# ctas_per_sm: what fits on an SM at once (registers, shared memory) in the sm_90a build, from
# bench/sass_report.py; the split-K rule launches at least one full wave of them.
def _fused_config(M: int, blocksize: int):
    block_k = min(64, blocksize)
    # Small M: 128 rows of W a step (64 a step spent ~1.3 more instructions per weight element on the
    # step's fixed work). Past 16 rows, 64-row wgmma tiles: 32-row ones build to mma.sync at 7.9 per
    # element, 64-row ones to wgmma at 5.2 (rows past M cost only tensor-core time, which is spare).
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=4, ctas_per_sm=3)
    if M <= SMALL_M:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=3, ctas_per_sm=2)
    # One warpgroup per CTA and two CTAs per SM (255 registers, 54 KB shared; three stages spill in
    # the bias epilogue): each CTA waits on its own wgmma, and while it does the other CTA's warps
    # decode their next W tile, so the SM's tensor cores and issue slots work at once (large_m.py).
    # 8 warps in one CTA would decode and multiply in lockstep.
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=2, ctas_per_sm=2)


def _grad_input_config(M: int, blocksize: int):
    block_k = min(64, blocksize)
    if M <= 16:  # as the forward (168 registers: 3 CTAs per SM; 64-row tiles the same)
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=4, ctas_per_sm=3)
    if M <= SMALL_M:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=3, ctas_per_sm=3)
    # As the forward: one warpgroup, two CTAs per SM (183 registers; two stages keep 87 KB shared).
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=2, ctas_per_sm=2)


def nf4_linear_fused(x2, packed, absmax, quant_map, N, K, blocksize, nested_absmax=None, nested_code=None,
                     offset=None, bias=None, split_k=None, config=None) -> torch.Tensor:
    """out [M, N] = x2 [M, K] @ W^T (+ bias) with the fused kernel (K % blocksize == 0)."""
    assert K % blocksize == 0, "fused tiles need whole blocks per row"
    M = x2.shape[0]
    cfg = dict(config or _fused_config(M, blocksize))
    cfg.setdefault("ctas_per_sm", 1)
    tiles = backend.cdiv(M, cfg["BLOCK_M"]) * backend.cdiv(N, cfg["BLOCK_N"])
    k_steps = K // cfg["BLOCK_K"]
    ctas_per_sm = cfg.pop("ctas_per_sm")
    split_k, k_per_split = choose_split(split_k, tiles, k_steps, cfg["BLOCK_K"], K, x2.device, ctas_per_sm)
    out = split_k_output(split_k, M, N, x2)
    weights = weight_args(packed, absmax, quant_map, nested_absmax, nested_code, offset)
    _nf4_linear_kernel[(tiles, split_k)](
        x2, *weights, bias if bias is not None else x2, out, M, N, K, K // 2, k_per_split,
        HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCKSIZE=blocksize, DOUBLE_QUANT=nested_absmax is not None,
        NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, ON_GPU=backend.on_gpu(x2), GROUP_M=8, **cfg,
    )
    return finish_split_k(out, split_k, bias, x2.dtype)


def nf4_linear_grad_input_fused(g2, packed, absmax, quant_map, N, K, blocksize, nested_absmax=None,
                                nested_code=None, offset=None, split_n=None, config=None) -> torch.Tensor:
    """out [M, K] = g2 [M, N] @ W with the fused kernel (K % blocksize == 0); N split like the
    forward's K when the output alone has too few tiles for a full wave."""
    assert K % blocksize == 0, "fused tiles need whole blocks per row"
    M = g2.shape[0]
    cfg = dict(config or _grad_input_config(M, blocksize))
    ctas_per_sm = cfg.pop("ctas_per_sm", 1)
    tiles = backend.cdiv(M, cfg["BLOCK_M"]) * (K // cfg["BLOCK_K"])
    n_steps = backend.cdiv(N, cfg["BLOCK_N"])
    split_n, n_per_split = choose_split(split_n, tiles, n_steps, cfg["BLOCK_N"], N, g2.device, ctas_per_sm)
    out = split_k_output(split_n, M, K, g2)
    weights = weight_args(packed, absmax, quant_map, nested_absmax, nested_code, offset)
    _nf4_linear_grad_input_kernel[(tiles, split_n)](
        g2, *weights, out, M, N, K, K // 2, n_per_split, SPLIT_N=split_n,
        EVEN_N=N % cfg["BLOCK_N"] == 0, BLOCKSIZE=blocksize,
        DOUBLE_QUANT=nested_absmax is not None, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, ON_GPU=backend.on_gpu(g2),
        GROUP_M=8, **cfg,
    )
    return finish_split_k(out, split_n, None, g2.dtype)


def nf4_linear_dequant_matmul(x2, packed, absmax, quant_map, N, K, blocksize, nested_absmax=None,
                              nested_code=None, offset=None, bias=None, transpose=False) -> torch.Tensor:
    """Dequantise W with the Triton kernel into the device's one scratch buffer (large_m.scratch),
    then cuBLAS: any K (blocks may straddle rows)."""
    w = dequantize_nf4_triton(packed, absmax, quant_map, N * K, blocksize, x2.dtype,
                              nested_absmax, nested_code, offset, scratch=large_m.scratch).view(N, K)
    return x2 @ w if transpose else torch.nn.functional.linear(x2, w, bias)


def nf4_linear_triton(x, packed, absmax, quant_map, out_features, in_features, blocksize,
                      nested_absmax=None, nested_code=None, offset=None, bias=None) -> torch.Tensor:
    N, K = out_features, in_features
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M == 0:
        out = x2.new_empty(0, N)
    elif M <= GEMV_MAX_M and not K % blocksize:
        out = nf4_gemv_triton(x2, packed, absmax, quant_map, N, K, blocksize, nested_absmax, nested_code, offset, bias)
    elif K % blocksize or x2.dtype == torch.float32 or not large_m.prefer_fused(M, N, K, "forward"):
        # float32 skips the fused tiles: tl.dot would round its inputs to TF32, while cuBLAS follows
        # torch's TF32 setting (off by default), as F.linear does. Large M: see large_m.py.
        out = nf4_linear_dequant_matmul(x2, packed, absmax, quant_map, N, K, blocksize,
                                        nested_absmax, nested_code, offset, bias)
    else:
        out = nf4_linear_fused(x2, packed, absmax, quant_map, N, K, blocksize, nested_absmax, nested_code, offset, bias)
    return out.view(*x.shape[:-1], N)


def nf4_linear_grad_input_triton(grad_out, packed, absmax, quant_map, out_features, in_features, blocksize,
                                 nested_absmax=None, nested_code=None, offset=None) -> torch.Tensor:
    N, K = out_features, in_features
    g2 = grad_out.reshape(-1, N).contiguous()
    if g2.shape[0] == 0:
        out = g2.new_empty(0, K)
    elif (K % blocksize or g2.dtype == torch.float32  # float32: cuBLAS, not TF32 tiles (see above)
          or not large_m.prefer_fused(g2.shape[0], N, K, "grad_input")):
        out = nf4_linear_dequant_matmul(g2, packed, absmax, quant_map, N, K, blocksize,
                                        nested_absmax, nested_code, offset, transpose=True)
    else:
        out = nf4_linear_grad_input_fused(g2, packed, absmax, quant_map, N, K, blocksize,
                                          nested_absmax, nested_code, offset)
    return out.view(*grad_out.shape[:-1], K)


# torch.library ops: opaque to torch.compile (kept in the graph, no break) and differentiable in x
# and bias (W is frozen). A layer's own autograd.Function may call them too.
_WEIGHT_SCHEMA = ("Tensor packed, Tensor absmax, Tensor quant_map, int out_features, int in_features, "
                  "int blocksize, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset")


def _nf4_linear_fake(x, packed, absmax, quant_map, out_features, in_features, blocksize,
                     nested_absmax, nested_code, offset, bias):
    return x.new_empty(*x.shape[:-1], out_features)


def _nf4_linear_grad_input_fake(grad_out, packed, absmax, quant_map, out_features, in_features, blocksize,
                                nested_absmax, nested_code, offset):
    return grad_out.new_empty(*grad_out.shape[:-1], in_features)


@backend.dispatching_op("nf4_linear", f"(Tensor x, {_WEIGHT_SCHEMA}, Tensor? bias) -> Tensor", _nf4_linear_fake)
def _nf4_linear_op(use_triton: bool):
    return nf4_linear_triton if use_triton else nf4_linear_reference


@backend.dispatching_op("nf4_linear_grad_input", f"(Tensor grad_out, {_WEIGHT_SCHEMA}) -> Tensor",
                        _nf4_linear_grad_input_fake)
def _nf4_linear_grad_input_op(use_triton: bool):
    return nf4_linear_grad_input_triton if use_triton else nf4_linear_grad_input_reference


def _setup_context(ctx, inputs, output):
    x, packed, absmax, quant_map, out_features, in_features, blocksize, nested_absmax, nested_code, offset, bias = inputs
    ctx.weight = (packed, absmax, quant_map, out_features, in_features, blocksize, nested_absmax, nested_code, offset)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.qlora.nf4_linear_grad_input(grad, *ctx.weight)
    if ctx.has_bias and ctx.needs_input_grad[10]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, None, None, None, grad_bias


_nf4_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerNF4Linear(torch.autograd.Function):
    """The op's autograd, for eager mode: the implementations called directly. torch.library's
    custom-op dispatch and autograd wrapper cost about 30 us of CPU per op on the 2-core machine
    (bench/host_overhead.py), as much as the launch work itself; torch.compile still sees the ops."""

    @staticmethod
    def forward(ctx, x, bias, weight):
        # weight: one tuple, not 9 arguments (W is frozen: autograd need not inspect its tensors).
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return backend.run_chosen(_nf4_linear_op_choice, (x, *weight, bias))

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = backend.run_chosen(_nf4_linear_grad_input_op_choice, (grad, *ctx.weight))
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def _nf4_linear_op_choice(use_triton: bool):
    return nf4_linear_triton if use_triton else nf4_linear_reference


def _nf4_linear_grad_input_op_choice(use_triton: bool):
    return nf4_linear_grad_input_triton if use_triton else nf4_linear_grad_input_reference


def nf4_linear(x, packed, absmax, quant_map, out_features, in_features, blocksize,
               nested_absmax=None, nested_code=None, offset=None, bias=None) -> torch.Tensor:
    """Dispatching entry point: x [..., in] @ W^T (+ bias) -> [..., out], in x's dtype. Eager mode
    calls the implementation (through _EagerNF4Linear when a gradient is wanted); under
    torch.compile the op stays one opaque node of the graph."""
    weight = (packed, absmax, quant_map, out_features, in_features, blocksize, nested_absmax, nested_code, offset)
    if torch.compiler.is_compiling():
        return torch.ops.qlora.nf4_linear(x, *weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _EagerNF4Linear.apply(x, bias, weight)
    return backend.run_chosen(_nf4_linear_op_choice, (x, *weight, bias))


def nf4_linear_grad_input(grad_out, packed, absmax, quant_map, out_features, in_features, blocksize,
                          nested_absmax=None, nested_code=None, offset=None) -> torch.Tensor:
    """Dispatching entry point: grad_out [..., out] @ W -> [..., in], reading the same bytes."""
    return torch.ops.qlora.nf4_linear_grad_input(grad_out, packed, absmax, quant_map, out_features, in_features,
                                                 blocksize, nested_absmax, nested_code, offset)
