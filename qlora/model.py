"""Whole-model QLoRA: swap nn.Linear for QuantLoRALinear, load 4-bit checkpoints, PEFT adapters.

Works on any torch model; Hugging Face models get nothing special beyond the hooks they offer
(enable_input_require_grads, gradient_checkpointing_enable, config._name_or_path).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from qlora.checkpoint import replacing
from qlora.layer import QuantLoRALinear, lora_scale
from qlora.nf4 import SUPPORTED_DTYPES, NF4Weight

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves adapters under the model wrapped as `base_model.model`.
PEFT_PREFIX = "base_model.model."
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


# ---- finding the layers ---------------------------------------------------------------------------

def _matches(name: str, target: str) -> bool:
    """PEFT's rule: a target names a module by its full path or by the last parts of it."""
    return name == target or name.endswith("." + target)


def _linear_names(model: nn.Module) -> list[str]:
    """nn.Linear and QuantLoRALinear modules, leaving out the adapters inside QuantLoRALinear."""
    names, quantised = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in quantised):
            continue
        if isinstance(module, QuantLoRALinear):
            quantised.append(name)
            names.append(name)
        elif isinstance(module, nn.Linear):
            names.append(name)
    return names


def select_targets(model: nn.Module, target_modules: str | list[str] | tuple[str, ...],
                   skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Full names of the linear modules to adapt; raises ValueError naming targets that match nothing."""
    linears = [n for n in _linear_names(model) if not any(_matches(n, s) for s in skip)]
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        if not linears:
            raise ValueError(f"target_modules='all-linear': {type(model).__name__} has no nn.Linear "
                             f"outside skip={list(skip)}")
        return linears
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unmatched = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if unmatched:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"target_modules {unmatched} matched no nn.Linear in {type(model).__name__} "
                         f"(skip={list(skip)}); its linear layers are named {available}")
    return [n for n in linears if any(_matches(n, t) for t in targets)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantised_layers(model: nn.Module) -> dict[str, QuantLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLoRALinear)}


# ---- prepare_model -------------------------------------------------------------------------------

def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a 4-bit base weight counts as out*in parameters, as PEFT counts them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in quantised_layers(model).values())
    return trainable, total


def _is_norm(module: nn.Module) -> bool:
    # Norm classes differ per model family (LlamaRMSNorm, ...); the class name is the convention.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


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
) -> nn.Module:
    """Quantise the chosen linears to NF4 with LoRA adapters, freeze everything else, keep norms in
    float32 and make inputs require grad (so gradient checkpointing works). Layers already quantised
    (by load_quantized) just get adapters. Modifies and returns the model.

    adapter_dtype: float32 is PEFT's default; bfloat16 (the QLoRA paper's script) halves the
    adapters, their gradients and what the optimizer reads."""
    if compute_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"compute_dtype {compute_dtype} is not supported; use float32, bfloat16 or float16")
    names = select_targets(model, target_modules, skip)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, QuantLoRALinear):
            if module.r > 0:
                raise ValueError(f"{name}: already has an adapter (r={module.r})")
            module.compute_dtype = compute_dtype
            module.add_adapter(r, alpha, dropout, use_rslora, dtype=adapter_dtype)
        else:
            if module.weight.is_meta:
                raise ValueError(f"{name}: weight is on the meta device; fill the model with load_quantized first")
            _set_submodule(model, name, QuantLoRALinear.from_linear(
                module, r=r, alpha=alpha, dropout=dropout, compute_dtype=compute_dtype,
                use_rslora=use_rslora, blocksize=blocksize, double_quant=double_quant,
                adapter_dtype=adapter_dtype))
    for module in model.modules():
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                p.data = p.data.float()
    _make_inputs_require_grad(model)
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=False)
    if verbose:
        trainable, total = count_parameters(model)
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return model


# ---- load_quantized ------------------------------------------------------------------------------

def _compute_dtype_from_config(path: Path) -> torch.dtype | None:
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    quant = (raw.get("quantization_config") if isinstance(raw, dict) else None) or {}
    name = quant.get("bnb_4bit_compute_dtype") if isinstance(quant, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if dtype in SUPPORTED_DTYPES else None


@torch.no_grad()
def load_quantized(model: nn.Module, path: str | Path, device: torch.device | str = "cpu",
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Fill a model built on the meta device from a quantised checkpoint (qlora's, or transformers +
    bitsandbytes'), one tensor at a time: every linear stored in NF4 becomes a QuantLoRALinear with
    r=0 (prepare_model adds the adapters) holding the stored bytes, so no full-precision copy of a
    quantised weight ever exists. Other tensors are loaded as stored (their checkpoint dtype)."""
    from qlora.checkpoint import nf4_part_names, nf4_prefixes, read_tensors, tensor_headers

    path = Path(path)
    compute_dtype = compute_dtype or _compute_dtype_from_config(path) or torch.bfloat16
    headers = tensor_headers(path)
    used: set[str] = set()

    modules = dict(model.named_modules())
    for prefix in nf4_prefixes(headers):
        linear = modules.get(prefix)
        if not isinstance(linear, (nn.Linear, QuantLoRALinear)):
            continue
        parts = [n for n in nf4_part_names(prefix) if n in headers]
        tensors = {name: t.to(device) for name, t in read_tensors(headers, parts)}
        weight = NF4Weight.from_state_dict(tensors, prefix)
        if tuple(weight.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{prefix}.weight: shape {list(weight.shape)} in {path}, but the model's layer is "
                             f"[{linear.out_features}, {linear.in_features}]")
        bias = None
        if linear.bias is not None:
            if f"{prefix}.bias" not in headers:
                raise ValueError(f"{prefix}.bias: missing from {path}")
            (_, bias), = read_tensors(headers, [f"{prefix}.bias"])
            parts.append(f"{prefix}.bias")
        _set_submodule(model, prefix, QuantLoRALinear.from_nf4(
            weight, None if bias is None else bias.to(device), r=0, compute_dtype=compute_dtype))
        used.update(parts)

    # Everything else, tied tensors (lm_head / embed_tokens) kept tied: one Parameter, every name.
    by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, tuple[torch.Tensor, bool]] = {}
    for name, tensor in _named_tensors(model):
        by_tensor.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor, isinstance(tensor, nn.Parameter)
    missing = []
    for key, names in by_tensor.items():
        old, is_param = tensors[key]
        stored = [n for n in names if n in headers]
        if not stored:
            if old.is_meta:
                missing.extend(names)
            continue
        (_, value), = read_tensors(headers, stored[:1])
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"{stored[0]}: shape {list(value.shape)} in {path}, the model expects {list(old.shape)}")
        new = nn.Parameter(value.to(device), requires_grad=old.requires_grad) if is_param else value.to(device)
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            (owner._parameters if is_param else owner._buffers)[attr] = new
        used.update(stored)
    if missing:
        raise ValueError(f"{path}: no tensor for {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    _materialise_computed_buffers(model, device)
    unused = sorted(set(headers) - used)
    if unused:
        import warnings
        warnings.warn(f"load_quantized: {len(unused)} tensors of {path} fit no module, e.g. {unused[:4]}")
    return model


def _named_tensors(model: nn.Module):
    """Parameters and persistent buffers by full name, tied ones listed under every name, outside
    the QuantLoRALinear layers (built whole from the checkpoint)."""
    quantised = tuple(name + "." for name in quantised_layers(model))
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantLoRALinear) or (module_name + ".").startswith(quantised):
            continue
        prefix = module_name + "." if module_name else ""
        for name, p in module._parameters.items():
            if p is not None:
                yield prefix + name, p
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                yield prefix + name, b


def _materialise_computed_buffers(model: nn.Module, device) -> None:
    """Non-persistent buffers (rotary inv_freq, ...) are computed, not stored: allocate them and let
    a Hugging Face model's _init_weights compute them; anything else left on meta is an error."""
    left = []
    for module_name, module in model.named_modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        if not hasattr(model, "_init_weights") or any(p.is_meta for p in module.parameters(recurse=False)):
            left.extend(f"{module_name}.{n}" for n in meta)
            continue
        for n in meta:
            module._buffers[n] = torch.empty_like(module._buffers[n], device=device)
        model._init_weights(module)
    left += [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"load_quantized: still on the meta device after loading: {', '.join(left[:8])}")


# ---- adapters in PEFT's format -------------------------------------------------------------------

def _uniform(values: dict[str, object], what: str):
    distinct = set(values.values())
    if len(distinct) > 1:
        raise ValueError(f"save_adapter: layers differ in {what} ({sorted(map(str, distinct))}); "
                         "PEFT's format holds one value")
    return distinct.pop()


def _dropout_p(layer: QuantLoRALinear) -> float:
    return float(getattr(layer.lora_dropout, "p", 0.0))


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors as PEFT does (float32, keys
    `base_model.model.<module>.lora_A.weight`), so peft.PeftModel.from_pretrained loads them."""
    from safetensors.torch import save_file

    layers = {n: m for n, m in quantised_layers(model).items() if m.r > 0}
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no QuantLoRALinear with an adapter (r > 0)")
    ranks = {n: m.r for n, m in layers.items()}
    alphas = {n: m.alpha for n, m in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    if base_model_name_or_path is None:
        config = getattr(model, "config", None)
        base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type or _task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _uniform({n: _dropout_p(m) for n, m in layers.items()}, "dropout"),
        "target_modules": sorted(layers),
        "bias": "none",
        "use_rslora": _uniform({n: m.use_rslora for n, m in layers.items()}, "use_rslora"),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        # Layers off the common rank / alpha, by full name (PEFT matches these as name suffixes).
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part).weight
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = weight.detach().to("cpu", torch.float32).contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with replacing(directory / ADAPTER_WEIGHTS) as partial:
        save_file(tensors, str(partial), metadata={"format": "pt"})
    with replacing(directory / ADAPTER_CONFIG) as partial:
        partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load LoRA adapters saved by PEFT or by save_adapter into the model's QuantLoRALinear layers
    (layers with r=0 get an adapter of the saved rank). Returns the names of the loaded layers."""
    from safetensors import safe_open

    from qlora.checkpoint import read_json_object

    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"load_adapter: {file} does not exist")
    config = read_json_object(config_file)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type {config.get('peft_type')!r}, only 'LORA' adapters are supported")
    for option, plain in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(option, plain) not in (plain, None):
            raise ValueError(f"{config_file}: {option}={config[option]!r} is not supported (only {plain!r})")
    if config.get("modules_to_save"):
        raise ValueError(f"{config_file}: modules_to_save={config['modules_to_save']} is not supported")

    saved: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), framework="pt", device="cpu") as f:
        for key in f.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            match = _ADAPTER_KEY.match(name)
            if match is None:
                raise ValueError(f"{weights_file}: tensor {key} is not a LoRA A/B weight; not supported")
            saved.setdefault(match["module"], {})[match["part"]] = f.get_tensor(key)

    layers = quantised_layers(model)
    unknown = sorted(set(saved) - set(layers))
    if unknown:
        raise ValueError(f"{weights_file}: adapters for {unknown[:4]} but the model has no QuantLoRALinear there "
                         f"(it has {sorted(layers)[:4]}...)")
    not_in_file = sorted(n for n, m in layers.items() if m.r > 0 and n not in saved)
    if not_in_file:
        raise ValueError(f"{weights_file}: no adapter for the model's layers {not_in_file[:4]}")

    for name, parts in saved.items():  # check every layer before changing any
        layer = layers[name]
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_file}: {name} has only {sorted(parts)}")
        a, b = parts["lora_A"], parts["lora_B"]
        if not (a.is_floating_point() and b.is_floating_point()) or not (a.isfinite().all() and b.isfinite().all()):
            raise ValueError(f"{weights_file}: adapter for {name} holds NaN/Inf or non-float values "
                             f"(lora_A {a.dtype}, lora_B {b.dtype}); refusing to load it")
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or a.shape[1] != layer.in_features or tuple(b.shape) != (layer.out_features, r) \
                or (layer.r > 0 and r != layer.r):
            want = layer.r or "r"
            raise ValueError(
                f"{weights_file}: adapter for {name} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                f"but the layer needs lora_A [{want}, {layer.in_features}] and lora_B [{layer.out_features}, {want}]")
    use_rslora = bool(config.get("use_rslora", False))
    for name, parts in saved.items():
        layer, a, b = layers[name], parts["lora_A"], parts["lora_B"]
        r = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", r))
        if layer.r == 0:
            layer.add_adapter(r, alpha, float(config.get("lora_dropout", 0.0)), use_rslora)
        layer.alpha, layer.use_rslora = alpha, use_rslora
        layer.scaling = lora_scale(r, alpha, use_rslora)
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
    return sorted(saved)
