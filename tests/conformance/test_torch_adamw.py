"""PagedAdamW32bit against torch.optim.AdamW, on the configurations and properties of torch's own suite.

Each test names the torch test (test/optim/test_optim.py, TestOptimRenewed) whose property it
checks; CONFIGS are torch's CPU inputs for Adam/AdamW (torch/testing/_internal/common_optimizers.py,
optim_inputs_func_adam) plus amsgrad with maximize. CPU parameters take the torch reference update;
the fused Triton kernel is checked against torch in tests/test_optim.py.
"""
import copy

import pytest
import torch
from torch.nn import Parameter

from qlora.kernels.adamw import CHUNK
from qlora.optim import PagedAdamW32bit

PAGE = 8 * 2 * CHUNK  # small pages: the tensors below span several, and budgets below page them
CONFIGS = {
    "default": {},
    "non-default lr": {"lr": 0.01},
    "nonzero weight_decay": {"weight_decay": 0.1},
    "maximize": {"weight_decay": 0.1, "maximize": True},
    "amsgrad": {"weight_decay": 0.1, "amsgrad": True},
    "amsgrad, maximize": {"weight_decay": 0.1, "amsgrad": True, "maximize": True},
}
SHAPES = [(10, 5), (10,), (3000,), (70, 70), ()]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def set_grads(params, step):
    # Shrinking gradients: exp_avg_sq falls below its running maximum, so amsgrad changes the path.
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) / step


def run(opt, params, steps, first=1):
    for step in range(first, first + steps):
        set_grads(params, step)
        opt.step()


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_50_step_trajectories_equal_torch_bit_for_bit(name):
    """torch test_foreach_matches_forloop: implementations agree over many steps. Ours, paged under
    a budget, gives the for-loop implementation's float32 values bit for bit, on every config."""
    kwargs = CONFIGS[name]
    ours, theirs = make_params(), make_params()
    opt = PagedAdamW32bit(ours, **kwargs, gpu_budget=3 * PAGE, page_size=PAGE)
    ref = torch.optim.AdamW(theirs, **kwargs, foreach=False)
    run(opt, ours, 50)
    run(ref, theirs, 50)
    assert_same(ours, theirs)
    assert any(page.device_data is None for page in opt.store("cpu").pages)  # it did page


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_50_step_trajectories_match_torch_foreach_and_fused(impl):
    """torch test_foreach_matches_forloop / test_fused_matches_forloop (their tolerance): torch's
    foreach and fused implementations round a few ulps away from the for-loop, and from ours."""
    kwargs = CONFIGS["amsgrad, maximize"]
    ours, theirs = make_params(), make_params()
    opt = PagedAdamW32bit(ours, **kwargs, **{impl: True}, page_size=PAGE)  # accepted; one implementation here
    ref = torch.optim.AdamW(theirs, **kwargs, **{impl: True})
    run(opt, ours, 50)
    run(ref, theirs, 50)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _weight_bias_loss(weight, bias, x):
    return (weight.mv(x) + bias).pow(2).sum()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_groups_weight_decay(name):
    """torch test_param_groups_weight_decay: a weight group with the config and a bias group with
    weight_decay 0 move the loss the right way (up under maximize); and exactly as torch's do."""
    weight_kwargs = CONFIGS[name]
    bias_kwargs = {**weight_kwargs, "weight_decay": 0.0}
    results = []
    for cls, extra in ((PagedAdamW32bit, {"page_size": PAGE}), (torch.optim.AdamW, {})):
        torch.manual_seed(1)
        weight, bias, x = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)
        opt = cls([dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)], **extra)
        initial = _weight_bias_loss(weight, bias, x).item()
        for _ in range(20):
            opt.zero_grad()
            loss = _weight_bias_loss(weight, bias, x)
            loss.backward()
            opt.step()
        assert (loss.item() > initial) if weight_kwargs.get("maximize") else (loss.item() < initial)
        results.append((weight.detach(), bias.detach()))
    assert_same(results[0], results[1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_groups_lr(name):
    """torch test_param_groups_lr: a group's lr overrides the optimizer's (1e-28 outside), the
    group with the near-zero lr does not move."""
    kwargs = {**CONFIGS[name], "lr": CONFIGS[name].get("lr", 1e-3)}
    torch.manual_seed(2)
    weight, bias, x = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)
    irrelevant = Parameter(torch.randn(2))
    before = irrelevant.detach().clone()
    opt = PagedAdamW32bit([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], lr=1e-28,
                          page_size=PAGE)
    initial = _weight_bias_loss(weight, bias, x).item()
    for _ in range(20):
        opt.zero_grad()
        loss = _weight_bias_loss(weight, bias, x)
        loss.backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    assert (loss.item() > initial) if kwargs.get("maximize") else (loss.item() < initial)
    assert torch.equal(irrelevant, before)


@pytest.mark.parametrize("name", ["default", "amsgrad"])
def test_step_is_noop_for_zero_grads_and_without_grads(name):
    """torch test_step_is_noop_for_zero_grads and test_step_is_noop_when_params_have_no_grad."""
    param = Parameter(torch.randn(5, 1))
    before = param.detach().clone()
    opt = PagedAdamW32bit([param], **{**CONFIGS[name], "weight_decay": 0.0, "lr": 1e-5}, page_size=PAGE)
    param.grad = torch.zeros_like(param)
    assert opt.step(lambda: torch.tensor([1.0])).item() == 1.0
    assert torch.equal(param, before)
    frozen = [torch.randn(2, 3) for _ in range(2)]
    copies = [t.clone() for t in frozen]
    PagedAdamW32bit(frozen, **CONFIGS[name], page_size=PAGE).step(lambda: torch.tensor([1.0]))
    assert_same(frozen, copies)


@pytest.mark.parametrize("name", ["default", "amsgrad, maximize"])
def test_state_dict_deterministic(name):
    """torch test_state_dict_deterministic: an optimizer loaded from another's state dict (here a
    paged one into an unpaged one) continues identically, and their state dicts stay equal."""
    kwargs = CONFIGS[name]
    first = make_params()
    opt = PagedAdamW32bit(first, **kwargs, gpu_budget=3 * PAGE, page_size=PAGE)
    run(opt, first, 10)
    second = [Parameter(p.detach().clone()) for p in first]
    clone = PagedAdamW32bit(second, **kwargs, page_size=PAGE)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(opt, first, 10, first=11)
    run(clone, second, 10, first=11)
    assert_same(first, second)
    a, b = opt.state_dict(), clone.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, entry in a["state"].items():
        assert entry.keys() == b["state"][i].keys()
        assert all(torch.equal(value, b["state"][i][key]) for key, value in entry.items())


@pytest.mark.parametrize("name", ["nonzero weight_decay", "amsgrad, maximize"])
def test_state_dicts_move_both_ways_with_torch(name):
    """torch test_state_dict_deterministic across the two classes: torch -> ours -> torch, each
    continuing on the other's state, with torch's keys (max_exp_avg_sq for amsgrad)."""
    kwargs = CONFIGS[name]
    ours, theirs = make_params(), make_params()
    ref = torch.optim.AdamW(theirs, **kwargs)
    run(ref, theirs, 10)
    for p, q in zip(ours, theirs):
        p.data.copy_(q.data)
    opt = PagedAdamW32bit(ours, lr=5.0, gpu_budget=3 * PAGE, page_size=PAGE)  # hyperparameters come with the groups
    opt.load_state_dict(ref.state_dict())
    assert {k: opt.param_groups[0][k] for k in kwargs} == kwargs
    run(opt, ours, 10, first=11)
    run(ref, theirs, 10, first=11)
    assert_same(ours, theirs)
    saved = opt.state_dict()
    for i, entry in ref.state_dict()["state"].items():
        assert saved["state"][i].keys() == entry.keys()
        assert all(torch.equal(value, saved["state"][i][key]) for key, value in entry.items())
    back_params = [Parameter(p.detach().clone()) for p in ours]
    back = torch.optim.AdamW(back_params)
    back.load_state_dict(saved)
    run(back, back_params, 10, first=21)
    run(opt, ours, 10, first=21)
    assert_same(back_params, ours)


def test_can_load_older_state_dict():
    """torch test_can_load_older_state_dict: a state dict without the newer flags loads and steps."""
    params = make_params()
    opt = PagedAdamW32bit(params, amsgrad=True, page_size=PAGE)
    run(opt, params, 3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in ("maximize", "foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay"):
            group.pop(flag)
    opt.load_state_dict(old)
    assert opt.param_groups[0]["maximize"] is False and opt.param_groups[0]["amsgrad"] is True
    run(opt, params, 1, first=4)
    assert opt.state_dict()["state"][0]["step"].item() == 4
