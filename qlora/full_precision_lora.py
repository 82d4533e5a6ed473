"""Merging and switching off LoRA over a full-precision base (LoRALinear, LoRAEmbedding), and switching
off every adapter of a model, with QuantLoRALinear's semantics.

merge() folds scale * B A into the base weight as PEFT does (its own Parameter, so a tied lm_head or
embedding sees the update too); unmerge() takes it out again. disable_adapter() runs the base alone in
its block; on a merged layer the block runs the unmerged weight and the merged values come back after
it, exactly, so `merged` is the same before and after (as QuantLoRALinear does; PEFT stays unmerged).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from qlora.layer import QuantLoRALinear, adapter_disabled


class FullPrecisionLoRA(nn.Module):
    """Base class: a subclass holds `base_layer` and defines delta_weight() in the base weight's layout."""

    is_qlora_adapter = True
    merged = False  # instances set their own once merged
    _adapter_disabled = False

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    @property
    def adapter_active(self) -> bool:
        return not self.merged and not self._adapter_disabled

    def _add_delta(self, sign: float) -> torch.Tensor:
        weight = self.base_layer.weight
        # One rounding to the weight's dtype, from float32.
        return (weight.float() + sign * self.delta_weight(torch.float32)).to(weight.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """W += scale * B A. safe_merge is PEFT's argument; every merge here is safe: a non-finite result
        is refused before anything changes. Merging a merged layer warns and does nothing, as in PEFT."""
        if self.merged:
            warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
            return
        merged = self._add_delta(1.0)
        if not merged.isfinite().all():
            raise ValueError(f"merge(): {type(self).__name__}({self.extra_repr()}): the merged weight holds "
                             "NaN/Inf (the adapter seems broken); nothing was changed")
        self.base_layer.weight.data = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scale * B A (on a layer that is not merged: PEFT's warning and nothing else)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        self.base_layer.weight.data = self._add_delta(-1.0)
        self.merged = False

    @torch.no_grad()
    def _merged_base(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The base layer holding W + scale * B A, written into its own Parameter (as PEFT merges), so
        a tied lm_head or embedding shares the update as it would with PEFT. A merged layer's weight
        already holds it."""
        base = self.base_layer
        weight = base.weight if self.merged else base.weight.float() + self.delta_weight(torch.float32)
        base.weight.data = weight.to(dtype or base.weight.dtype)
        return base

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, use_rslora={self.use_rslora}, merged={self.merged}"

    def disable_adapter(self):
        """Run the base layer alone inside the block (a merged layer: unmerged in it, merged after it)."""
        return adapter_disabled(self, self.base_layer.weight.data if self.merged else None, self._remerge)

    def _remerge(self, merged: torch.Tensor) -> None:
        self.base_layer.weight.data = merged  # the very values merge() made, not a second rounding
        self.merged = True


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """PeftModel.disable_adapter() for a prepared model: every adapter (QuantLoRALinear, LoRALinear,
    LoRAEmbedding) off inside the block, each restored as it was after it. modules_to_save and trained
    biases are trained in place (no original copy is kept), so they stay as trained: a warning says so,
    where PEFT would run the original modules_to_save (and warns about biases)."""
    trained = list(getattr(model, "_qlora_modules_to_save", None) or ())
    if getattr(model, "_qlora_bias", "none") != "none":
        trained.append(f"biases (bias={model._qlora_bias!r})")
    if trained:
        warnings.warn(f"disable_adapter(): {', '.join(trained)} stay as trained inside the block; only the LoRA "
                      "adapters are switched off (PEFT runs the original modules_to_save)", UserWarning, stacklevel=3)
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, (QuantLoRALinear, FullPrecisionLoRA)):
                stack.enter_context(module.disable_adapter())
        yield model
