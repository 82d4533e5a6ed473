"""LoRA adapters in PEFT's file format: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's (`base_model.model.<module>.lora_A.weight`, `.lora_embedding_A` for embeddings,
`<module>.base_layer.bias` for trained biases of adapted layers, `<module>.<param>` for
modules_to_save), float32, so peft.PeftModel.from_pretrained loads what save_adapter writes and
load_adapter reads what PEFT writes.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from qlora.checkpoint import replacing
from qlora.layer import QuantLoRALinear, lora_scale
from qlora.lora_embedding import LoRAEmbedding
from qlora.lora_linear import LoRALinear
from qlora.targets import matches, set_submodule

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves adapters under the model wrapped as `base_model.model`.
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                       r"|base_layer\.bias|base_layer\.weight)$")
_PART = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
         "base_layer.bias": "bias", "base_layer.weight": "base"}


def adapted_layers(model: nn.Module) -> dict[str, QuantLoRALinear | LoRAEmbedding]:
    """Layers holding an adapter: QuantLoRALinear with r > 0, LoRALinear and LoRAEmbedding."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (LoRAEmbedding, LoRALinear)) or (isinstance(m, QuantLoRALinear) and m.r > 0)}


def _factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, LoRAEmbedding):
        return layer.lora_embedding_A, layer.lora_embedding_B
    return layer.lora_A.weight, layer.lora_B.weight


def _uniform(values: dict[str, object], what: str):
    distinct = set(values.values())
    if len(distinct) > 1:
        raise ValueError(f"save_adapter: layers differ in {what} ({sorted(map(str, distinct))}); "
                         "PEFT's format holds one value")
    return distinct.pop() if distinct else 0.0


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def _adapter_tensors(model: nn.Module, layers: dict, bias: str, modules_to_save: list[str]) -> dict:
    tensors = {}
    for name, layer in layers.items():
        parts = ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, LoRAEmbedding) else \
            ("lora_A.weight", "lora_B.weight")
        for part, weight in zip(parts, _factors(layer)):
            tensors[f"{name}.{part}"] = weight
        if bias != "none" and isinstance(getattr(layer, "bias", None), nn.Parameter):
            tensors[f"{name}.base_layer.bias"] = layer.bias
    if bias == "all":
        inside = tuple(n + "." for n in layers)
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and not name.startswith(inside):
                tensors[name] = p
    for module in modules_to_save:
        for name, p in model.get_submodule(module).named_parameters():
            tensors[f"{module}.{name}"] = p
    return {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors as PEFT does, so
    peft.PeftModel.from_pretrained loads them."""
    from safetensors.torch import save_file

    layers = adapted_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no QuantLoRALinear with an adapter (r > 0)")
    ranks = {n: m.r for n, m in layers.items()}
    alphas = {n: m.alpha for n, m in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    bias = getattr(model, "_qlora_bias", "none")
    modules_to_save = list(getattr(model, "_qlora_modules_to_save", []))
    if base_model_name_or_path is None:
        config = getattr(model, "config", None)
        base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    linears = {n: m for n, m in layers.items() if not isinstance(m, LoRAEmbedding)}
    config = {
        "peft_type": "LORA",
        "task_type": task_type or _task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _uniform({n: float(getattr(m.lora_dropout, "p", 0.0)) for n, m in linears.items()},
                                 "dropout"),
        "target_modules": sorted(layers),
        "bias": bias,
        "use_rslora": _uniform({n: m.use_rslora for n, m in layers.items()}, "use_rslora"),
        # PEFT's flag for Conv1D bases (weight stored [in, out]); the adapters' shapes are the same.
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for m in linears.values()),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": modules_to_save or None,
        # Layers off the common rank / alpha, by full name (PEFT matches these as name suffixes).
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    tensors = _adapter_tensors(model, layers, bias, modules_to_save)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with replacing(directory / ADAPTER_WEIGHTS) as partial:
        save_file(tensors, str(partial), metadata={"format": "pt"})
    with replacing(directory / ADAPTER_CONFIG) as partial:
        partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def save_pretrained_adapter(model: nn.Module, save_directory, is_main_process: bool = True, state_dict=None,
                            **kwargs) -> None:
    """A prepared model's save_pretrained (what Trainer.save_model calls): the PEFT adapter, as a
    PeftModel writes it. The 4-bit base is not written: it is the checkpoint the model was loaded
    from (qlora quantize writes one). `state_dict` (Trainer passes the model's) is not used: the
    adapter is read from the layers themselves."""
    if not is_main_process:
        return
    save_adapter(model, save_directory)


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(config_file: Path) -> dict:
    from qlora.checkpoint import read_json_object

    config = read_json_object(config_file)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type {config.get('peft_type')!r}, only 'LORA' adapters are supported")
    if config.get("use_dora"):
        raise ValueError(f"{config_file}: use_dora=True (DoRA) is not supported by qlora; only plain LoRA")
    if config.get("bias", "none") not in ("none", "all", "lora_only", None):
        raise ValueError(f"{config_file}: bias={config['bias']!r} is not one of none, all, lora_only")
    return config


def _split_keys(weights_file: Path, model: nn.Module, modules_to_save) -> tuple[dict, dict]:
    """({module: {A, B, bias, base}}, {parameter name: tensor} for biases and modules_to_save)."""
    from safetensors import safe_open

    saved: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    parameters = dict(model.named_parameters())
    with safe_open(str(weights_file), framework="pt", device="cpu") as f:
        for key in f.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            match = _LORA_KEY.match(name)
            if match is not None:
                saved.setdefault(match["module"], {})[_PART[match["part"]]] = f.get_tensor(key)
            elif name in parameters and (name.endswith(".bias") or any(
                    matches(name.rsplit(".", 1)[0], m) or name.startswith(m + ".") for m in modules_to_save or ())):
                plain[name] = f.get_tensor(key)
            else:
                raise ValueError(f"{weights_file}: tensor {key} is neither a LoRA weight nor a parameter of "
                                 f"{type(model).__name__}; not supported")
    return saved, plain


def _check_layer(weights_file: Path, name: str, layer, parts: dict) -> None:
    if getattr(layer, "merged", False):
        # Its weight holds the current adapter: new factors would not run, and unmerge() would then
        # subtract the new delta from a weight holding the old one.
        raise ValueError(f"{weights_file}: the model's {name} is merged; unmerge() it before loading an adapter")
    if "A" not in parts or "B" not in parts:
        raise ValueError(f"{weights_file}: {name} has only {sorted(parts)}")
    a, b = parts["A"], parts["B"]
    if not (a.is_floating_point() and b.is_floating_point()) or not (a.isfinite().all() and b.isfinite().all()):
        raise ValueError(f"{weights_file}: adapter for {name} holds NaN/Inf or non-float values "
                         f"(lora_A {a.dtype}, lora_B {b.dtype}); refusing to load it")
    if isinstance(layer, nn.Embedding):
        n_in, n_out = layer.weight.shape
    elif isinstance(layer, LoRAEmbedding):
        n_in, n_out = layer.num_embeddings, layer.embedding_dim
    else:
        n_in, n_out = layer.in_features, layer.out_features
    current = getattr(layer, "r", 0) if not isinstance(layer, nn.Embedding) else 0
    r = a.shape[0] if a.dim() == 2 else -1
    na, nb = ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, (nn.Embedding, LoRAEmbedding)) \
        else ("lora_A", "lora_B")
    if a.dim() != 2 or a.shape[1] != n_in or tuple(b.shape) != (n_out, r) or (current > 0 and r != current):
        want = current or "r"
        raise ValueError(f"{weights_file}: adapter for {name} has {na} {list(a.shape)} and {nb} {list(b.shape)}, "
                         f"but the layer needs {na} [{want}, {n_in}] and {nb} [{n_out}, {want}]")
    if "bias" in parts:
        bias = getattr(layer, "bias", None)
        if not isinstance(bias, nn.Parameter):
            raise ValueError(f"{weights_file}: tensor {name}.base_layer.bias, but the model's {name} has no bias")
        _check_tensor(weights_file, f"{name}.base_layer.bias", parts["bias"], bias.shape)
    if "base" in parts and isinstance(layer, (nn.Embedding, LoRAEmbedding)):
        _check_tensor(weights_file, f"{name}.base_layer.weight", parts["base"], (n_in, n_out))


def _check_tensor(weights_file: Path, key: str, tensor: torch.Tensor, shape) -> None:
    """A trained bias or modules_to_save tensor: float, finite and of the model's shape."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{weights_file}: tensor {key} has shape {list(tensor.shape)}, the model's is "
                         f"{list(shape)}")
    if not tensor.is_floating_point() or not tensor.isfinite().all():
        raise ValueError(f"{weights_file}: tensor {key} of shape {list(tensor.shape)} holds NaN/Inf or non-float "
                         f"values ({tensor.dtype}); refusing to load it")


def _number(config_file: Path, key: str, value, low: float = -math.inf, below: float = math.inf) -> float:
    """A number of adapter_config.json, finite and in [low, below)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value < below):
        raise ValueError(f"{config_file}: {key} is {value!r}; expected a finite number"
                         + (f" in [{low:g}, {below:g})" if math.isfinite(low) else ""))
    return value


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load LoRA adapters saved by PEFT or by save_adapter into the model's QuantLoRALinear layers
    (layers with r=0 get an adapter of the saved rank), embeddings (wrapped in a LoRAEmbedding) and
    full-precision linears such as lm_head (wrapped in a LoRALinear),
    with trained biases and modules_to_save. Returns the names of the adapted layers."""
    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"load_adapter: {file} does not exist")
    config = _read_config(config_file)
    saved, plain = _split_keys(weights_file, model, config.get("modules_to_save"))
    modules = dict(model.named_modules())
    layers = {n: modules.get(n) for n in saved}
    unknown = sorted(n for n, m in layers.items()
                     if not isinstance(m, (QuantLoRALinear, LoRALinear, LoRAEmbedding, nn.Embedding, nn.Linear)))
    if unknown:
        raise ValueError(f"{weights_file}: adapters for {unknown[:4]} but the model has no linear or "
                         f"embedding there")
    not_in_file = sorted(set(adapted_layers(model)) - set(saved))
    if not_in_file:
        raise ValueError(f"{weights_file}: no adapter for the model's layers {not_in_file[:4]}")
    # Everything is checked before anything changes: on any error the model is as it was.
    for name, parts in saved.items():
        _check_layer(weights_file, name, layers[name], parts)
    parameters = dict(model.named_parameters())
    for name, tensor in plain.items():
        _check_tensor(weights_file, name, tensor, parameters[name].shape)
    dropout = _number(config_file, "lora_dropout", config.get("lora_dropout") or 0.0, 0.0, 1.0)
    alphas = {name: _number(config_file, "lora_alpha", _pattern_value(config.get("alpha_pattern"), name,
                                                                      config.get("lora_alpha", parts["A"].shape[0])))
              for name, parts in saved.items()}

    use_rslora = bool(config.get("use_rslora", False))
    for name, parts in saved.items():
        a, b, layer = parts["A"], parts["B"], layers[name]
        r, alpha = a.shape[0], alphas[name]
        if isinstance(layer, nn.Embedding):
            layer = LoRAEmbedding(layer, r, alpha, use_rslora)
            set_submodule(model, name, layer)
        elif isinstance(layer, nn.Linear):  # a full-precision linear PEFT adapted (lm_head)
            layer = LoRALinear(layer, r, alpha, dropout, use_rslora)
            set_submodule(model, name, layer)
        elif isinstance(layer, QuantLoRALinear) and layer.r == 0:
            layer.add_adapter(r, alpha, dropout, use_rslora)
        layer.alpha, layer.use_rslora = alpha, use_rslora
        layer.scaling = lora_scale(r, alpha, use_rslora)
        weight_a, weight_b = _factors(layer)
        weight_a.copy_(a)
        weight_b.copy_(b)
        if "bias" in parts and isinstance(getattr(layer, "bias", None), nn.Parameter):
            layer.bias.copy_(parts["bias"])
        if "base" in parts and isinstance(layer, LoRAEmbedding):
            layer.base_layer.weight.copy_(parts["base"])
    for name, tensor in plain.items():
        parameters[name].copy_(tensor)
    return sorted(saved)
