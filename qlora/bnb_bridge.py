"""The bitsandbytes bridge: a model loaded by transformers with BitsAndBytesConfig(load_in_4bit=True, nf4 or fp4)
holds bitsandbytes Linear4bit layers; each becomes a QuantLoRALinear around the very same bytes and
quantisation state (no dequantise / requantise), so the tutorial's loading code feeds prepare_model.

bitsandbytes is not imported: its layers are recognised by class name and by the quant_state their
weight carries.
"""
from __future__ import annotations

import torch
from torch import nn

from qlora.codebook import QUANT_TYPES
from qlora.layer import QuantLoRALinear
from qlora.nf4 import SUPPORTED_DTYPES, NF4Weight
from qlora.targets import set_submodule

_BNB_4BIT_CLASSES = ("Linear4bit", "LinearNF4", "LinearFP4")


def is_bnb_linear4bit(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__ in _BNB_4BIT_CLASSES and getattr(weight, "quant_state", None) is not None


def _undo_cpu_packing(module: nn.Module) -> None:
    """bitsandbytes' CPU backend repacks a Linear4bit on its first eval forward (codes reordered,
    double-quantised absmax expanded to bfloat16); its own inverse gives back the checkpoint layout
    (the codes exactly, the absmax requantised from those bfloat16 values), as its save does."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
        module.weight.data, module.weight.quant_state)


def nf4_weight_of(module: nn.Module, name: str) -> NF4Weight:
    """The NF4Weight sharing a bitsandbytes Linear4bit's packed bytes and quant state tensors."""
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        _undo_cpu_packing(module)
    state = module.weight.quant_state
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: bitsandbytes quant_type {state.quant_type!r} is not supported, only "
                         f"{', '.join(map(repr, QUANT_TYPES))}")
    if state.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: bitsandbytes weight dtype {state.dtype} is not supported")
    packed = module.weight.data
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage=bf16/fp16/fp32: the same bytes, viewed
        packed = packed.contiguous().view(torch.uint8)
    nested = state.state2 if state.nested else None
    weight = NF4Weight(
        packed=packed.reshape(-1, 1), absmax=state.absmax, shape=tuple(state.shape), dtype=state.dtype,
        blocksize=int(state.blocksize), quant_map=state.code.float(),
        nested_absmax=None if nested is None else nested.absmax,
        nested_code=None if nested is None else nested.code,
        offset=None if nested is None else state.offset.reshape(1).float(),
        nested_blocksize=256 if nested is None else int(nested.blocksize), quant_type=state.quant_type)
    weight.validate(f"{name}.weight")
    return weight


def from_linear4bit(module: nn.Module, name: str, **kwargs) -> QuantLoRALinear:
    """A QuantLoRALinear (r=0 unless kwargs say otherwise) around a Linear4bit's bytes; the compute
    dtype is the Linear4bit's unless given."""
    kwargs.setdefault("r", 0)
    compute_dtype = getattr(module, "compute_dtype", None)
    if compute_dtype in SUPPORTED_DTYPES:
        kwargs.setdefault("compute_dtype", compute_dtype)
    bias = None if module.bias is None else module.bias.detach()
    return QuantLoRALinear.from_nf4(nf4_weight_of(module, name), bias, **kwargs)


def convert_bnb_layers(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes Linear4bit of the model by a QuantLoRALinear sharing its bytes;
    returns their names. transformers' quantizer then has nothing left to manage: the model is
    marked as one with adapters, so Trainer accepts it once prepare_model added them."""
    names = [n for n, m in model.named_modules() if is_bnb_linear4bit(m)]
    layers = {name: from_linear4bit(model.get_submodule(name), name) for name in names}  # all checked first
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    return names
