"""QuantLoRALinear: a frozen NF4 weight plus trainable LoRA adapters, a drop-in for nn.Linear.

y = x W^T + b + scale * dropout(x) A^T B^T, with W held in bitsandbytes' 4-bit layout and
scale = alpha / r (alpha / sqrt(r) with rsLoRA). The module's state dict uses the keys a
transformers + bitsandbytes checkpoint uses (`weight`, `weight.absmax`, ...), and the adapters
are `lora_A` / `lora_B` submodules as in PEFT, so their keys read `...lora_A.weight`.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from qlora.nf4 import NESTED_BLOCKSIZE, SUPPORTED_DTYPES, NF4Weight, check_blocksize, nf4_linear, quantize_nf4

# Buffer name of each NF4Weight field. Buffers (not parameters) so .to(device) moves them and
# the optimiser never sees them; non-persistent because _save_to_state_dict writes them under
# bitsandbytes' dotted keys, which buffer names cannot hold.
_WEIGHT_BUFFERS = {
    "packed": "weight",
    "absmax": "weight_absmax",
    "quant_map": "weight_quant_map",
    "nested_absmax": "weight_nested_absmax",
    "nested_code": "weight_nested_quant_map",
    "offset": "weight_offset",
}


def _as_nf4(packed, absmax, quant_map, nested_absmax, nested_code, offset, layout) -> NF4Weight:
    shape, dtype, blocksize, nested_blocksize, quant_type = layout
    return NF4Weight(packed=packed, absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize,
                     quant_map=quant_map, nested_absmax=nested_absmax, nested_code=nested_code,
                     offset=offset, nested_blocksize=nested_blocksize, quant_type=quant_type)


def _meta_nf4(shape: tuple[int, int], dtype: torch.dtype, blocksize: int, double_quant: bool,
              quant_type: str = "nf4") -> NF4Weight:
    """An NF4Weight on the meta device: every part with its shape and dtype, no values (nothing to quantise)."""
    check_blocksize(blocksize)
    numel = math.prod(shape)
    n_blocks = -(-numel // blocksize)
    meta = dict(device="meta")
    fields = dict(packed=torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, **meta),
                  absmax=torch.empty(n_blocks, dtype=torch.uint8 if double_quant else torch.float32, **meta),
                  quant_map=torch.empty(16, dtype=torch.float32, **meta), shape=shape, dtype=dtype,
                  blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        fields.update(nested_absmax=torch.empty(-(-n_blocks // NESTED_BLOCKSIZE), dtype=torch.float32, **meta),
                      nested_code=torch.empty(256, dtype=torch.float32, **meta),
                      offset=torch.empty((), dtype=torch.float32, **meta))
    return NF4Weight(**fields)


def _initial_weight(out_features: int, in_features: int, dtype: torch.dtype, blocksize: int, double_quant: bool,
                    device, quant_type: str = "nf4") -> NF4Weight:
    """nn.Linear's initialisation, quantised (on the meta device: the layout alone)."""
    init = torch.empty(out_features, in_features, dtype=dtype, device=device)
    if init.is_meta:  # device="meta" or a `with torch.device("meta")` block
        return _meta_nf4((out_features, in_features), dtype, blocksize, double_quant, quant_type)
    nn.init.kaiming_uniform_(init, a=math.sqrt(5))
    return quantize_nf4(init, blocksize, double_quant, quant_type=quant_type)


def _init_bias_(bias: torch.Tensor, in_features: int) -> None:
    bound = 1 / math.sqrt(in_features) if in_features else 0.0
    with torch.no_grad():
        bias.uniform_(-bound, bound)


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (which keeps updates stable as r grows)."""
    if r <= 0:
        return 0.0
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@contextlib.contextmanager
def adapter_disabled(layer: nn.Module, merged_state, remerge):
    """disable_adapter() of every adapter layer: the adapter off inside the block; a merged layer
    (merged_state not None) unmerged for the block and after it given merged_state back by remerge()."""
    if merged_state is not None:
        layer.unmerge()
    previous, layer._adapter_disabled = layer._adapter_disabled, True
    try:
        yield layer
    finally:
        layer._adapter_disabled = previous
        if merged_state is not None and not layer.merged:
            remerge(merged_state)


class QuantLoRALinear(nn.Module):
    """Frozen NF4 linear plus LoRA. r = 0 means no adapter (a plain 4-bit linear).

    device="meta" (or a `with torch.device("meta")` block) builds the layout without values,
    as large models are assembled: then load_state_dict(..., assign=True), or to_empty() and
    load_state_dict() / reset_parameters().
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.0,
        bias: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        use_rslora: bool = False,
        *,
        weight: NF4Weight | None = None,
        adapter_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if compute_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"compute_dtype {compute_dtype} is not supported; use float32, bfloat16 or float16")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.compute_dtype = compute_dtype
        if weight is None:
            # nn.Linear's own initialisation, quantised: a fresh layer behaves like a fresh nn.Linear.
            weight = _initial_weight(self.out_features, self.in_features, compute_dtype, blocksize, double_quant,
                                     device)
        for name in _WEIGHT_BUFFERS.values():
            self.register_buffer(name, None, persistent=False)
        self._set_weight(weight)
        if bias:
            init_bias = torch.empty(self.out_features, dtype=weight.dtype, device=weight.device)
            _init_bias_(init_bias, self.in_features)
            self.bias = nn.Parameter(init_bias, requires_grad=False)  # part of the frozen base
        else:
            self.register_parameter("bias", None)
        self.merged = False
        self._original_weight: NF4Weight | None = None  # the bytes merge() replaced
        self._merge_report: dict[str, float] | None = None
        self._adapter_disabled = False
        self.add_adapter(r, alpha, dropout, use_rslora, dtype=adapter_dtype)

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_nf4(cls, weight: NF4Weight, bias: torch.Tensor | None = None, **kwargs) -> QuantLoRALinear:
        """A layer around an existing NF4Weight [out, in] (e.g. read from a checkpoint)."""
        if len(weight.shape) != 2:
            raise ValueError(f"weight: expected a 2-D [out, in] NF4Weight, got shape {list(weight.shape)}")
        out_features, in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias: shape {list(bias.shape)} does not fit a weight of shape {list(weight.shape)}")
        layer = cls(in_features, out_features, bias=False, weight=weight, **kwargs)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(weight.device), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64, double_quant: bool = True,
                    **kwargs) -> QuantLoRALinear:
        """Quantise an nn.Linear's weight to NF4 (in its own dtype and on its device)."""
        weight = quantize_nf4(linear.weight.detach(), blocksize, double_quant, name="linear.weight")
        return cls.from_nf4(weight, linear.bias, **kwargs)

    def add_adapter(self, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    dtype: torch.dtype = torch.float32) -> None:
        """(Re)create the adapters: A Kaiming-uniform (a = sqrt 5), B zeros, so the output is unchanged."""
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if self.merged:
            raise RuntimeError("unmerge() before replacing the adapter")
        self.r, self.alpha, self.use_rslora = int(r), alpha, use_rslora
        self.scaling = lora_scale(self.r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.r == 0:
            self.lora_A = self.lora_B = None
            return
        device = self.weight.device
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=dtype)
        self._init_adapter()

    def _init_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh layer's values on the layer's device (after to_empty() from the meta device):
        nn.Linear's initialisation quantised, the bias likewise, A Kaiming-uniform and B zeros."""
        weight = _initial_weight(self.out_features, self.in_features, self.weight_dtype, self.blocksize,
                                 self.double_quant, self.weight.device, self.quant_type)
        self._set_weight(weight)
        self.merged, self._original_weight, self._merge_report = False, None, None
        if self.bias is not None:
            _init_bias_(self.bias, self.in_features)
        if self.r:
            self._init_adapter()

    # ---- the NF4 weight held as buffers ----------------------------------------------------------

    def _set_weight(self, weight: NF4Weight) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight: shape {list(weight.shape)} does not fit a layer with "
                             f"out_features={self.out_features}, in_features={self.in_features}")
        for field, name in _WEIGHT_BUFFERS.items():
            self._buffers[name] = getattr(weight, field)
        self.weight_dtype = weight.dtype
        self.blocksize = weight.blocksize
        self.nested_blocksize = weight.nested_blocksize
        self.quant_type = weight.quant_type

    @property
    def nf4_weight(self) -> NF4Weight:
        """The base weight as an NF4Weight sharing this module's buffers."""
        return _as_nf4(*self._weight_tensors(), self._layout())

    def _weight_tensors(self) -> tuple:
        # Buffers normally; frozen parameters once qlora.fsdp has made them shardable by FSDP2.
        return tuple(self._buffers[name] if name in self._buffers else self._parameters[name]
                     for name in _WEIGHT_BUFFERS.values())

    def _layout(self) -> tuple:
        return ((self.out_features, self.in_features), self.weight_dtype, self.blocksize, self.nested_blocksize,
                self.quant_type)

    @property
    def double_quant(self) -> bool:
        return self.nf4_weight.double_quant

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() must move the 4-bit buffers but never cast them:
        # absmax and the tables are float32 by definition of the format.
        quantised = {name: self._buffers.pop(name) for name in _WEIGHT_BUFFERS.values() if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in quantised.items():
                if tensor is not None:
                    moved = fn(tensor)
                    tensor = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
                self._buffers[name] = tensor
        if self._original_weight is not None and self.weight is not None:
            self._original_weight = self._original_weight.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.nf4_weight
        meta = weight.device.type == "meta"
        if meta and weight.offset is not None:
            # The quant state's JSON holds the offset's value, which a meta layer does not have yet:
            # the keys and shapes are what a meta state dict is for (every tensor stays on meta).
            weight = replace(weight, offset=torch.zeros((), dtype=torch.float32))
        for key, tensor in weight.state_dict(prefix[:-1]).items():
            tensor = tensor.to("meta") if meta else tensor
            destination[key] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        ours = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if not (k == key or k.startswith(key + "."))}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not ours:
            missing_keys.append(key)
            return
        try:
            weight = NF4Weight.from_state_dict(ours, prefix[:-1])  # full keys, so errors name the module
            if tuple(weight.shape) != (self.out_features, self.in_features):
                raise ValueError(f"{key}: shape {list(weight.shape)} in the checkpoint, the layer is "
                                 f"[{self.out_features}, {self.in_features}]")
        except (KeyError, ValueError) as err:
            error_msgs.append(str(err).strip("'\""))
            return
        current = self.weight.device
        assign = local_metadata.get("assign_to_params_buffers", False) or current.type == "meta"
        self._set_weight(weight if assign else weight.to(current))
        self.merged, self._original_weight, self._merge_report = False, None, None

    # ---- forward ---------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"x: dtype {x.dtype} of shape {list(x.shape)} is not supported by {self._name()}; "
                            "use float32, bfloat16 or float16")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: shape {list(x.shape)} does not fit {self._name()}: "
                             f"the last dimension must be {self.in_features}")

    def _name(self) -> str:
        return f"QuantLoRALinear(in_features={self.in_features}, out_features={self.out_features})"

    @property
    def adapter_active(self) -> bool:
        return self.r > 0 and not self.merged and not self._adapter_disabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # One cast shared by the base and the adapter; the result goes back to x's dtype, as
        # bitsandbytes' Linear4bit does, so fp32 residual streams stay fp32.
        h = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        # The op's own autograd keeps only references to the 4-bit buffers the module holds anyway:
        # no dequantised W lives between forward and backward.
        out = nf4_linear(h, self.nf4_weight, bias)
        if self.adapter_active:
            lora_a, lora_b = self._adapter_in_compute_dtype()
            down = F.linear(self.lora_dropout(h), lora_a).reshape(-1, self.r)
            # addmm adds B's product into the base output inside the GEMM: no extra [M, out] temporary.
            out = torch.addmm(out.reshape(-1, self.out_features), down, lora_b.t(), alpha=self.scaling)
            out = out.view(*x.shape[:-1], self.out_features)
        return out.to(x.dtype)

    def _adapter_in_compute_dtype(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in compute_dtype. Without autograd (generation), the cast of fp32 adapters is kept
        until they change (their version counters), not redone every forward; with autograd, the
        cast is part of the graph."""
        a, b, dtype = self.lora_A.weight, self.lora_B.weight, self.compute_dtype
        if (a.dtype == dtype and b.dtype == dtype) or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return a.to(dtype), b.to(dtype)
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), a.device, dtype,
               torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_adapter_cast")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_adapter_cast"] = (key, a.to(dtype), b.to(dtype))
        return cached[1], cached[2]

    def disable_adapter(self):
        """Run the base layer alone inside the block. A merged layer gets its original bytes back for
        the block (PEFT unmerges too) and its merged bytes after it (PEFT stays unmerged: see README)."""
        return adapter_disabled(self, (self.nf4_weight, self._merge_report) if self.merged else None,
                                self._remerge)

    def _remerge(self, merged: tuple) -> None:
        # The same bytes merge() made: requantising W + scale*B@A again would give them too.
        self._original_weight = self.nf4_weight
        self._set_weight(merged[0].to(self.weight.device))
        self.merged, self._merge_report = True, merged[1]

    # ---- merging and export ----------------------------------------------------------------------

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * B @ A: what the adapter adds to W."""
        if self.r == 0:
            return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.weight.device)
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> dict[str, float]:
        """Fold the adapter into the 4-bit weight (dequantise, add, requantise) and report what the
        requantisation lost: errors of the new 4-bit W against W + scale*B@A, next to the size of the
        update itself (an update far below the NF4 step is mostly lost). unmerge() undoes it exactly.

        As in PEFT, merging a merged layer warns and changes nothing (the report is the first one's).
        safe_merge is PEFT's argument; every merge here is safe: a non-finite result is refused
        before anything changes."""
        if self.r == 0:
            raise RuntimeError("merge(): this layer has no adapter (r=0)")
        if self.merged:
            # PEFT's words, so code that filters or checks them keeps working.
            warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
            return dict(self._merge_report)
        original = self.nf4_weight
        delta = self.delta_weight(torch.float32)
        target = original.dequantize(torch.float32) + delta
        merged = quantize_nf4(target.to(original.dtype), original.blocksize, original.double_quant,
                              name="merged weight", quant_type=original.quant_type)
        error = merged.dequantize(torch.float32) - target
        self._original_weight = original
        self._set_weight(replace(merged, nested_blocksize=original.nested_blocksize))
        self.merged = True
        self._merge_report = {
            "max_abs_error": float(error.abs().max()),
            "rms_error": float(error.pow(2).mean().sqrt()),
            "delta_rms": float(delta.pow(2).mean().sqrt()),
        }
        return dict(self._merge_report)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact 4-bit bytes merge() replaced (on a layer that is not merged: a warning
        and nothing else, as in PEFT)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        self._set_weight(self._original_weight.to(self.weight.device))
        self._original_weight, self.merged, self._merge_report = None, False, None

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain nn.Linear holding W + scale*B@A computed in full precision: the lossless export."""
        base = self._original_weight if self.merged else self.nf4_weight
        weight = base.dequantize(torch.float32) + self.delta_weight(torch.float32)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, use_rslora={self.use_rslora}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}, merged={self.merged}")
