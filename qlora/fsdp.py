"""FSDP2 for 4-bit models: the NF4 weights sharded and all-gathered in their packed form.

Mechanism: the per-parameter parts of each NF4 weight (the packed codes, uint8; the absmax codes,
uint8; the double quantisation's float32 scales) become frozen nn.Parameters of their
QuantLoRALinear, which torch.distributed.fsdp.fully_shard then shards along dim 0 like any
parameter. Per layer, FSDP2 all-gathers them (mixed dtypes travel as bytes) into ordinary tensors
that QuantLoRALinear reads exactly as it reads its buffers, so forward and backward run the same
4-bit kernels. Resident and on the wire: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.
The tables (16-entry NF4 map, 256-entry dynamic map, the offset scalar: about 1 KiB per layer)
stay replicated buffers. LoRA A and B are ordinary FSDP parameters (sharded, reduce-scattered).

Why not a tensor subclass with fsdp_pre_all_gather / fsdp_post_all_gather (torchao's NF4Tensor):
the weight is already a handful of plain tensors in bitsandbytes' layout, and a subclass would have
to implement every op FSDP2 applies to a parameter (chunk, view, copy_, ...) for no gain on the
wire. Plain frozen parameters need only FSDP2's public API, and the all-gathered bytes are the
stored bytes, so a gathered weight dequantises bit-identically to the unsharded one. Unlike
bitsandbytes under FSDP, no `quant_storage` dtype trick is needed and no quant state lives outside
the sharded tensors. After sharding, the layers' weights are read-only (no merge(), no reloading).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from qlora.layer import _WEIGHT_BUFFERS, QuantLoRALinear
from qlora.hf_load import named_tensors
from qlora.targets import quantised_layers
from qlora.nf4 import NF4Weight

# NF4Weight fields that grow with the weight: these are sharded; the tables are not.
SHARDED_FIELDS = ("packed", "absmax", "nested_absmax")


def full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a DTensor (a collective: every rank must call it), else t."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def make_nf4_shardable(model: nn.Module) -> None:
    """Turn each QuantLoRALinear's per-parameter NF4 buffers into frozen parameters, for fully_shard."""
    for layer in quantised_layers(model).values():
        for field in SHARDED_FIELDS:
            name = _WEIGHT_BUFFERS[field]
            tensor = layer._buffers.get(name)
            if tensor is None:
                continue  # no double quantisation: no nested scales
            del layer._buffers[name]
            layer._parameters[name] = nn.Parameter(tensor, requires_grad=False)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the children of the first ModuleList holding 4-bit layers): one FSDP unit
    each, so one block's weights are gathered at a time."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(quantised_layers(child) for child in module):
            return list(module)
    return []


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """Apply FSDP2 to a prepared 4-bit model: each block, then the root (embeddings, norm, lm_head).
    Call after prepare_model (and load_adapter) and before building the optimizer."""
    from torch.distributed.fsdp import fully_shard

    make_nf4_shardable(model)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_nf4_weight(layer: QuantLoRALinear) -> NF4Weight:
    """The layer's whole NF4 weight, gathered from the shards (collective); the weight itself unsharded."""
    weight = layer.nf4_weight
    return replace(weight, **{field: full_tensor(getattr(weight, field)) for field in SHARDED_FIELDS
                              if getattr(weight, field) is not None})


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the sharded NF4 parts this rank holds, bytes of those parts in the whole model)."""
    held = whole = 0
    for layer in quantised_layers(model).values():
        weight = layer.nf4_weight
        for field in SHARDED_FIELDS:
            t = getattr(weight, field)
            if t is None:
                continue
            held += local_tensor(t).numel() * t.element_size()
            whole += t.numel() * t.element_size()
    return held, whole


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base model in the bitsandbytes / Hugging Face layout, on the CPU, whole: the same
    whether the model is sharded or not (sharded: a collective, every rank must call it)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in named_tensors(model):
        if id(tensor) in seen:  # a tied weight (lm_head = embed_tokens) is stored once, as transformers does
            continue
        seen.add(id(tensor))
        state[name] = full_tensor(tensor).detach().cpu()
    for name, layer in quantised_layers(model).items():
        for key, tensor in full_nf4_weight(layer).state_dict(name).items():
            state[key] = tensor.detach().cpu()
        if layer.bias is not None:
            state[f"{name}.bias"] = full_tensor(layer.bias).detach().cpu()
    return {key: state[key].contiguous() for key in sorted(state)}


def save_nf4_checkpoint(model: nn.Module, file, write: bool = True) -> None:
    """Write the base model as one NF4 safetensors file (bitsandbytes keys), identical whether the
    model is sharded or not. Sharded, every rank must call it; only those with write=True write."""
    from safetensors.torch import save_file

    from qlora.checkpoint import replacing

    state = base_state_dict(model)
    if write:
        with replacing(file) as partial:
            save_file(state, str(partial), metadata={"format": "pt"})
