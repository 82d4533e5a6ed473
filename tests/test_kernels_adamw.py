"""The fused multi-tensor AdamW kernel against its torch reference (on the CPU: Triton's interpreter)."""
import pytest
import torch

from qlora.kernels import adamw, backend

DEVICE = "cuda" if torch.cuda.is_available() and not backend.INTERPRET else "cpu"
# Tensors of awkward sizes: single elements, one short of / exactly / one past a chunk, 2-D.
SHAPES = [(1,), (5,), (adamw.CHUNK - 1,), (adamw.CHUNK,), (adamw.CHUNK + 1,), (33, 70), (3, 7), (1000,)]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _scalars(n, seed, weight_decay=0.1, maximize=None, amsgrad=None):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    lr = torch.rand(n, generator=g, **f64) * 1e-2
    beta1 = torch.tensor([0.9, 0.8, 0.3, 0.0] * n, **f64)[:n]  # 0.3 and 0.0 take lerp's other branch
    beta2 = torch.tensor([0.999, 0.95, 0.5, 0.0] * n, **f64)[:n]
    eps = torch.full((n,), 1e-8, **f64)
    wd = torch.full((n,), weight_decay, **f64)
    step = torch.randint(1, 50, (n,), generator=g).to(torch.float64)
    return adamw.adamw_scalars(lr, beta1, beta2, eps, wd, step, maximize, amsgrad)


def _tensors(shapes, param_dtype, grad_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(param_dtype).to(DEVICE) for s in shapes]
    grads = [torch.randn(s, generator=g).to(grad_dtype).to(DEVICE) for s in shapes]
    exp_avgs = [(0.1 * torch.randn(s, generator=g)).to(DEVICE) for s in shapes]
    exp_avg_sqs = [(0.01 * torch.rand(s, generator=g)).to(DEVICE) for s in shapes]
    return params, grads, exp_avgs, exp_avg_sqs


def _clone(tensors):
    return [[t.clone() for t in group] for group in tensors]


def _close(a, e, ulps, dtype=torch.float32):
    # Within a few ulps of the tensor's scale: where and whether multiply-adds are fused
    # differs between torch's CPU kernels, the GPU and the interpreter.
    tol = ulps * ULP[dtype]
    torch.testing.assert_close(a.float(), e.float(), rtol=tol, atol=tol * e.float().abs().max().item())


def _assert_params_close(actual, expected, dtype):
    # float32: a few ulps; 16-bit dtypes: the float32 results round to the same value or a neighbour.
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype == dtype
        _close(a, e, 4 if dtype == torch.float32 else 1, dtype)


def _assert_states_close(actual, expected):
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        _close(a, e, 4)


@pytest.mark.parametrize("param_dtype,grad_dtype", [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("clip", [None, 0.37])
def test_fused_update_matches_reference(param_dtype, grad_dtype, clip):
    tensors = _tensors(SHAPES, param_dtype, grad_dtype, seed=1)
    expected = _clone(tensors)
    before = [m.clone() for m in tensors[2]]
    scalars = _scalars(len(SHAPES), seed=2)
    clip_factor = None if clip is None else torch.tensor([clip], device=DEVICE)
    adamw.fused_adamw_(*tensors, scalars, clip_factor)
    adamw.adamw_step_reference(*expected, scalars.to(torch.float32), clip_factor)
    _assert_params_close(tensors[0], expected[0], param_dtype)
    _assert_states_close(tensors[2] + tensors[3], expected[2] + expected[3])
    # Every tensor's state moved (a kernel that skipped tensors would fail here).
    assert all(not torch.equal(m, b) for m, b in zip(tensors[2], before))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_amsgrad_and_maximize_per_tensor_match_reference(param_dtype):
    # Every mix in one launch: plain, maximize, amsgrad, both. Non-amsgrad tensors have no
    # max_exp_avg_sq at all (their page-table column is 0): the kernel must not touch it.
    n = len(SHAPES)
    tensors = _tensors(SHAPES, param_dtype, torch.float32, seed=11)
    g = torch.Generator().manual_seed(12)
    maximize = torch.tensor([0.0, 1.0, 0.0, 1.0] * n, dtype=torch.float64)[:n]
    amsgrad = torch.tensor([0.0, 0.0, 1.0, 1.0] * n, dtype=torch.float64)[:n]
    # Maxima above and below exp_avg_sq, so both sides of the maximum are taken.
    maxima = [(0.02 * torch.rand(s, generator=g)).to(DEVICE) if a else None for s, a in zip(SHAPES, amsgrad)]
    expected = _clone(tensors)
    expected_maxima = [None if m is None else m.clone() for m in maxima]
    scalars = _scalars(n, seed=13, maximize=maximize, amsgrad=amsgrad)
    assert scalars[:, 7].tolist() == [-1.0 if m else 1.0 for m in maximize.tolist()]
    adamw.fused_adamw_(*tensors, scalars, None, maxima)
    adamw.adamw_step_reference(*expected, scalars.to(torch.float32), None, expected_maxima)
    _assert_params_close(tensors[0], expected[0], param_dtype)
    _assert_states_close(tensors[2] + tensors[3] + [m for m in maxima if m is not None],
                         expected[2] + expected[3] + [m for m in expected_maxima if m is not None])
    for i, m in enumerate(maxima):
        if m is not None:  # the running maximum really is max(old, new exp_avg_sq)
            assert torch.all(m >= tensors[3][i])
    with pytest.raises(ValueError, match="tensor 2: amsgrad needs its max_exp_avg_sq"):
        adamw.fused_adamw_(*tensors, scalars)


def test_one_launch_updates_many_tensors(monkeypatch):
    launches = []
    original = adamw.adamw_chunks_

    def counting(*args, **kwargs):
        launches.append(kwargs.get("n_chunks"))
        return original(*args, **kwargs)

    monkeypatch.setattr(adamw, "adamw_chunks_", counting)
    shapes = [(n,) for n in range(1, 97)] + [(2 * adamw.CHUNK + 3,)]
    tensors = _tensors(shapes, torch.float32, torch.float32, seed=3)
    expected = _clone(tensors)
    scalars = _scalars(len(shapes), seed=4)
    adamw.fused_adamw_(*tensors, scalars)
    adamw.adamw_step_reference(*expected, scalars.to(torch.float32))
    assert len(launches) == 1
    _assert_params_close(tensors[0], expected[0], torch.float32)
    _assert_states_close(tensors[2] + tensors[3], expected[2] + expected[3])


def _poisoned_views(shapes, dtype, guard, seed):
    """Tensors laid out in one buffer with NaN guard bands (misaligned on purpose) between them."""
    g = torch.Generator().manual_seed(seed)
    sizes = [torch.Size(s).numel() for s in shapes]
    buffer = torch.full((sum(sizes) + guard * (len(sizes) + 1),), float("nan"), dtype=dtype)
    views, at = [], guard
    for shape, n in zip(shapes, sizes):
        buffer[at:at + n] = torch.randn(n, generator=g).to(dtype)
        views.append(buffer[at:at + n].view(shape))
        at += n + guard
    return buffer.to(DEVICE), views


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_paged_layout_poisoned_neighbours_and_each_chunk_once(param_dtype):
    shapes = [(3000,), (5,), (40, 100), (2 * adamw.CHUNK,), (777,)]
    n = len(shapes)
    page_numel = 2 * adamw.CHUNK
    numels = [torch.Size(s).numel() for s in shapes]
    # States packed end to end (CHUNK-aligned) over pages that sit in reverse order in memory.
    starts, at = [], 0
    for numel in numels:
        starts.append(at)
        at += -(-numel // adamw.CHUNK) * adamw.CHUNK
    n_pages = -(-at // page_numel)
    arena = torch.full((n_pages + 1, 2, page_numel), float("nan"), device=DEVICE)  # one spare page
    physical = [n_pages - k for k in range(n_pages)]  # page k lives in arena slot n_pages - k
    g = torch.Generator().manual_seed(5)
    exp_avgs, exp_avg_sqs = [], []
    for numel, start in zip(numels, starts):
        m, v = 0.1 * torch.randn(numel, generator=g), 0.01 * torch.rand(numel, generator=g)
        exp_avgs.append(m)
        exp_avg_sqs.append(v)
        pos = 0
        while pos < numel:  # scatter into the pages
            page, offset = divmod(start + pos, page_numel)
            length = min(page_numel - offset, numel - pos)
            arena[physical[page], 0, offset:offset + length] = m[pos:pos + length].to(DEVICE)
            arena[physical[page], 1, offset:offset + length] = v[pos:pos + length].to(DEVICE)
            pos += length
    param_buffer, params = _poisoned_views(shapes, param_dtype, guard=3, seed=6)
    grad_buffer, grads = _poisoned_views(shapes, torch.float32, guard=5, seed=7)
    param_nan = torch.isnan(param_buffer)
    grad_before = grad_buffer.clone()
    arena_nan = torch.isnan(arena)
    expected = [[p.cpu().reshape(-1).clone() for p in params], [g.cpu().reshape(-1).clone() for g in grads],
                exp_avgs, exp_avg_sqs]

    state_base = arena[0, 0]
    page_rows = []
    for k in range(n_pages):
        offset = (arena[physical[k]].data_ptr() - state_base.data_ptr()) // 4
        page_rows.append([offset, offset + page_numel, 0])  # no amsgrad: the third column is never read
    rows, param_align, grad_align = adamw.tensor_rows(params, grads)
    chunks = adamw.make_chunks(range(n), numels, starts, page_numel).to(DEVICE)
    scalars = _scalars(n, seed=8)
    args = (params[0], grads[0], state_base,
            torch.tensor(rows, dtype=torch.int64).view(-1, 3).to(DEVICE),
            scalars.to(DEVICE, torch.float32), chunks,
            torch.tensor(page_rows, dtype=torch.int64).to(DEVICE))
    # Two launches over disjoint chunk ranges: every chunk must be updated exactly once.
    split = chunks.shape[0] // 2
    adamw.adamw_chunks_(*args, first_chunk=0, n_chunks=split, param_align=param_align, grad_align=grad_align)
    adamw.adamw_chunks_(*args, first_chunk=split, param_align=param_align, grad_align=grad_align)
    adamw.adamw_step_reference(*expected, scalars.to(torch.float32))

    _assert_params_close([p.cpu().reshape(-1) for p in params], expected[0], param_dtype)
    got_m, got_v = [], []
    for numel, start in zip(numels, starts):
        pieces_m, pieces_v, pos = [], [], 0
        while pos < numel:
            page, offset = divmod(start + pos, page_numel)
            length = min(page_numel - offset, numel - pos)
            pieces_m.append(arena[physical[page], 0, offset:offset + length].cpu())
            pieces_v.append(arena[physical[page], 1, offset:offset + length].cpu())
            pos += length
        got_m.append(torch.cat(pieces_m))
        got_v.append(torch.cat(pieces_v))
    _assert_states_close(got_m + got_v, exp_avgs + exp_avg_sqs)
    # Guards, padding and the spare page were never written.
    assert torch.equal(torch.isnan(param_buffer), param_nan)
    assert torch.equal(torch.isnan(arena), arena_nan)
    assert torch.equal(grad_buffer.nan_to_num(7.0), grad_before.nan_to_num(7.0))  # read-only


def test_grad_clip_factor_matches_clip_grad_norm():
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(s, generator=g) * 3 for s in SHAPES]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm=1.5)
    factor = adamw.grad_clip_factor(grads, 1.5)
    assert factor.shape == (1,) and factor.dtype == torch.float32 and factor.item() < 1.0
    for p, x in zip(params, grads):
        torch.testing.assert_close(x * factor, p.grad, rtol=1e-6, atol=0)
    # Small gradients are not scaled up.
    assert adamw.grad_clip_factor([x * 1e-6 for x in grads], 1.5).item() == 1.0


def test_scalar_rows_follow_torch_formulas():
    # The float64 rows against the Python-float expressions of torch.optim.AdamW's single-tensor path.
    lr, beta1, beta2, eps, wd, step = 3e-4, 0.9, 0.999, 1e-8, 0.01, 7.0
    row = adamw.adamw_scalars(*(torch.tensor([x], dtype=torch.float64) for x in (lr, beta1, beta2, eps, wd, step)))[0]
    expected = [1 - lr * wd, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1**step),
                (1 - beta2**step) ** 0.5, eps]
    assert row[:7].tolist() == pytest.approx(expected, rel=1e-15, abs=0)


def test_make_chunks_rejects_misaligned_layouts():
    with pytest.raises(ValueError, match="multiple"):
        adamw.make_chunks([0], [10], [adamw.CHUNK // 2], 4 * adamw.CHUNK)
    with pytest.raises(ValueError, match="page_numel"):
        adamw.make_chunks([0], [10], [0], adamw.CHUNK + 1)


_COMPILE_FOR_H100 = r"""
import os, re, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qlora.kernels import adamw
param_dtype, param_align = sys.argv[1], int(sys.argv[2])
signature = {"param_base_ptr": "*" + param_dtype, "grad_base_ptr": "*fp32", "state_base_ptr": "*fp32",
             "tensor_table_ptr": "*i64", "scalars_ptr": "*fp32", "chunk_table_ptr": "*i64",
             "page_table_ptr": "*i64", "clip_factor_ptr": "*fp32", "first_chunk": "i32",
             "HAS_CLIP": "constexpr", "PARAM_ALIGN": "constexpr", "GRAD_ALIGN": "constexpr", "BLOCK": "constexpr"}
constexprs = {"HAS_CLIP": True, "PARAM_ALIGN": param_align, "GRAD_ALIGN": 4, "BLOCK": adamw.CHUNK}
attrs = {(i,): [["tt.divisibility", 16]] for i in range(8)}  # what a launch with aligned tensors specialises
kernel = triton.compile(ASTSource(fn=adamw._adamw_chunks_kernel, signature=signature, constexprs=constexprs,
                                  attrs=attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
ptx = kernel.asm["ptx"]
for name in ("ld.global.v4", "st.global.v4", "div.rn.f32", "sqrt.rn.f32", "div.full.f32", "sqrt.approx"):
    print(name, len(re.findall(re.escape(name), ptx)))
"""


@pytest.mark.parametrize("param_dtype,param_align,param_vectors", [("fp32", 4, 4), ("bf16", 8, 2)])
def test_kernel_compiles_for_h100_with_16_byte_memory_ops(param_dtype, param_align, param_vectors):
    # No GPU needed: Triton compiles for sm_90 on the CPU. Whole chunks must load and store 16 bytes
    # at a time (the update is memory-bound) and use round-to-nearest division and square root.
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100, param_dtype, str(param_align)],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    counts = {name: int(n) for name, n in (line.split() for line in out.stdout.splitlines())}
    # 2048 elements over 128 threads: 16 per thread; param vectors, then grad, exp_avg, exp_avg_sq and
    # (in the amsgrad branch) max_exp_avg_sq.
    assert counts["ld.global.v4"] >= param_vectors + 4 * 4
    assert counts["st.global.v4"] >= param_vectors + 3 * 4
    assert counts["div.rn.f32"] > 0 and counts["sqrt.rn.f32"] > 0
    assert counts["div.full.f32"] == 0 and counts["sqrt.approx"] == 0
