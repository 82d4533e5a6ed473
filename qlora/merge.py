"""merge_and_unload for a whole prepared model, as PEFT's: every adapted layer becomes a plain one.

Full precision (default): each QuantLoRALinear becomes nn.Linear (Conv1D where it came from one)
holding dequantise(W) + scale * B A, computed in float32 and stored in the weight's dtype: nothing
of the trained update is lost. nf4=True instead folds the update into the 4-bit weights (dequantise,
add, requantise) and returns what the requantisation lost per layer.
"""
from __future__ import annotations

import torch
from torch import nn

from qlora.layer import QuantLoRALinear
from qlora.lora_embedding import LoRAEmbedding
from qlora.lora_linear import LoRALinear
from qlora.targets import set_submodule


def _as_conv1d(linear: nn.Linear) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):  # no throw-away random weight: both parameters are replaced below
        conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().T.contiguous(), requires_grad=False)
    conv.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return conv


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None, nf4: bool = False,
                     report: dict | None = None) -> nn.Module:
    """Fold every adapter into its base, drop the LoRA modules and return the model, as PEFT's
    merge_and_unload does. dtype: of the merged weights (default: each weight's original dtype).
    nf4=True: requantise instead; `report`, when given, receives {layer: errors of the requantised
    weight} (max_abs_error, rms_error, and delta_rms, the size of the update itself). The model's
    save_pretrained is transformers' own again afterwards."""
    reports = {} if report is None else report
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRAEmbedding):
            set_submodule(model, name, module.merged_embedding(dtype))
        elif isinstance(module, LoRALinear):
            set_submodule(model, name, module.merged_linear(dtype))
        elif isinstance(module, QuantLoRALinear):
            if nf4:
                if module.r > 0 and not module.merged:
                    reports[name] = module.merge()
                # The merged bytes become the base; the adapter and the bytes merge() kept go.
                module.merged, module._original_weight = False, None
                module.add_adapter(0, module.alpha)
                continue
            linear = module.merged_linear(dtype or module.weight_dtype)
            set_submodule(model, name, _as_conv1d(linear) if getattr(module, "fan_in_fan_out", False) else linear)
    for p in model.parameters():
        p.requires_grad_(False)
    # prepare_model's overrides and the flag that makes transformers save adapters: a plain model again.
    for attribute in ("save_pretrained", "merge_and_unload", "disable_adapter", "_hf_peft_config_loaded"):
        model.__dict__.pop(attribute, None)
    return model
