"""torch.optim.AdamW's options as PagedAdamW32bit takes them: the defaults, the checks, the refusals.

The signature and the param-group keys are torch's, so code (and state dicts) written for
torch.optim.AdamW carry over. amsgrad and maximize change the update and are implemented.
foreach and fused choose among torch's implementations of one update; ours has a single one
(the fused paged update), so they are recorded and change nothing. capturable and
differentiable ask for what a paged update cannot give (a step without host work for CUDA
graphs, a step autograd can differentiate) and are refused with the reason.
"""
from __future__ import annotations

import math

import torch

# Keys that say how torch ran the update, not what the update is.
IMPLEMENTATION_FLAGS = ("foreach", "capturable", "differentiable", "fused")

_REFUSED = {
    "capturable": "a paged step moves pages and computes the bias corrections on the host, so it cannot be "
                  "captured in a CUDA graph",
    "differentiable": "the update runs in place in a fused kernel that autograd cannot differentiate; use "
                      "torch.optim.AdamW(differentiable=True) for that",
}


def adamw_defaults(lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable,
                   fused) -> dict:
    """The param-group defaults torch.optim.AdamW would record, checked."""
    check_hyperparameters(lr, betas, eps, weight_decay)
    defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                    fused=fused, decoupled_weight_decay=True)
    check_flags(defaults, "")
    return defaults


def check_hyperparameters(lr, betas, eps, weight_decay, where: str = "") -> None:
    if isinstance(lr, torch.Tensor):
        raise TypeError(f"lr{where} must be a Python number, got a tensor")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr{where} must be a finite number >= 0, got {lr!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas{where} must be a pair of numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}]{where} must be a number in [0, 1), got {beta!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps{where} must be a finite number >= 0, got {eps!r}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay{where} must be a finite number >= 0, got {weight_decay!r}")


def check_flags(group: dict, where: str) -> None:
    for flag in ("amsgrad", "maximize"):
        if group.get(flag, False) not in (True, False):  # bools, 0 and 1, numpy's bools
            raise ValueError(f"{flag}{where} must be True or False, got {group[flag]!r}")
    for flag, reason in _REFUSED.items():
        if group.get(flag):
            raise ValueError(f"PagedAdamW32bit does not support {flag}=True{where}: {reason}")
    if group.get("decoupled_weight_decay") is False:
        raise ValueError(f"PagedAdamW32bit applies decoupled weight decay (AdamW), the group asks for Adam's{where}")


def check_group(group: dict, index: int) -> None:
    where = f" (param group {index})"
    check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], where)
    check_flags(group, where)


def adopt_implementation_flags(saved_groups: list[dict], defaults: dict) -> list[dict]:
    """Saved groups with this optimizer's implementation flags: a state dict written by
    torch.optim.AdamW(fused=True) or (capturable=True) says how that run was computed, not
    what the update is, so it loads here as any other."""
    return [{**group, **{key: defaults[key] for key in IMPLEMENTATION_FLAGS}} for group in saved_groups]


def fill_missing_flags(group: dict) -> None:
    """Older state dicts lack the newer keys: torch.optim.AdamW's values for them."""
    for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
                       ("differentiable", False), ("fused", None), ("decoupled_weight_decay", True)):
        group.setdefault(key, value)


def group_flags(group: dict) -> tuple[float, float]:
    """(maximize, amsgrad) as 1.0 / 0.0, for the update's scalar table."""
    return float(bool(group.get("maximize", False))), float(bool(group.get("amsgrad", False)))
