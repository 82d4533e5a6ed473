"""load_quantized: fill a model built on the meta device from a 4-bit checkpoint, giving the module
from_pretrained would build (tied embeddings tied, computed buffers computed), or failing loudly."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from qlora.layer import QuantLoRALinear
from qlora.nf4 import SUPPORTED_DTYPES, NF4Weight
from qlora.targets import is_conv1d, quantised_layers, set_submodule


def _compute_dtype_from_config(path: Path) -> torch.dtype | None:
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    quant = (raw.get("quantization_config") if isinstance(raw, dict) else None) or {}
    name = quant.get("bnb_4bit_compute_dtype") if isinstance(quant, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if dtype in SUPPORTED_DTYPES else None


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """[out, in] of a linear-like module (Conv1D stores [in, out]); None for anything else."""
    if isinstance(module, (nn.Linear, QuantLoRALinear)):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return tuple(module.weight.shape[::-1])
    return None


@torch.no_grad()
def load_quantized(model: nn.Module, path: str | Path, device: torch.device | str = "cpu",
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Fill a model built on the meta device from a quantised checkpoint (qlora's, or transformers +
    bitsandbytes'), one tensor at a time: every linear (nn.Linear or Conv1D) stored in NF4 becomes a
    QuantLoRALinear with r=0 (prepare_model adds the adapters) holding the stored bytes, so no
    full-precision copy of a quantised weight ever exists. Other tensors are loaded as stored."""
    from qlora.checkpoint import nf4_part_names, nf4_prefixes, read_tensors, tensor_headers

    path = Path(path)
    compute_dtype = compute_dtype or _compute_dtype_from_config(path) or torch.bfloat16
    headers = tensor_headers(path)
    used: set[str] = set()

    modules = dict(model.named_modules())
    for prefix in nf4_prefixes(headers):
        linear = modules.get(prefix)
        shape = None if linear is None else _linear_shape(linear)
        if shape is None:
            continue
        parts = [n for n in nf4_part_names(prefix) if n in headers]
        tensors = {name: t.to(device) for name, t in read_tensors(headers, parts)}
        weight = NF4Weight.from_state_dict(tensors, prefix)
        if tuple(weight.shape) != shape:
            raise ValueError(f"{prefix}.weight: shape {list(weight.shape)} in {path}, but the model's layer is "
                             f"[{shape[0]}, {shape[1]}] ([out, in])")
        bias = None
        if linear.bias is not None:
            if f"{prefix}.bias" not in headers:
                raise ValueError(f"{prefix}.bias: missing from {path}")
            (_, bias), = read_tensors(headers, [f"{prefix}.bias"])
            parts.append(f"{prefix}.bias")
        layer = QuantLoRALinear.from_nf4(weight, None if bias is None else bias.to(device), r=0,
                                         compute_dtype=compute_dtype)
        layer.fan_in_fan_out = is_conv1d(linear)
        set_submodule(model, prefix, layer)
        used.update(parts)

    if hasattr(model, "tie_weights"):  # output embeddings share the input ones, as from_pretrained ties them
        model.tie_weights()
    used |= _load_other_tensors(model, headers, path, device)
    _materialise_computed_buffers(model, device)
    unused = sorted(set(headers) - used)
    if unused:
        warnings.warn(f"load_quantized: {len(unused)} tensors of {path} fit no module, e.g. {unused[:4]}")
    return model


def _load_other_tensors(model: nn.Module, headers, path: Path, device) -> set[str]:
    """Everything but the NF4 linears, tied tensors (lm_head / embed_tokens) kept tied: one
    Parameter under every name. Returns the checkpoint keys used."""
    from qlora.checkpoint import read_tensors

    by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, tuple[torch.Tensor, bool]] = {}
    for name, tensor in named_tensors(model):
        by_tensor.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor, isinstance(tensor, nn.Parameter)
    missing, used = [], set()
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
    return used


def named_tensors(model: nn.Module):
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
    """Non-persistent buffers (rotary inv_freq, Gemma's embed_scale, ...) are computed, not stored:
    allocate them (NaN-filled) and let a Hugging Face model's _init_weights compute them, with the
    module's loaded parameters swapped out for meta stand-ins so that no initialiser can touch them
    (a re-initialised tied embedding was Gemma's silent failure). A buffer _init_weights did not
    fill, or anything still on meta, is an error."""
    left, computed = [], []
    for module_name, module in model.named_modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        prefix = module_name + "." if module_name else ""
        if not hasattr(model, "_init_weights"):
            left.extend(prefix + n for n in meta)
            continue
        for n in meta:
            buffer = torch.empty_like(module._buffers[n], device=device)
            module._buffers[n] = buffer.fill_(float("nan")) if buffer.is_floating_point() else buffer
            computed.append((prefix + n, module, n))
        loaded = {n: p for n, p in module._parameters.items() if p is not None}
        for n, p in loaded.items():
            module._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        try:
            model._init_weights(module)
        finally:
            module._parameters.update(loaded)
    unfilled = [name for name, module, n in computed
                if module._buffers[n].is_floating_point() and bool(module._buffers[n].isnan().any())]
    if unfilled:
        raise ValueError(f"load_quantized: {type(model).__name__}._init_weights did not compute the buffers "
                         f"{', '.join(unfilled[:8])}; this model cannot be loaded from the meta device")
    left += [n for n, p in model.named_parameters() if p.is_meta]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"load_quantized: still on the meta device after loading: {', '.join(left[:8])}")
