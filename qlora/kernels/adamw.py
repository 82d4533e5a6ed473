"""The AdamW update over many tensors in one launch, beside its torch reference.

The update is torch.optim.AdamW's, in float32 whatever the parameter dtype:
    g  = -g if maximize
    p *= 1 - lr * weight_decay                  (decoupled weight decay)
    m  = lerp(m, g, 1 - beta1)
    v  = v * beta2 + (1 - beta2) * g * g
    v_max = max(v_max, v), used for v below     (amsgrad only)
    p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
with g optionally scaled by a gradient-clipping factor that lives on the device. maximize and
amsgrad are per-tensor values in the scalar table, like the learning rate: one compiled kernel
serves every mix of param groups.

The kernel walks a table of chunks. A chunk is CHUNK consecutive elements of one tensor;
its parameter and gradient are found through a per-tensor table of offsets, its states
(exp_avg, exp_avg_sq and, for amsgrad, max_exp_avg_sq) through a page table (see
qlora/optim.py): one launch covers hundreds of tensors and any mix of state locations, with no host synchronisation. Offsets are in elements
from a base tensor passed to the launch, so the compiler sees a 16-byte-aligned base
and (with the alignment hint) keeps its vectorised loads.
"""
from __future__ import annotations

from typing import Sequence

import torch

from qlora.kernels.backend import tl, triton

# Elements per chunk (one program). State ranges are aligned to it, so no chunk crosses a page.
CHUNK = 2048
# Columns of the scalar table: one float32 row per tensor.
# decay, 1 - beta1, beta2, 1 - beta2, step_size, sqrt(bias_correction2), eps, gradient sign (-1 to
# maximize), amsgrad (1 or 0)
SCALAR_COLUMNS = 9
TENSOR_COLUMNS = 3  # parameter offset, gradient offset (elements from their bases), numel
CHUNK_COLUMNS = 4   # tensor, first element in the tensor, page, element offset in the page
PAGE_COLUMNS = 3    # exp_avg, exp_avg_sq, max_exp_avg_sq offsets (the last read only for amsgrad)


def adamw_scalars(
    lr: torch.Tensor, beta1: torch.Tensor, beta2: torch.Tensor, eps: torch.Tensor,
    weight_decay: torch.Tensor, step: torch.Tensor,
    maximize: torch.Tensor | None = None, amsgrad: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 [n, SCALAR_COLUMNS] scalar rows from float64 [n] hyperparameters and step counts
    (maximize and amsgrad: 1.0 or 0.0 per tensor, default 0).

    Computed in float64 like torch's Python-float scalars, rounded to float32 once where
    they are used, so the kernel multiplies by the same float32 numbers torch does.
    """
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return torch.stack(
        [
            1.0 - lr * weight_decay,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            lr / bias_correction1,
            bias_correction2 ** 0.5,
            eps,
            torch.ones_like(lr) if maximize is None else 1.0 - 2.0 * maximize,
            torch.zeros_like(lr) if amsgrad is None else amsgrad,
        ],
        dim=1,
    )


def adamw_update_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    scalars: Sequence[float],
    clip_factor: torch.Tensor | None = None,
    max_exp_avg_sq: torch.Tensor | None = None,
) -> None:
    """One AdamW step on one tensor (any dtype) with float32 states, in place.

    The same ops in the same order as torch.optim.AdamW's single-tensor path, so float32
    parameters come out bit-identical to it; other dtypes are updated in float32 and
    rounded once. max_exp_avg_sq is needed (and updated) when the row asks for amsgrad.
    """
    decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps = scalars[:7]
    grad_sign, amsgrad = scalars[7], scalars[8]
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("amsgrad needs max_exp_avg_sq")
    g = grad.to(torch.float32)
    if clip_factor is not None:
        g = g * clip_factor.to(device=g.device, dtype=torch.float32)
    if grad_sign < 0:
        g = -g  # a new tensor: the caller's gradient stays as it was
    p = param if param.dtype == torch.float32 else param.to(torch.float32)
    p.mul_(decay)
    exp_avg.lerp_(g, one_minus_beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=one_minus_beta2)
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    if p is not param:
        param.copy_(p)


def grad_clip_factor(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (total L2 norm + 1e-6)) as a float32 device tensor, without a host sync.

    The same factor torch.nn.utils.clip_grad_norm_ applies. Gradients on several devices
    are reduced on the first one's device.
    """
    device = grads[0].device
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for group in by_device.values():
        # Accumulated and returned in float32 whatever the gradients' dtype.
        norms.extend(n.to(device=device, non_blocking=True)
                     for n in torch._foreach_norm(group, 2.0, dtype=torch.float32))
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0).reshape(1)


def make_chunks(tensor_ids: Sequence[int], numels: Sequence[int], state_starts: Sequence[int],
                page_numel: int) -> torch.Tensor:
    """int64 [n_chunks, 4] chunk rows for tensors whose states start at state_starts.

    state_starts are element offsets into a paged state space of page_numel-element pages;
    both must be multiples of CHUNK. Rows come out in the order of the tensors given.
    """
    if page_numel % CHUNK:
        raise ValueError(f"page_numel must be a multiple of {CHUNK}, got {page_numel}")
    ids = torch.as_tensor(list(tensor_ids), dtype=torch.int64)
    numels = torch.as_tensor(list(numels), dtype=torch.int64)
    starts = torch.as_tensor(list(state_starts), dtype=torch.int64)
    if bool((starts % CHUNK).any()):
        raise ValueError(f"state starts must be multiples of {CHUNK}")
    counts = (numels + CHUNK - 1) // CHUNK
    owner = torch.repeat_interleave(torch.arange(len(ids)), counts)
    first_chunk_of_owner = torch.cumsum(counts, 0) - counts
    element = (torch.arange(int(counts.sum())) - first_chunk_of_owner[owner]) * CHUNK
    flat = starts[owner] + element
    return torch.stack([ids[owner], element, flat // page_numel, flat % page_numel], dim=1)


def tensor_rows(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> tuple[list[int], int, int]:
    """Per-tensor rows (flattened) relative to params[0] and grads[0], and the alignment
    (elements) every parameter and gradient offset is known to have."""
    param_base, grad_base = params[0].data_ptr(), grads[0].data_ptr()
    p_size, g_size = params[0].element_size(), grads[0].element_size()
    rows: list[int] = []
    all_aligned = True
    for p, g in zip(params, grads):
        p_addr, g_addr = p.data_ptr(), g.data_ptr()
        all_aligned = all_aligned and p_addr % 16 == 0 and g_addr % 16 == 0
        rows += ((p_addr - param_base) // p_size, (g_addr - grad_base) // g_size, p.numel())
    if not all_aligned:
        return rows, 1, 1
    return rows, 16 // p_size, 16 // g_size


@triton.jit
def _round_to_bfloat16(x):
    # Round to nearest even in integer arithmetic: the interpreter's float cast truncates,
    # this gives the GPU's (and torch's) bits everywhere.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a quiet NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

@triton.jit
def _adamw_chunks_kernel(
    param_base_ptr, grad_base_ptr, state_base_ptr,
    tensor_table_ptr, scalars_ptr, chunk_table_ptr, page_table_ptr, clip_factor_ptr,
    first_chunk,
    HAS_CLIP: tl.constexpr, PARAM_ALIGN: tl.constexpr, GRAD_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk_row = chunk_table_ptr + (first_chunk + tl.program_id(0)).to(tl.int64) * 4
    tensor = tl.load(chunk_row)
    # Chunks start at multiples of BLOCK in their tensor and page: telling the compiler (with the
    # bases' alignment) is what keeps the loads and stores 16 bytes wide.
    start = tl.multiple_of(tl.load(chunk_row + 1), BLOCK)
    page = tl.load(chunk_row + 2)
    in_page = tl.multiple_of(tl.load(chunk_row + 3), BLOCK)

    tensor_row = tensor_table_ptr + tensor * 3
    param_off = tl.multiple_of(tl.load(tensor_row), PARAM_ALIGN) + start
    grad_off = tl.multiple_of(tl.load(tensor_row + 1), GRAD_ALIGN) + start
    numel = tl.load(tensor_row + 2)
    # Pages are allocator blocks and in_page is a multiple of CHUNK: always 16-byte aligned.
    page_row = page_table_ptr + page * 3
    exp_avg_off = tl.multiple_of(tl.load(page_row), 4) + in_page
    exp_avg_sq_off = tl.multiple_of(tl.load(page_row + 1), 4) + in_page

    scalar_row = scalars_ptr + tensor * 9
    decay = tl.load(scalar_row)
    one_minus_beta1 = tl.load(scalar_row + 1)
    beta2 = tl.load(scalar_row + 2)
    one_minus_beta2 = tl.load(scalar_row + 3)
    step_size = tl.load(scalar_row + 4)
    bias_correction2_sqrt = tl.load(scalar_row + 5)
    eps = tl.load(scalar_row + 6)
    grad_sign = tl.load(scalar_row + 7)
    amsgrad = tl.load(scalar_row + 8) != 0.0
    clip = 1.0
    if HAS_CLIP:
        clip = tl.load(clip_factor_ptr)
    # Read only under amsgrad: without it the page table's third column may point nowhere.
    max_off = exp_avg_off
    if amsgrad:
        max_off = tl.multiple_of(tl.load(page_row + 2), 4) + in_page

    offsets = tl.arange(0, BLOCK)
    p_ptrs = param_base_ptr + param_off + offsets
    g_ptrs = grad_base_ptr + grad_off + offsets
    m_ptrs = state_base_ptr + exp_avg_off + offsets
    v_ptrs = state_base_ptr + exp_avg_sq_off + offsets
    max_ptrs = state_base_ptr + max_off + offsets
    # Whole chunks go unmasked: a mask against a numel read from memory would stop the
    # compiler from vectorising; only a tensor's last chunk pays for one.
    if start + BLOCK <= numel:
        _adamw_block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, max_ptrs, offsets < BLOCK, clip, grad_sign, amsgrad, decay,
                     one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
                     HAS_CLIP, False)
    else:
        _adamw_block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, max_ptrs, start + offsets < numel, clip, grad_sign, amsgrad,
                     decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
                     HAS_CLIP, True)


@triton.jit
def _adamw_block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, max_ptrs, mask, clip, grad_sign, amsgrad, decay, one_minus_beta1,
                 beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
                 HAS_CLIP: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        p = tl.load(p_ptrs, mask=mask).to(tl.float32)
        g = tl.load(g_ptrs, mask=mask).to(tl.float32)
        m = tl.load(m_ptrs, mask=mask)
        v = tl.load(v_ptrs, mask=mask)
    else:
        p = tl.load(p_ptrs).to(tl.float32)
        g = tl.load(g_ptrs).to(tl.float32)
        m = tl.load(m_ptrs)
        v = tl.load(v_ptrs)
    if HAS_CLIP:
        g = g * clip
    g = g * grad_sign  # -1 to maximize: an exact negation

    p = p * decay
    # torch's lerp: two formulas that meet at weight 0.5, each exact at its own end, one fma each.
    small_weight = one_minus_beta1 < 0.5
    m = tl.fma(tl.where(small_weight, one_minus_beta1, one_minus_beta1 - 1.0), g - m, tl.where(small_weight, m, g))
    v = v * beta2 + one_minus_beta2 * g * g
    second_moment = v
    if amsgrad:
        if MASKED:
            v_max = tl.load(max_ptrs, mask=mask)
        else:
            v_max = tl.load(max_ptrs)
        # torch.maximum propagates NaN; Triton's default maximum would drop it.
        second_moment = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
        if MASKED:
            tl.store(max_ptrs, second_moment, mask=mask)
        else:
            tl.store(max_ptrs, second_moment)
    # Round-to-nearest sqrt and division: Triton's defaults are the approximate ones.
    denom = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    if p_ptrs.dtype.element_ty == tl.bfloat16:
        p_out = _round_to_bfloat16(p)
    else:
        p_out = p.to(p_ptrs.dtype.element_ty)
    if MASKED:
        tl.store(p_ptrs, p_out, mask=mask)
        tl.store(m_ptrs, m, mask=mask)
        tl.store(v_ptrs, v, mask=mask)
    else:
        tl.store(p_ptrs, p_out)
        tl.store(m_ptrs, m)
        tl.store(v_ptrs, v)


def adamw_chunks_(
    param_base: torch.Tensor,
    grad_base: torch.Tensor,
    state_base: torch.Tensor,
    tensor_table: torch.Tensor,
    scalars: torch.Tensor,
    chunk_table: torch.Tensor,
    page_table: torch.Tensor,
    clip_factor: torch.Tensor | None = None,
    first_chunk: int = 0,
    n_chunks: int | None = None,
    param_align: int = 1,
    grad_align: int = 1,
) -> None:
    """Launch the fused update over chunks [first_chunk, first_chunk + n_chunks) of chunk_table.

    Every parameter has param_base's dtype and every gradient grad_base's (one launch per
    dtype pair). tensor_table: int64 [n, 3] rows from tensor_rows; scalars: float32
    [n, SCALAR_COLUMNS] from adamw_scalars; chunk_table: int64 [c, 4] from make_chunks;
    page_table: int64 [pages, 3], the exp_avg, exp_avg_sq and max_exp_avg_sq offsets (float32
    elements from state_base) of each page (the last read only for amsgrad tensors). All on
    the parameters' device.
    """
    if n_chunks is None:
        n_chunks = chunk_table.shape[0] - first_chunk
    if n_chunks <= 0:
        return
    if state_base.dtype != torch.float32 or scalars.dtype != torch.float32:
        raise TypeError("states and scalars must be float32")
    _adamw_chunks_kernel[(n_chunks,)](
        param_base, grad_base, state_base,
        tensor_table, scalars, chunk_table, page_table,
        clip_factor if clip_factor is not None else scalars,
        first_chunk,
        HAS_CLIP=clip_factor is not None, PARAM_ALIGN=param_align, GRAD_ALIGN=grad_align,
        BLOCK=CHUNK, num_warps=4,
    )


def fused_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    scalars: torch.Tensor,
    clip_factor: torch.Tensor | None = None,
    max_exp_avg_sqs: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """One launch updating many contiguous tensors that each own their float32 states.

    params share a dtype, grads share a dtype; scalars is float [n, SCALAR_COLUMNS]
    (adamw_scalars). Each tensor's (exp_avg, exp_avg_sq, max_exp_avg_sq) serves as its own
    page; max_exp_avg_sqs[i] is needed where row i asks for amsgrad.
    """
    device = params[0].device
    rows, param_align, grad_align = tensor_rows(params, grads)
    state_base = exp_avgs[0]
    maxima = _amsgrad_states(scalars, max_exp_avg_sqs, len(params))
    pages = []
    for m, v, v_max in zip(exp_avgs, exp_avg_sqs, maxima):
        states = (m, v) if v_max is None else (m, v, v_max)
        if any(t.dtype != torch.float32 for t in states):
            raise TypeError("exp_avg, exp_avg_sq and max_exp_avg_sq must be float32")
        pages += [(t.data_ptr() - state_base.data_ptr()) // 4 for t in states] + [0] * (3 - len(states))
    # The kernel assumes 16-byte aligned states; copies made by torch always are.
    if any(offset % 4 for offset in pages) or state_base.data_ptr() % 16:
        raise ValueError("states must be 16-byte aligned")
    numels = [p.numel() for p in params]
    span = max(-(-max(numels, default=0) // CHUNK) * CHUNK, CHUNK)
    # One page per tensor: page k holds tensor k's states from element 0.
    chunks = make_chunks(range(len(params)), numels, [k * span for k in range(len(params))], span)
    adamw_chunks_(
        params[0], grads[0], state_base,
        torch.tensor(rows, dtype=torch.int64).view(-1, 3).to(device),
        scalars.to(device=device, dtype=torch.float32),
        chunks.to(device),
        torch.tensor(pages, dtype=torch.int64).view(-1, PAGE_COLUMNS).to(device),
        clip_factor, param_align=param_align, grad_align=grad_align,
    )


def _amsgrad_states(scalars: torch.Tensor, max_exp_avg_sqs, n: int) -> list:
    maxima = list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else [None] * n
    for i, flag in enumerate(scalars[:, 8].tolist()):
        if flag and maxima[i] is None:
            raise ValueError(f"tensor {i}: amsgrad needs its max_exp_avg_sq")
    return maxima


def adamw_step_reference(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                         scalars: torch.Tensor, clip_factor: torch.Tensor | None = None,
                         max_exp_avg_sqs: Sequence[torch.Tensor | None] | None = None) -> None:
    """fused_adamw_'s contract, one tensor at a time in torch."""
    maxima = _amsgrad_states(scalars, max_exp_avg_sqs, len(params))
    for p, g, m, v, v_max, row in zip(params, grads, exp_avgs, exp_avg_sqs, maxima, scalars.tolist()):
        adamw_update_reference(p, g, m, v, row, clip_factor, v_max)


__all__ = [
    "CHUNK",
    "PAGE_COLUMNS",
    "SCALAR_COLUMNS",
    "adamw_chunks_",
    "adamw_scalars",
    "adamw_step_reference",
    "adamw_update_reference",
    "fused_adamw_",
    "grad_clip_factor",
    "make_chunks",
    "tensor_rows",
]
