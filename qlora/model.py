"""Whole-model QLoRA: swap linears (nn.Linear, transformers' Conv1D, bitsandbytes' Linear4bit) for
QuantLoRALinear, give named embeddings a LoRAEmbedding, and freeze the rest, as PEFT's
get_peft_model on a 4-bit model would.

Works on any torch model; Hugging Face models get nothing special beyond the hooks they offer
(enable_input_require_grads, gradient_checkpointing_enable, config._name_or_path).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from qlora.bnb_bridge import convert_bnb_layers
from qlora.full_precision_lora import disable_adapter
from qlora.hf_load import load_quantized
from qlora.layer import QuantLoRALinear
from qlora.lora_embedding import LoRAEmbedding
from qlora.lora_linear import LoRALinear
from qlora.lora_options import check_lora_settings
from qlora.merge import merge_and_unload
from qlora.nf4 import SUPPORTED_DTYPES, quantize_nf4
from qlora.peft_format import load_adapter, save_adapter, save_pretrained_adapter
from qlora.targets import ALL_LINEAR, is_conv1d, matches, quantised_layers, select_targets, set_submodule

__all__ = ["ALL_LINEAR", "count_parameters", "enable_checkpointing", "load_adapter", "load_quantized",
           "merge_and_unload", "prepare_model", "quantised_layers", "save_adapter", "select_targets"]
BIAS_OPTIONS = ("none", "all", "lora_only")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a 4-bit base weight counts as out*in parameters, as PEFT counts them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in quantised_layers(model).values())
    return trainable, total


def _is_norm(module: nn.Module) -> bool:
    # Norm classes differ per model family (LlamaRMSNorm, ...); the class name is the convention.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def _output_in_input_dtype(module, args, output):
    """A norm kept in float32 inside a bf16/fp16 model returns its input's dtype, as it did before:
    otherwise float32 activations reach the model's bf16 layers (lm_head) and the matmul fails."""
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor) \
            and output.dtype != args[0].dtype and args[0].is_floating_point():
        return output.to(args[0].dtype)
    return output


def _upcast_norms(model: nn.Module) -> None:
    """Norm parameters in float32 (numerically safer; they are few), outputs in the model's dtype."""
    for module in model.modules():
        if not _is_norm(module):
            continue
        lower = [p for p in module.parameters(recurse=False) if p.is_floating_point() and p.dtype != torch.float32]
        for p in lower:
            p.data = p.data.float()
        if lower and not getattr(module, "_qlora_keeps_dtype", False):
            module.register_forward_hook(_output_in_input_dtype)
            module._qlora_keeps_dtype = True


def _make_inputs_require_grad(model: nn.Module) -> None:
    """With frozen embeddings and checkpointed blocks, the blocks' input must require grad or no
    gradient reaches the adapters inside them: a forward hook on the input embeddings, as PEFT does."""
    if getattr(model, "_qlora_inputs_require_grad", False):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    else:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else next(
            (m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is None:
            return  # float inputs: the caller's tensors decide
        embedding.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    model._qlora_inputs_require_grad = True


def enable_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on gradient (activation) checkpointing of a model that offers it."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"gradient checkpointing: {type(model).__name__} has no gradient_checkpointing_enable()")


def _quantised(module: nn.Module, name: str, blocksize: int, double_quant: bool, **kwargs) -> QuantLoRALinear:
    """nn.Linear or Conv1D -> QuantLoRALinear. Conv1D stores its weight [in, out]: it is quantised
    transposed, as transformers + bitsandbytes do, and remembered as fan_in_fan_out (PEFT's flag)."""
    if module.weight.is_meta:
        raise ValueError(f"{name}: weight is on the meta device; fill the model with load_quantized first")
    conv1d = is_conv1d(module)
    weight = module.weight.detach()
    weight = weight.T.contiguous() if conv1d else weight
    layer = QuantLoRALinear.from_nf4(quantize_nf4(weight, blocksize, double_quant, name=f"{name}.weight"),
                                     module.bias, **kwargs)
    layer.fan_in_fan_out = conv1d
    return layer


def _adapt(model: nn.Module, name: str, r, alpha, dropout, use_rslora, compute_dtype, blocksize, double_quant,
           adapter_dtype, skip) -> None:
    module = model.get_submodule(name)
    if isinstance(module, (LoRAEmbedding, LoRALinear)) or (isinstance(module, QuantLoRALinear) and module.r > 0):
        raise ValueError(f"{name}: already has an adapter (r={module.r})")
    if isinstance(module, nn.Linear) and any(matches(name, s) for s in skip):
        set_submodule(model, name, LoRALinear(module, r, alpha, dropout, use_rslora, dtype=adapter_dtype))
        return
    if isinstance(module, QuantLoRALinear):
        module.compute_dtype = compute_dtype
        module.add_adapter(r, alpha, dropout, use_rslora, dtype=adapter_dtype)
    elif isinstance(module, nn.Embedding):
        set_submodule(model, name, LoRAEmbedding(module, r, alpha, use_rslora, dtype=adapter_dtype))
    else:
        set_submodule(model, name, _quantised(
            module, name, blocksize, double_quant, r=r, alpha=alpha, dropout=dropout, compute_dtype=compute_dtype,
            use_rslora=use_rslora, adapter_dtype=adapter_dtype))


def _unfreeze(model: nn.Module, names: list[str], bias: str, modules_to_save) -> None:
    """PEFT's bias= and modules_to_save: which base parameters train besides the adapters."""
    if bias == "all":
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)
    elif bias == "lora_only":
        for name in names:
            layer_bias = getattr(model.get_submodule(name), "bias", None)
            if isinstance(layer_bias, nn.Parameter):
                layer_bias.requires_grad_(True)
    saved = []
    for target in modules_to_save or ():
        found = [n for n, _ in model.named_modules() if n and matches(n, target)]
        if not found:
            raise ValueError(f"modules_to_save {target!r} matches no module of {type(model).__name__}")
        for name in found:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        saved.extend(found)
    model._qlora_modules_to_save = sorted(set(saved))
    model._qlora_bias = bias


def prepare_model(
    model: nn.Module,
    target_modules: str | list[str] = ALL_LINEAR,
    r: int = 64,
    alpha: float = 16,
    dropout: float = 0.05,
    skip: tuple[str, ...] = ("lm_head",),
    use_rslora: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
    blocksize: int = 64,
    double_quant: bool = True,
    gradient_checkpointing: bool = False,
    verbose: bool = True,
    adapter_dtype: torch.dtype = torch.float32,
    bias: str = "none",
    modules_to_save: list[str] | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Quantise the chosen linears to NF4 with LoRA adapters, freeze everything else, keep norms in
    float32 and make inputs require grad (so gradient checkpointing works). Layers already quantised
    (by load_quantized, or bitsandbytes Linear4bit layers of a model transformers loaded in 4 bit)
    just get adapters; named embeddings get a LoRAEmbedding, and a named module of `skip` (lm_head)
    a LoRALinear over its full-precision weight. Modifies and returns the model, whose
    save_pretrained then writes the PEFT adapter, whose merge_and_unload() folds the adapters in and
    whose disable_adapter() block runs the base alone, as a PeftModel's do.

    adapter_dtype: float32 is PEFT's default; bfloat16 (the QLoRA paper's script) halves the
    adapters, their gradients and what the optimizer reads.
    bias, modules_to_save: as in peft.LoraConfig ("none", "all" or "lora_only"; module names).
    r, alpha, dropout: see qlora.lora_options (r=0 quantises the targets without adapters)."""
    if compute_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"compute_dtype {compute_dtype} is not supported; use float32, bfloat16 or float16")
    check_lora_settings(r, alpha, dropout)
    if use_dora:
        raise ValueError("use_dora=True: DoRA is not supported by qlora; use plain LoRA (use_dora=False)")
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias={bias!r}: expected one of {', '.join(BIAS_OPTIONS)}")
    convert_bnb_layers(model)
    names = select_targets(model, target_modules, skip)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _adapt(model, name, r, alpha, dropout, use_rslora, compute_dtype, blocksize, double_quant, adapter_dtype,
               skip)
    _unfreeze(model, names, bias, modules_to_save)
    _upcast_norms(model)
    _make_inputs_require_grad(model)
    model.save_pretrained = types.MethodType(save_pretrained_adapter, model)
    model.merge_and_unload = types.MethodType(merge_and_unload, model)
    model.disable_adapter = types.MethodType(disable_adapter, model)
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers' Trainer refuses a 4-bit model without PEFT adapters; this one has qlora's.
        model._hf_peft_config_loaded = True
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=False)
    if verbose:
        trainable, total = count_parameters(model)
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return model
