"""PagedAdamW32bit against torch.optim.AdamW, the page table under a simulated budget, state dicts, bad input.

Everything runs on the CPU: the reference update by default, the fused Triton kernel under the
interpreter with QLORA_BACKEND=triton, and paging with CPU memory on both sides of the budget.
"""
import math

import pytest
import torch

from qlora.kernels.adamw import CHUNK
from qlora.optim import PagedAdamW32bit
from qlora.paged_budget import DeviceMemory
from qlora.paged_states import PagedStates

PAGE_NUMEL = 2 * CHUNK
PAGE = 8 * PAGE_NUMEL  # bytes per page: small, so a few tensors span several pages
# Mixed sizes: a scalar, single elements, tensors spanning pages; the last never gets a gradient.
SHAPES = [(), (1,), (7,), (64, 33), (5000,), (70, 70), (3, 2049), (11,)]
NO_GRAD = 7
STEPS = 100


def _params(shapes=SHAPES, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]


def _set_grads(params, step, scale=1.0, dtype=None):
    """Deterministic gradients: zeros for tensor 3 every 7th step, none for 2 every 5th, never for 7."""
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g) * scale
        if i == NO_GRAD or (i == 2 and step % 5 == 0):
            p.grad = None
        else:
            if i == 3 and step % 7 == 0:
                grad.zero_()
            p.grad = grad.to(device=p.device, dtype=dtype or p.dtype)


def _assert_rel(actual, expected, rel):
    # Relative to the tensor's largest value: elementwise relative error is meaningless near zero.
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rel * scale, (actual - expected).abs().max().item()


def _assert_params_rel(ours, theirs, rel=1e-6):
    for a, b in zip(ours, theirs):
        _assert_rel(a, b, rel)


def _step_both(opt, ref, ours, theirs, step):
    """One step of our optimizer and of torch's, each on the same deterministic gradients."""
    _set_grads(ours, step)
    _set_grads(theirs, step)
    opt.step()
    ref.step()


@pytest.fixture(params=["reference", "kernel"])
def path(request, monkeypatch):
    """The torch reference, or the fused Triton kernel (interpreted on the CPU)."""
    if request.param == "kernel":
        monkeypatch.setenv("QLORA_BACKEND", "triton")
    return request.param


@pytest.mark.parametrize("budget", ["auto", 5 * PAGE])
def test_fp32_trajectory_equals_torch_adamw(path, budget):
    ours, theirs = _params(), _params()
    opt = PagedAdamW32bit(ours, lr=1e-2, weight_decay=0.05, gpu_budget=budget, page_size=PAGE)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.05)
    # (The interpreted kernel is slow: its one-launch resident case gets fewer steps.)
    steps = 30 if path == "kernel" and budget == "auto" else STEPS
    for step in range(1, steps + 1):
        _step_both(opt, ref, ours, theirs, step)
    _assert_params_rel(ours, theirs)
    ours_state, their_state = opt.state_dict()["state"], ref.state_dict()["state"]
    assert sorted(ours_state) == sorted(their_state) == [i for i in range(len(SHAPES)) if i != NO_GRAD]
    for i, entry in their_state.items():
        assert ours_state[i]["step"].item() == entry["step"].item()
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours_state[i][key].dtype == torch.float32
            _assert_rel(ours_state[i][key], entry[key], 1e-5)
    store = opt.store("cpu")
    assert store.device_bytes <= (5 * PAGE if budget != "auto" else math.inf)
    if budget != "auto":
        assert len(store.resident_pages) < len(store.pages) and store.bytes_streamed > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_follow_float32_master_within_rounding(path, dtype):
    # Our float32 update rounded once per step == torch.optim.AdamW on a float32 copy rounded each step.
    ours = _params(dtype=dtype)
    masters = _params()
    for m, p in zip(masters, ours):
        m.data.copy_(p.float())
    opt = PagedAdamW32bit(ours, lr=1e-2, weight_decay=0.1, gpu_budget=4 * PAGE, page_size=PAGE)
    ref = torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1)
    steps = STEPS if path == "reference" else 30
    for step in range(1, steps + 1):
        _set_grads(ours, step)
        _set_grads(masters, step, dtype=torch.float32)
        for m in masters:
            if m.grad is not None:
                m.grad = m.grad.to(dtype).float()  # the same (rounded) gradient
        opt.step()
        ref.step()
        for m in masters:
            m.data.copy_(m.data.to(dtype).float())
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for a, b in zip(ours, masters):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=ulp, atol=1e-6)


def test_groups_with_their_own_hyperparameters(path):
    ours, theirs = _params(), _params()

    def groups(params):
        return [{"params": params[:3], "lr": 3e-2, "weight_decay": 0.0, "betas": (0.8, 0.99)},
                {"params": params[3:6]},
                {"params": params[6:], "lr": 1e-3, "eps": 1e-6}]

    opt = PagedAdamW32bit(groups(ours), lr=1e-2, weight_decay=0.2, gpu_budget=5 * PAGE, page_size=PAGE)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, weight_decay=0.2)
    for step in range(1, 31):
        if step == 15:  # a scheduler changing one group's lr mid-run
            opt.param_groups[1]["lr"] = ref.param_groups[1]["lr"] = 5e-3
        _step_both(opt, ref, ours, theirs, step)
    _assert_params_rel(ours, theirs)


def test_max_grad_norm_clips_like_clip_grad_norm(path):
    ours, theirs = _params(), _params()
    opt = PagedAdamW32bit(ours, lr=1e-2, weight_decay=0.01, max_grad_norm=0.5, page_size=PAGE)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.01)
    for step in range(1, 21):
        scale = 10.0 if step % 2 else 1e-4  # clipped, then not
        _set_grads(ours, step, scale)
        _set_grads(theirs, step, scale)
        grads_before = [p.grad.clone() for p in ours if p.grad is not None]
        opt.step()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        ref.step()
        assert all(torch.equal(a, p.grad) for a, p in zip(grads_before, [p for p in ours if p.grad is not None]))
    _assert_params_rel(ours, theirs)


# ---- the page table ------------------------------------------------------------------------------

def test_budget_streams_pages_and_writes_them_back():
    ours, theirs = _params(), _params()
    budget = 5 * PAGE
    opt = PagedAdamW32bit(ours, lr=1e-2, weight_decay=0.1, gpu_budget=budget, page_size=PAGE)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    _step_both(opt, ref, ours, theirs, 1)
    store = opt.store("cpu")
    n_pages = len(store.pages)
    # 5 pages of budget: 3 streaming slots and 2 resident pages, never more.
    assert n_pages > 5 and len(store.slots) == 3 and len(store.resident_pages) == 2
    assert store.device_bytes == budget
    streamed = [k for k in range(n_pages) if store.pages[k].device_data is None]
    before = store.bytes_streamed
    for step in (2, 3):
        _step_both(opt, ref, ours, theirs, step)
    assert store.bytes_streamed - before == 2 * 2 * len(streamed) * PAGE  # in and out, every step
    # The host copies of streamed pages hold the updated states (write-back), byte for byte
    # what torch.optim.AdamW computed.
    checked = 0
    for p, q in zip(ours, theirs):
        if p not in opt._ranges:
            continue
        _, start = opt._ranges[p]
        for k, offset, at, length in store.pieces(start, p.numel()):
            page = store.pages[k]
            data = page.host_data if page.device_data is None else page.device_data
            checked += page.device_data is None
            torch.testing.assert_close(data[0, offset:offset + length],
                                       ref.state[q]["exp_avg"].reshape(-1)[at:at + length], rtol=0, atol=0)
            torch.testing.assert_close(data[1, offset:offset + length],
                                       ref.state[q]["exp_avg_sq"].reshape(-1)[at:at + length], rtol=0, atol=0)
    assert checked > 0


def test_run_updates_every_page_once_resident_in_one_call():
    store = PagedStates("cpu", PAGE_NUMEL, budget=5 * PAGE)
    for _ in range(8):
        store.allocate(PAGE_NUMEL)
    for k, page in enumerate(store.pages):
        (page.device_data if page.device_data is not None else page.host_data).fill_(k)
    calls = []

    def update(pages):
        calls.append(list(pages))
        for k in pages:
            store.active[k].add_(100)

    store.run(list(range(8)), update)
    resident = store.resident_pages
    assert len(resident) == 2 and len(store.slots) == 3
    assert calls[0] == resident and sorted(c[0] for c in calls[1:]) == [k for k in range(8) if k not in resident]
    assert all(len(c) == 1 for c in calls[1:])
    for k in range(8):
        assert torch.equal(store.read(k * PAGE_NUMEL, PAGE_NUMEL), torch.full((2, PAGE_NUMEL), 100.0 + k))


def test_auto_budget_evicts_least_recently_used_and_grows_back():
    free = {"bytes": 1 << 40}  # beside the states, which are all that is allocated (no step's peak above it)
    store = PagedStates("cpu", PAGE_NUMEL, budget="auto", reserve=PAGE,
                        memory=lambda: DeviceMemory(free["bytes"] + store.device_bytes, 0, store.device_bytes))
    for _ in range(6):
        store.allocate(PAGE_NUMEL)
    assert store.resident_pages == list(range(6)) and not store.slots
    for k, page in enumerate(store.pages):
        page.device_data.fill_(k)
    store.run(list(range(6)), lambda pages: None)  # touches 0..5 in order
    store.run([3, 1], lambda pages: None)          # then 3, then 1: LRU order is 0, 2, 4, 5, 3, 1
    # Headroom one page short of the reserve: capacity 5 pages < 6, so 3 slots and 2 resident pages.
    free["bytes"] = 0
    store.fit()
    assert store.resident_pages == [1, 3]
    assert store.device_bytes == 5 * PAGE
    for k in (0, 2, 4, 5):  # evicted pages were written back
        assert store.pages[k].device_data is None
        assert torch.equal(store.pages[k].host_data, torch.full((2, PAGE_NUMEL), float(k)))
    # Not quite two reserves of headroom: no flapping back.
    free["bytes"] = PAGE
    store.fit()
    assert store.resident_pages == [1, 3]
    # Plenty again: everything comes back, slots go away.
    free["bytes"] = 1 << 40
    store.fit()
    assert store.resident_pages == list(range(6)) and not store.slots
    for k in range(6):
        assert torch.equal(store.pages[k].device_data, torch.full((2, PAGE_NUMEL), float(k)))


def test_unlimited_states_are_held_once():
    params = _params()
    opt = PagedAdamW32bit(params, lr=1e-3, gpu_budget="auto", page_size=PAGE)
    _set_grads(params, 1)
    opt.step()
    store = opt.store("cpu")
    assert store.pages and store.resident_pages == list(range(len(store.pages)))
    # A resident page must not keep a second, host-side copy of the states.
    assert all(page.host_data is None for page in store.pages)
    opt.page_out()
    opt.page_in()
    assert all(page.host_data is None for page in store.pages)


def test_page_out_and_page_in(path):
    ours, theirs = _params(), _params()
    opt = PagedAdamW32bit(ours, lr=1e-2, weight_decay=0.1, gpu_budget=64 * PAGE, page_size=PAGE)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for step in range(1, 4):
        _step_both(opt, ref, ours, theirs, step)
        if step == 1:
            opt.page_out()
            store = opt.store("cpu")
            assert store.device_bytes == 0 and store.resident_pages == []
        if step == 2:
            opt.page_out()
            opt.page_in()
            assert len(store.resident_pages) == len(store.pages)
    assert len(store.resident_pages) == len(store.pages)  # step() brought the pages back
    _assert_params_rel(ours, theirs)


# ---- state dicts -------------------------------------------------------------------------------------

def _run(opt, params, steps, first=1):
    for step in range(first, first + steps):
        _set_grads(params, step)
        opt.step()


def _assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])
    for i in a["state"]:
        assert sorted(a["state"][i]) == sorted(b["state"][i])
        for key, value in a["state"][i].items():
            assert value.dtype == b["state"][i][key].dtype
            assert torch.equal(value, b["state"][i][key]), (i, key)


def test_state_dict_round_trips_bit_exactly_wherever_the_pages_are():
    first = _params()
    opt = PagedAdamW32bit(first, lr=1e-2, weight_decay=0.1, gpu_budget=4 * PAGE, page_size=PAGE)
    _run(opt, first, 10)
    saved = opt.state_dict()
    assert any(p.device_data is None for p in opt.store("cpu").pages)
    # Into an optimizer that keeps everything resident, and back into a paged one.
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resident = PagedAdamW32bit(second, gpu_budget="auto", page_size=PAGE)
    resident.load_state_dict(saved)
    _assert_state_dicts_equal(resident.state_dict(), saved)
    opt.load_state_dict(resident.state_dict())  # onto itself, pages streamed
    _assert_state_dicts_equal(opt.state_dict(), saved)
    _run(opt, first, 10, first=11)
    _run(resident, second, 10, first=11)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # The saved dict is a snapshot: stepping did not change it.
    assert saved["state"][0]["step"].item() == 10


def test_state_dicts_move_between_torch_adamw_and_ours(path):
    ours, theirs = _params(), _params()
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    _run(ref, theirs, 10)
    for p, q in zip(ours, theirs):
        p.data.copy_(q.data)
    opt = PagedAdamW32bit(ours, lr=5.0, weight_decay=0.0, gpu_budget=4 * PAGE, page_size=PAGE)
    opt.load_state_dict(ref.state_dict())  # hyperparameters come with the groups
    assert opt.param_groups[0]["lr"] == 1e-2
    _run(opt, ours, 10, first=11)
    _run(ref, theirs, 10, first=11)
    _assert_params_rel(ours, theirs)
    # And back: torch.optim.AdamW continues from our state.
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    back = torch.optim.AdamW(fresh, lr=1.0)
    back.load_state_dict(opt.state_dict())
    assert back.param_groups[0]["decoupled_weight_decay"] is True
    _run(back, fresh, 10, first=21)
    _run(opt, ours, 10, first=21)
    _assert_params_rel(fresh, ours)


def test_bfloat16_states_from_torch_become_float32():
    theirs = _params(dtype=torch.bfloat16)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    _run(ref, theirs, 3)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = PagedAdamW32bit(ours, page_size=PAGE)
    opt.load_state_dict(ref.state_dict())
    for i, entry in opt.state_dict()["state"].items():
        assert entry["exp_avg"].dtype == torch.float32
        assert torch.equal(entry["exp_avg"], ref.state_dict()["state"][i]["exp_avg"].float())


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"lr": float("nan")}, "lr.*nan"),
    ({"lr": float("inf")}, "lr.*inf"),
    ({"lr": -1e-3}, "lr.*-0.001"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\].*1.0"),
    ({"betas": (0.9, 1.5)}, r"betas\[1\].*1.5"),
    ({"betas": (-0.1, 0.999)}, r"betas\[0\].*-0.1"),
    ({"eps": -1e-8}, "eps.*-1e-08"),
    ({"weight_decay": -0.1}, "weight_decay.*-0.1"),
    ({"max_grad_norm": 0.0}, "max_grad_norm.*0.0"),
    ({"gpu_budget": PAGE}, "gpu_budget.*two pages"),
    ({"gpu_budget": "most"}, "gpu_budget.*most"),
    ({"page_size": 1000}, "page_size.*1000"),
])
def test_bad_hyperparameters_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW32bit(_params(), page_size=kwargs.pop("page_size", PAGE), **kwargs)


def test_bad_group_values_and_later_changes_are_caught():
    with pytest.raises(ValueError, match=r"lr \(param group 1\).*nan"):
        PagedAdamW32bit([{"params": _params()[:2]}, {"params": _params()[2:4], "lr": float("nan")}], page_size=PAGE)
    params = _params()
    opt = PagedAdamW32bit(params, page_size=PAGE)
    opt.param_groups[0]["lr"] = float("inf")
    _set_grads(params, 1)
    with pytest.raises(ValueError, match="lr.*inf"):
        opt.step()
    torch_state = torch.optim.AdamW(_params(), maximize=True).state_dict()
    torch_state["param_groups"][0]["decoupled_weight_decay"] = False  # Adam's, not AdamW's
    with pytest.raises(ValueError, match=r"decoupled weight decay.*param group 0"):
        PagedAdamW32bit(_params(), page_size=PAGE).load_state_dict(torch_state)


def test_sparse_gradients_are_refused():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = PagedAdamW32bit(embedding.parameters(), page_size=PAGE)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_unsupported_parameters_are_refused():
    with pytest.raises(TypeError, match="float64"):
        PagedAdamW32bit([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], page_size=PAGE)
    with pytest.raises(ValueError, match="contiguous"):
        PagedAdamW32bit([torch.nn.Parameter(torch.zeros(3, 4).t())], page_size=PAGE)


# ---- torch.optim.AdamW's options ---------------------------------------------------------------------

def test_signature_and_defaults_are_torch_adamw():
    import inspect

    theirs = inspect.signature(torch.optim.AdamW).parameters
    ours = inspect.signature(PagedAdamW32bit).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, parameter in theirs.items():
        assert (ours[name].kind, ours[name].default) == (parameter.kind, parameter.default), name
    params = _params()
    # What transformers' optimizer factories pass, torch's own values included.
    opt = PagedAdamW32bit(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
                          maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                          page_size=PAGE)
    assert opt.param_groups[0].keys() - {"params"} == torch.optim.AdamW(_params()).param_groups[0].keys() - {"params"}
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (1e-3, 1e-2)


@pytest.mark.parametrize("kwargs,match", [
    ({"capturable": True}, "capturable=True.*CUDA graph"),
    ({"differentiable": True}, "differentiable=True.*autograd"),
    ({"amsgrad": "yes"}, "amsgrad must be True or False"),
])
def test_what_cannot_work_is_refused_with_the_reason(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW32bit(_params(), page_size=PAGE, **kwargs)
    with pytest.raises(ValueError, match=r"\(param group 1\)"):
        PagedAdamW32bit([{"params": _params()[:2]}, {"params": _params()[2:4], **kwargs}], page_size=PAGE)


def test_amsgrad_and_maximize_per_group_in_one_launch_follow_torch_adamw(monkeypatch):
    # The fused kernel (interpreted) on every mix of the two flags at once: one launch, per-tensor
    # flags. (The reference path is checked config by config in tests/conformance/test_torch_adamw.py.)
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    ours, theirs = _params(), _params()

    def groups(ps):
        return [{"params": ps[:2], "amsgrad": True}, {"params": ps[2:4], "maximize": True},
                {"params": ps[4:6], "amsgrad": True, "maximize": True}, {"params": ps[6:]}]

    opt = PagedAdamW32bit(groups(ours), lr=1e-2, weight_decay=0.1, page_size=PAGE)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, weight_decay=0.1)
    for step in range(1, 7):
        # Gradients shrinking over time: exp_avg_sq falls below its running maximum, so amsgrad matters.
        _set_grads(ours, step, scale=1.0 / step)
        _set_grads(theirs, step, scale=1.0 / step)
        opt.step()
        ref.step()
    _assert_params_rel(ours, theirs)
    saved, expected = opt.state_dict()["state"], ref.state_dict()["state"]
    for i, entry in expected.items():
        assert sorted(saved[i]) == sorted(entry), i  # max_exp_avg_sq exactly where torch keeps it
        for key in entry:
            _assert_rel(saved[i][key], entry[key], 1e-6)
    assert any(not torch.equal(e["max_exp_avg_sq"], e["exp_avg_sq"]) for e in expected.values() if "max_exp_avg_sq" in e)


def test_amsgrad_group_added_later_grows_the_pages_and_keeps_the_states():
    ours, theirs = _params(), _params()
    opt = PagedAdamW32bit(ours[:5], lr=1e-2, gpu_budget=3 * PAGE, page_size=PAGE)
    ref = torch.optim.AdamW(theirs[:5], lr=1e-2)
    for step in range(1, 6):
        _step_both(opt, ref, ours, theirs, step)
    store = opt.store("cpu")
    assert store.rows == 2 and any(p.device_data is None for p in store.pages)
    opt.param_groups[0]["amsgrad"] = True  # no step has made the row yet: no max_exp_avg_sq to report
    assert all("max_exp_avg_sq" not in entry for entry in opt.state_dict()["state"].values())
    opt.param_groups[0]["amsgrad"] = False
    opt.add_param_group({"params": ours[5:], "amsgrad": True})
    ref.add_param_group({"params": theirs[5:], "amsgrad": True})
    for step in range(6, 16):
        _step_both(opt, ref, ours, theirs, step)
    assert store.rows == 3 and store.device_bytes <= 3 * PAGE
    _assert_params_rel(ours, theirs)


def test_torch_state_dicts_with_implementation_flags_or_missing_keys_load():
    theirs = _params()
    ref = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, foreach=True)
    _run(ref, theirs, 3)
    saved = ref.state_dict()
    saved["param_groups"][0]["capturable"] = True  # how that run was computed, not what it computed
    del saved["param_groups"][0]["maximize"]       # an older torch's dict
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = PagedAdamW32bit(ours, page_size=PAGE)
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert (group["capturable"], group["foreach"], group["maximize"], group["amsgrad"]) == (False, None, False, True)
    _run(opt, ours, 3, first=4)
    _run(ref, theirs, 3, first=4)
    _assert_params_rel(ours, theirs)
