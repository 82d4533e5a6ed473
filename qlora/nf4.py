"""NF4Weight: a 4-bit weight (NF4 or FP4) in bitsandbytes' exact layout, and quantize_4bit /
quantize_nf4 that make one."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from qlora.codebook import QUANT_TYPES
from qlora.kernels import matmul
from qlora.kernels.dequantize import dequantize_nf4
from qlora.kernels.quantize import (NESTED_BLOCKSIZE, check_blocksize, count_nonfinite, device_code_table,
                                   quantize_absmax, quantize_nf4_blocks)
from qlora.kernels.quantize_fp4 import quantize_fp4_blocks

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
# The key of the JSON quant state names the type: bitsandbytes writes one of these per weight.
QUANT_STATE_KEYS = {quant_type: f"quant_state.bitsandbytes__{quant_type}" for quant_type in QUANT_TYPES}
_BLOCK_QUANTIZERS = {"nf4": quantize_nf4_blocks, "fp4": quantize_fp4_blocks}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


@dataclass(frozen=True)
class NF4Weight:
    """A blockwise 4-bit tensor (NF4, or FP4 with quant_type="fp4"), stored exactly as bitsandbytes stores it.

    packed: uint8 [(numel+1)//2, 1], two codes per byte, element 2i in the high nibble.
    absmax: uint8 [n_blocks] codes with double quantisation, else float32 [n_blocks].
    nested_absmax, nested_code, offset: the double quantisation's float32 scales
    [ceil(n_blocks/256)], its 256-entry dynamic map and the mean that was subtracted.
    quant_map: the 16 values of the codes (the NF4 or FP4 table), what every kernel decodes with.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    quant_map: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_type: str = "nf4"

    def __post_init__(self):
        if self.quant_map is None:
            object.__setattr__(self, "quant_map", device_code_table(self.quant_type, self.packed.device).clone())
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of everything that must be stored: codes, scales and tables."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the codes and block scales (tables, shared by all weights, left out)."""
        data = self.packed.numel() * 8 + self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            data += self.nested_absmax.numel() * 32
        return data / self.numel

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"packed": self.packed, "absmax": self.absmax, "quant_map": self.quant_map}
        if self.double_quant:
            tensors.update(nested_absmax=self.nested_absmax, nested_code=self.nested_code, offset=self.offset)
        return tensors

    def to(self, device) -> NF4Weight:
        return replace(self, **{k: v.to(device) for k, v in self._tensors().items()})

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in dtype (default: the original dtype), bit-identical to bitsandbytes."""
        _check_float_dtype("dequantize", dtype or self.dtype)
        out = dequantize_nf4(
            self.packed, self.absmax, self.quant_map, self.numel, self.blocksize, dtype or self.dtype,
            self.nested_absmax, self.nested_code, self.offset,
        )
        return out.view(self.shape)

    def quant_state_json(self) -> dict:
        state = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype],
                 "shape": list(self.shape)}
        if self.double_quant:
            state.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                         nested_offset=float(self.offset))
        return state

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The bitsandbytes / Hugging Face keys of a linear at `prefix` (e.g. "model.layers.0.mlp.up_proj")."""
        key = f"{prefix}.weight" if prefix else "weight"
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        out = {
            key: self.packed,
            f"{key}.absmax": self.absmax,
            f"{key}.quant_map": self.quant_map,
        }
        if self.double_quant:
            out[f"{key}.nested_absmax"] = self.nested_absmax
            out[f"{key}.nested_quant_map"] = self.nested_code
        out[f"{key}.{QUANT_STATE_KEYS[self.quant_type]}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "") -> NF4Weight:
        """Inverse of state_dict: reads qlora's or bitsandbytes' keys for the linear at `prefix`."""
        key = f"{prefix}.weight" if prefix else "weight"
        quant_type = next((t for t, k in QUANT_STATE_KEYS.items() if f"{key}.{k}" in state_dict), "nf4")
        state_key = f"{key}.{QUANT_STATE_KEYS[quant_type]}"
        missing = [k for k in (key, f"{key}.absmax", state_key) if k not in state_dict]
        if missing:
            raise KeyError(f"{key}: not an NF4 weight, missing {', '.join(missing)}")
        blob = state_dict[state_key]
        try:
            state = json.loads(bytes(blob.to("cpu", torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"{state_key}: not valid UTF-8 JSON ({str(err)[:200]})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{state_key}: expected a JSON object, got {type(state).__name__}")
        if state.get("quant_type") != quant_type:
            raise ValueError(f"{state_key}: quant_type {state.get('quant_type')!r} does not match the key's "
                             f"{quant_type!r}")
        if state.get("dtype") not in _DTYPES_BY_NAME:
            raise ValueError(f"{key}: unsupported original dtype {state.get('dtype')!r}")
        double_quant = "nested_blocksize" in state
        needed = ["shape", "blocksize"] + (["nested_offset"] if double_quant else [])
        missing = [field for field in needed if field not in state]
        missing += [k for k in ([f"{key}.nested_absmax", f"{key}.nested_quant_map"] if double_quant else [])
                    if k not in state_dict]
        if missing:
            raise ValueError(f"{key}: double-quantised NF4 weight without {', '.join(missing)}" if double_quant
                             else f"{key}: NF4 quant state without {', '.join(missing)}")
        packed = packed_bytes(state_dict[key], key, state["shape"])
        weight = cls(
            packed=packed,
            absmax=state_dict[f"{key}.absmax"],
            shape=tuple(state["shape"]),
            dtype=_DTYPES_BY_NAME[state["dtype"]],
            blocksize=int(state["blocksize"]),
            quant_map=state_dict.get(f"{key}.quant_map"),
            nested_absmax=state_dict[f"{key}.nested_absmax"] if double_quant else None,
            nested_code=state_dict[f"{key}.nested_quant_map"] if double_quant else None,
            # On the weight's device: a CPU scalar here would make every GPU forward copy and sync.
            offset=(torch.tensor(state["nested_offset"], dtype=torch.float32, device=packed.device)
                    if double_quant else None),
            nested_blocksize=int(state.get("nested_blocksize", NESTED_BLOCKSIZE)),
            quant_type=quant_type,
        )
        weight.validate(key)
        # A NaN in a code table would decode silently. (NaN scales may be meant: --allow-nonfinite.)
        for part in ("quant_map", "nested_code"):
            tensor = getattr(weight, part)
            if tensor is not None and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{key}.{part}: holds NaN/Inf values in shape {list(tensor.shape)}; "
                                 "the checkpoint is corrupt")
        return weight

    def validate(self, name: str = "weight") -> None:
        """Raise ValueError naming the tensor if the parts do not fit together."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"{name}: quant_type {self.quant_type!r} is not supported, only "
                             f"{' or '.join(map(repr, QUANT_TYPES))}")
        try:
            check_blocksize(self.blocksize)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        if self.double_quant and self.nested_blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"{name}: nested_blocksize {self.nested_blocksize} is not supported, "
                             f"only {NESTED_BLOCKSIZE} (what bitsandbytes writes)")
        expect = {"packed": ((self.numel + 1) // 2, torch.uint8),
                  "absmax": (self.n_blocks, torch.uint8 if self.double_quant else torch.float32),
                  "quant_map": (16, torch.float32)}
        if self.double_quant:
            expect["nested_absmax"] = (-(-self.n_blocks // self.nested_blocksize), torch.float32)
            expect["nested_code"] = (256, torch.float32)
        for part, (numel, dtype) in expect.items():
            tensor = getattr(self, part)
            if tensor.numel() != numel or tensor.dtype != dtype:
                raise ValueError(
                    f"{name}.{part}: expected {numel} values of {dtype} for shape {list(self.shape)} "
                    f"and blocksize {self.blocksize}, got {tuple(tensor.shape)} of {tensor.dtype}"
                )


def packed_bytes(packed: torch.Tensor, name: str, shape) -> torch.Tensor:
    """The packed codes as uint8 [bytes, 1]. bitsandbytes' quant_storage (bfloat16, float16, float32
    for FSDP, which wants every tensor in one dtype) stores the same bytes viewed as that dtype,
    [(numel+1)//2 / itemsize, 1]: view them back; a byte count that does not fit is refused by name."""
    if packed.dtype == torch.uint8:
        return packed
    needed = (math.prod(int(s) for s in shape) + 1) // 2
    stored = packed.numel() * packed.element_size()
    if stored != needed:
        raise ValueError(f"{name}: {list(packed.shape)} of {packed.dtype} (quant storage) holds {stored} bytes; "
                         f"a weight of shape {list(shape)} needs {needed}")
    return packed.contiguous().view(-1).view(torch.uint8).view(-1, 1)


def quantize_nf4(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    name: str = "weight",
    allow_nonfinite: bool = False,
    quant_type: str = "nf4",
) -> NF4Weight:
    """Quantise a float32 / bfloat16 / float16 tensor of any shape to NF4 (bitsandbytes bytes);
    quant_type="fp4" makes FP4 (see quantize_4bit)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {w.dtype} of shape {list(w.shape)} is not supported; "
                        "use float32, bfloat16 or float16")
    if w.numel() == 0:
        raise ValueError(f"{name}: shape {list(w.shape)} has no elements")
    if w.is_meta:
        raise ValueError(f"{name}: shape {list(w.shape)} is on the meta device and holds no values to quantise; "
                         "load or initialise it on a real device first")
    check_blocksize(blocksize)
    if quant_type not in _BLOCK_QUANTIZERS:
        raise ValueError(f"{name}: quant_type must be {' or '.join(map(repr, QUANT_TYPES))}, got {quant_type!r}")
    packed, absmax = _BLOCK_QUANTIZERS[quant_type](w.detach(), blocksize)
    # NaN or Inf shows in its block's absmax (NF4's kernel keeps NaN in its max, as the references'
    # amax does): checking the scales reads 1/blocksize of w and allocates nothing of w's size. FP4's
    # kernel may drop a NaN from its max, so there the input itself is counted, a chunk at a time.
    if not allow_nonfinite and (not bool(torch.isfinite(absmax).all()) if quant_type == "nf4"
                                else count_nonfinite(w) > 0):
        raise ValueError(f"{name}: shape {list(w.shape)} holds {count_nonfinite(w)} NaN/Inf values")
    fields = dict(packed=packed.view(-1, 1), absmax=absmax, shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize,
                  quant_type=quant_type)
    if double_quant:
        codes, nested_absmax, offset = quantize_absmax(absmax)
        fields.update(absmax=codes, nested_absmax=nested_absmax, nested_code=device_code_table("dynamic", w.device).clone(),
                      offset=offset)
    return NF4Weight(**fields)


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    name: str = "weight",
    allow_nonfinite: bool = False,
) -> NF4Weight:
    """Quantise w to bitsandbytes' 4-bit format: quant_type "nf4" (the QLoRA default) or "fp4", with
    the bytes bitsandbytes' CUDA kernel writes (bnb_4bit_quant_type, blocksize, compress_statistics)."""
    return quantize_nf4(w, blocksize, double_quant, name=name, allow_nonfinite=allow_nonfinite, quant_type=quant_type)


def _check_float_dtype(what: str, dtype: torch.dtype) -> None:
    """The kernels compute in float32 / bfloat16 / float16: anything else would come back as zeros."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: dtype {dtype} is not supported; use float32, bfloat16 or float16")


def _kernel_args(w: NF4Weight) -> tuple:
    out_features, in_features = w.shape
    return (w.packed, w.absmax, w.quant_map, out_features, in_features, w.blocksize,
            w.nested_absmax, w.nested_code, w.offset)


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for x [..., in] with W a 2-D NF4Weight [out, in]."""
    if x.dtype not in SUPPORTED_DTYPES:  # the message is formatted only when needed (host time per call)
        _check_float_dtype(f"nf4_linear: x of shape {list(x.shape)}", x.dtype)
    if len(w.shape) != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x: shape {list(x.shape)} does not fit a weight of shape {list(w.shape)} "
                         f"(the last dimension must be {w.shape[-1]})")
    return matmul.nf4_linear(x, *_kernel_args(w), bias=bias)


def nf4_linear_grad_input(grad_out: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """grad_out @ W for grad_out [..., out]: the input gradient of nf4_linear."""
    _check_float_dtype(f"nf4_linear_grad_input: grad_out of shape {list(grad_out.shape)}", grad_out.dtype)
    if len(w.shape) != 2 or grad_out.shape[-1] != w.shape[0]:
        raise ValueError(f"grad_out: shape {list(grad_out.shape)} does not fit a weight of shape "
                         f"{list(w.shape)} (the last dimension must be {w.shape[0]})")
    return matmul.nf4_linear_grad_input(grad_out, *_kernel_args(w))
