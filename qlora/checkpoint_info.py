"""`qlora inspect PATH [--against ORIGINAL]`: what a checkpoint holds, tensor by tensor.

Shapes, formats and bytes come from the safetensors headers and each NF4 weight's small
quant_state JSON; only --against reads whole tensors, one weight at a time.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from qlora.checkpoint import (
    CheckpointError, nf4_part_names, nf4_prefixes, quant_state_name, read_tensors, tensor_headers,
)
from qlora.codebook import QUANT_TYPES as QUANTIZED_FORMATS
from qlora.nf4 import NF4Weight

SHORT_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    format: str  # "nf4-dq", "nf4", "fp4-dq", "fp4", or the stored dtype ("bf16", "fp32", "u8", ...)
    nbytes: int  # everything stored for it, an NF4 weight's scales and tables included
    blocksize: int | None = None
    rel_error: float | None = None  # ||W - W_stored|| / ||W|| against the original, with --against

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / max(self.numel, 1)


def _dtype_name(dtype: torch.dtype) -> str:
    return SHORT_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def describe_checkpoint(path: str | os.PathLike) -> list[TensorInfo]:
    """One TensorInfo per weight of a checkpoint, plain or quantised, in file order."""
    headers = tensor_headers(path)
    parts_of = {prefix: [n for n in nf4_part_names(prefix) if n in headers] for prefix in nf4_prefixes(headers)}
    owner = {part: prefix for prefix, parts in parts_of.items() for part in parts}
    state_names = {prefix: quant_state_name(prefix, headers) for prefix in parts_of}
    blobs = dict(read_tensors(headers, list(state_names.values())))
    rows = []
    for name, header in headers.items():
        prefix = owner.get(name)
        if prefix is None:
            rows.append(TensorInfo(name, header.shape, _dtype_name(header.dtype), header.nbytes))
        elif name == f"{prefix}.weight":
            blob = blobs[state_names[prefix]]
            try:
                state = json.loads(bytes(blob.tolist()).decode("utf-8"))
                shape, blocksize = tuple(int(s) for s in state["shape"]), int(state["blocksize"])
                # The key names the type; the JSON must agree (as loading requires).
                quant_type = state_names[prefix].rsplit("__", 1)[1]
                if state.get("quant_type", quant_type) != quant_type:
                    raise ValueError(f"quant_type {state.get('quant_type')!r} under a {quant_type} key")
                # bytes, not elements: bnb_4bit_quant_storage may store the codes as bf16/fp16/fp32
                _check_nf4_shape(shape, blocksize, header.nbytes)
            except (ValueError, KeyError, TypeError, RecursionError) as err:
                raise CheckpointError(f"{header.file}: tensor {state_names[prefix]}: corrupt quant state "
                                      f"({type(err).__name__}: {str(err)[:200]})") from None
            fmt = quant_type + ("-dq" if "nested_blocksize" in state else "")
            nbytes = sum(headers[part].nbytes for part in parts_of[prefix])
            rows.append(TensorInfo(name, shape, fmt, nbytes, blocksize))
    return rows


def _check_nf4_shape(shape: tuple[int, ...], blocksize: int, packed_bytes: int) -> None:
    """The quant state's shape must be non-negative and fit the packed codes (two per byte)."""
    if any(s < 0 for s in shape) or blocksize < 1:
        raise ValueError(f"negative shape {list(shape)} or blocksize {blocksize}")
    if (math.prod(shape) + 1) // 2 != packed_bytes:
        raise ValueError(f"shape {list(shape)} needs {(math.prod(shape) + 1) // 2} packed bytes, "
                         f"the weight holds {packed_bytes}")


def add_reconstruction_errors(path: str | os.PathLike, rows: list[TensorInfo], original: str | os.PathLike) -> None:
    """Fill rel_error of each row found in the original checkpoint (one weight in memory at a time)."""
    headers, original_headers = tensor_headers(path), tensor_headers(original)
    for row in rows:
        if row.name not in original_headers:
            continue
        header = original_headers[row.name]
        if header.shape != row.shape:
            raise CheckpointError(f"{header.file}: tensor {row.name}: shape {list(header.shape)} in the original, "
                                  f"{list(row.shape)} in {path}")
        (_, reference), = read_tensors(original_headers, [row.name])
        if row.format.startswith(QUANTIZED_FORMATS):
            parts = dict(read_tensors(headers, [n for n in nf4_part_names(row.name[: -len('.weight')]) if n in headers]))
            try:
                stored = NF4Weight.from_state_dict(parts, row.name[: -len(".weight")]).dequantize(torch.float32)
            except (KeyError, ValueError) as err:
                raise CheckpointError(f"{path}: {str(err).strip(chr(39))}") from None
        else:
            (_, stored), = read_tensors(headers, [row.name])
        if not (reference.is_floating_point() and stored.is_floating_point()):
            row.rel_error = 0.0 if torch.equal(reference, stored) else float("inf")
            continue
        reference, stored = reference.to(torch.float32), stored.to(torch.float32)
        norm = torch.linalg.vector_norm(reference)
        diff = torch.linalg.vector_norm(reference - stored)
        row.rel_error = float(diff / norm) if norm > 0 else float(diff)


def format_table(rows: list[TensorInfo]) -> str:
    """A fixed-width table and a totals block."""
    show_error = any(row.rel_error is not None for row in rows)
    header = ["name", "shape", "format", "bytes", "bits/param"] + (["rel. error"] if show_error else [])
    lines = []
    for row in rows:
        fmt = f"{row.format} b{row.blocksize}" if row.blocksize else row.format
        cells = [row.name, "x".join(map(str, row.shape)) or "scalar", fmt, f"{row.nbytes:,}", f"{row.bits_per_param:.3f}"]
        if show_error:
            cells.append("-" if row.rel_error is None else f"{row.rel_error:.4f}")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
    right = {3, 4, 5}

    def render(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [render(header), render(["-" * w for w in widths])] + [render(c) for c in lines]
    quantized = [r for r in rows if r.format.startswith(QUANTIZED_FORMATS)]
    total_bytes, total_params = sum(r.nbytes for r in rows), sum(r.numel for r in rows)
    out.append("")
    out.append(f"total: {len(rows)} tensors, {total_params:,} parameters, {total_bytes:,} bytes, "
               f"{8 * total_bytes / max(total_params, 1):.3f} bits/param")
    if quantized:
        q_bytes, q_params = sum(r.nbytes for r in quantized), sum(r.numel for r in quantized)
        kinds = "/".join(sorted({r.format.split("-")[0].upper() for r in quantized}))
        line = (f"{kinds}: {len(quantized)} tensors, {q_params:,} parameters, {q_bytes:,} bytes, "
                f"{8 * q_bytes / q_params:.3f} bits/param (per-tensor tables included)")
        errors = [r.rel_error for r in quantized if r.rel_error is not None]
        if errors:
            line += f", mean rel. error {sum(errors) / len(errors):.4f}, max {max(errors):.4f}"
        out.append(line)
    return "\n".join(out)


def add_arguments(parser) -> None:
    parser.add_argument("path", help="checkpoint: a .safetensors file or a Hugging Face model directory")
    parser.add_argument("--against", metavar="ORIGINAL", default=None,
                        help="the unquantised checkpoint: adds each tensor's relative reconstruction error")


def run(args) -> int:
    from qlora.errors import UserError

    try:
        rows = describe_checkpoint(args.path)
        if args.against is not None:
            add_reconstruction_errors(args.path, rows, args.against)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    print(format_table(rows))
    return 0
