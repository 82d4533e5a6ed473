"""Which modules of a model get LoRA: PEFT's naming rules over nn.Linear, transformers' Conv1D,
nn.Embedding and the layers qlora already built."""
from __future__ import annotations

from torch import nn

from qlora.layer import QuantLoRALinear

ALL_LINEAR = "all-linear"


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2's linear, weight stored [in, out]), recognised
    without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def matches(name: str, target: str) -> bool:
    """PEFT's rule: a target names a module by its full path or by the last parts of it."""
    return name == target or name.endswith("." + target)


def _adapted(module: nn.Module) -> bool:
    """A module qlora built (its inside, the base layer and adapters, is not a target)."""
    return isinstance(module, QuantLoRALinear) or getattr(module, "is_qlora_adapter", False)


def candidate_names(model: nn.Module, embeddings: bool) -> list[str]:
    """Linear-like modules (nn.Linear, Conv1D, QuantLoRALinear) and, with embeddings, nn.Embedding,
    leaving out the insides of layers qlora already built."""
    names, built = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in built):
            continue
        if _adapted(module):
            built.append(name)
            names.append(name)
        elif isinstance(module, nn.Linear) or is_conv1d(module) or (embeddings and isinstance(module, nn.Embedding)):
            names.append(name)
    return names


def select_targets(model: nn.Module, target_modules: str | list[str] | tuple[str, ...],
                   skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Full names of the modules to adapt; raises ValueError naming targets that match nothing.
    "all-linear" takes every linear (nn.Linear, Conv1D) outside skip, as PEFT does; embeddings are
    adapted only when named."""
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        linears = [n for n in candidate_names(model, embeddings=False) if not any(matches(n, s) for s in skip)]
        if not linears:
            raise ValueError(f"target_modules='all-linear': {type(model).__name__} has no nn.Linear or Conv1D "
                             f"outside skip={list(skip)}")
        return linears
    # Named targets may name a skipped module (lm_head): it gets LoRA and stays unquantised, as in PEFT.
    candidates = candidate_names(model, embeddings=True)
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unmatched = [t for t in targets if not any(matches(n, t) for n in candidates)]
    if unmatched:
        available = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(f"target_modules {unmatched} matched no nn.Linear in {type(model).__name__}; "
                         f"its linear and embedding layers are named {available}")
    return [n for n in candidates if any(matches(n, t) for t in targets)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantised_layers(model: nn.Module) -> dict[str, QuantLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
