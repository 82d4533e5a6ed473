"""Checkpoint I/O: read safetensors checkpoints one tensor at a time, write them in shards.

A checkpoint is a single .safetensors file or a Hugging Face directory (model.safetensors,
or shards listed by model.safetensors.index.json). Headers are parsed here before any
tensor is read, so a missing, corrupt or truncated file gives one line naming the file and
the tensor instead of a deep library error. Pickled checkpoints are never loaded.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from qlora.nf4 import QUANT_STATE_KEYS, NF4Weight
from qlora.safe_output import inside_directory

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The suffixes of a 4-bit (NF4 or FP4) weight's companion tensors, after "prefix.weight".
NF4_PART_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                     *("." + key for key in QUANT_STATE_KEYS.values()))
# Safetensors headers beyond this are not real checkpoints (the format itself caps them at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary name beside path, renamed onto path only when the block completes:
    a crash or Ctrl-C leaves the old file (or none), never a half-written one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and tensor."""


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, adapter_config.json); CheckpointError naming it."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({str(err)[:200]})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class TensorHeader:
    """Where a tensor lives and what it is, read from the safetensors header alone."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


# ---------------------------------------------------------------------------------------------
# Reading

def read_safetensors_header(file: str | os.PathLike) -> tuple[dict[str, TensorHeader], dict[str, str]]:
    """Parse and check a .safetensors header: ({name: TensorHeader}, metadata).

    Raises CheckpointError for a missing file, a header that is not JSON, unknown dtypes,
    byte ranges that do not match the shapes, or data that ends before the last tensor.
    """
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file")
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(f"{file}: truncated or not a safetensors file (header of {header_len} bytes "
                                  f"announced, file has {size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{file}: corrupt safetensors header ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_len
    tensors, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            what = entry.get("dtype") if isinstance(entry, dict) else entry
            raise CheckpointError(f"{file}: tensor {name}: dtype {what!r} is not supported")
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name}: corrupt header entry {entry!r}") from None
        if any(s < 0 for s in shape):
            raise CheckpointError(f"{file}: tensor {name}: corrupt header, negative shape {list(shape)}")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{file}: tensor {name}: corrupt header, shape {list(shape)} of {entry['dtype']} "
                                  f"needs {nbytes} bytes but data_offsets give {end - begin}")
        if end > data_size:
            raise CheckpointError(f"{file}: truncated: tensor {name} ends at data byte {end}, "
                                  f"the file holds {data_size}")
        tensors[name] = TensorHeader(file, dtype, shape, nbytes)
        spans.append((begin, end, name))
    _check_spans(file, spans, data_size)
    return tensors, metadata


def _check_spans(file: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte ranges must tile the data exactly, as safetensors requires to load the file:
    an overlap or a gap means a corrupt (or crafted) header."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != position:
            what = f"overlaps tensor {previous}" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise CheckpointError(f"{file}: tensor {name}: corrupt header, data_offsets [{begin}, {end}] {what}")
        position, previous = end, name
    if position != data_size:
        raise CheckpointError(f"{file}: corrupt header, the tensors cover {position} of the {data_size} data bytes")


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The .safetensors files of a checkpoint: the file itself, model.safetensors, or the index's shards."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickled checkpoints are not loaded (unsafe); convert it to safetensors")
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file")
        return [path]
    index = path / INDEX_FILE
    if index.is_file():
        return sorted(set(_read_index(index).values()))
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    hint = f" (found {', '.join(pickles)}: pickled checkpoints are not loaded; convert to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} in this directory{hint}")


def _read_index(index: Path) -> dict[str, Path]:
    """weight_map of an index file, as tensor name -> shard path; every shard must exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{index}: corrupt index ({type(err).__name__}: {err})") from None
    shards = {}
    for name, shard in weight_map.items():
        if shard in shards:
            continue
        try:
            shard_path = inside_directory(index.parent, shard, f"{index}: tensor {name}")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        if not shard_path.is_file():
            raise CheckpointError(f"{index}: tensor {name} is in shard {shard}, which does not exist")
        shards[shard] = shard_path
    return {name: shards[shard] for name, shard in weight_map.items()}


def tensor_headers(path: str | os.PathLike) -> dict[str, TensorHeader]:
    """Every tensor of a checkpoint (file or directory), from the headers only, in file order."""
    path = Path(path)
    files = checkpoint_files(path)
    index = path / INDEX_FILE if path.is_dir() else None
    expected = _read_index(index) if index is not None and index.is_file() else None
    headers: dict[str, TensorHeader] = {}
    for file in files:
        file_headers, _ = read_safetensors_header(file)
        for name, header in file_headers.items():
            if name in headers:
                raise CheckpointError(f"{file}: tensor {name} is also in {headers[name].file.name}")
            headers[name] = header
    if expected is not None:
        for name, shard in expected.items():
            if name not in headers or headers[name].file != shard:
                raise CheckpointError(f"{index}: tensor {name} is listed in {shard.name} but not found there")
    return headers


def read_tensors(headers: dict[str, TensorHeader], names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, in the given order (default: all of headers).

    Each tensor is read through its own safe_open: safetensors maps the whole file, and pages
    touched through a handle kept open stay in the process's resident memory, so reading a
    large shard through one handle would grow memory to the shard's size, not the tensor's."""
    for name in list(headers if names is None else names):
        file = headers[name].file
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types; keep the names
            raise CheckpointError(f"{file}: tensor {name}: cannot be read ({err})") from None
        yield name, tensor
        del tensor  # or it stays alive while the next one is read: twice the memory


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint as they are stored (no grouping)."""
    return dict(read_tensors(tensor_headers(path)))


def nf4_prefixes(names: Iterable[str]) -> list[str]:
    """Module prefixes holding a 4-bit weight: those with a `prefix.weight.quant_state.bitsandbytes__nf4`
    (or `__fp4`) key."""
    markers = tuple(".weight." + key for key in QUANT_STATE_KEYS.values())
    return [name.rsplit(".weight.", 1)[0] for name in names if name.endswith(markers)]


def quant_state_name(prefix: str, names: Iterable[str]) -> str:
    """The name of the JSON quant state of the 4-bit weight at prefix (the nf4 or the fp4 key)."""
    names = set(names)
    return next((f"{prefix}.weight.{key}" for key in QUANT_STATE_KEYS.values() if f"{prefix}.weight.{key}" in names),
                f"{prefix}.weight.{QUANT_STATE_KEYS['nf4']}")


def nf4_part_names(prefix: str) -> list[str]:
    """Every key an NF4 weight at prefix may have, the packed codes first."""
    key = f"{prefix}.weight"
    return [key] + [key + suffix for suffix in NF4_PART_SUFFIXES]


def _check_quant_types(names: Iterable[str], where: Path) -> None:
    for name in names:
        if ".quant_state.bitsandbytes__" in name and not name.endswith(tuple(QUANT_STATE_KEYS.values())):
            raise CheckpointError(f"{where}: tensor {name}: quant type {name.rsplit('__', 1)[1]!r} is not "
                                  "supported, only nf4 or fp4")


def load_quantized_state_dict(path: str | os.PathLike) -> dict[str, NF4Weight | torch.Tensor]:
    """Read a quantised checkpoint (qlora's, or transformers + bitsandbytes'): each NF4 or FP4 linear's
    keys become one NF4Weight under `prefix.weight`; every other tensor is returned as it is."""
    path = Path(path)
    headers = tensor_headers(path)
    _check_quant_types(headers, path)
    tensors = load_state_dict(path)
    out: dict[str, NF4Weight | torch.Tensor] = {}
    grouped: set[str] = set()
    for prefix in nf4_prefixes(headers):
        parts = {name: tensors[name] for name in nf4_part_names(prefix) if name in tensors}
        try:
            out[f"{prefix}.weight"] = NF4Weight.from_state_dict(parts, prefix)
        except (KeyError, ValueError) as err:
            message = err.args[0] if err.args else str(err)
            raise CheckpointError(f"{path}: {message}") from None
        grouped.update(parts)
    for name, tensor in tensors.items():
        if name not in grouped:
            out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# Writing

def shard_file_name(index: int, count: int) -> str:
    return SINGLE_FILE if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """Writes tensors into safetensors shards as they arrive, holding none of them in memory.

    A safetensors file starts with a header listing every tensor, so each shard's data first
    goes to a scratch file; when the shard is full its header is written and the data copied
    behind it in chunks. Memory stays constant; disk needs one extra shard of space.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.finished_shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self._scratch = None
        self._entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []  # name, dtype, shape, start, nbytes
        self._names: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append tensors that belong together (an NF4 weight's parts): they land in one shard."""
        group_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._entries and self._shard_bytes() + group_bytes > self.max_shard_bytes:
            self._finish_shard()
        if self._scratch is None:
            path = self.out_dir / f".shard-{len(self.finished_shards) + 1:05d}.data"
            self._scratch = open(path, "w+b")
        for name, tensor in tensors.items():
            if name in self._names:
                raise CheckpointError(f"{self.out_dir}: tensor {name} written twice")
            if tensor.dtype not in SAFETENSORS_NAMES:
                raise CheckpointError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            start = self._scratch.tell()
            self._scratch.write(memoryview(data))
            self._entries.append((name, tensor.dtype, tuple(tensor.shape), start, data.nbytes))
            self._names.add(name)
            self.total_bytes += data.nbytes

    def _shard_bytes(self) -> int:
        return sum(entry[4] for entry in self._entries)

    def _finish_shard(self) -> None:
        scratch, entries = self._scratch, self._entries
        number = len(self.finished_shards) + 1
        path = self.out_dir / f".shard-{number:05d}.safetensors"
        # Widest dtypes first (as safetensors itself orders them), so every tensor stays aligned.
        entries = sorted(entries, key=lambda e: (-e[1].itemsize, e[0]))
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape, _, nbytes in entries:
            header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        buffer = memoryview(bytearray(min(COPY_CHUNK_BYTES, max(offset, 1))))
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for _, _, _, start, nbytes in entries:
                scratch.seek(start)
                while nbytes:
                    got = scratch.readinto(buffer[: min(nbytes, len(buffer))])
                    if not got:
                        raise CheckpointError(f"{scratch.name}: scratch data ended early (disk full?)")
                    out.write(buffer[:got])
                    nbytes -= got
        scratch.close()
        os.unlink(scratch.name)
        self.finished_shards.append((path, [e[0] for e in entries]))
        self._scratch, self._entries = None, []

    def close(self) -> dict[str, str]:
        """Finish the last shard, give the shards their final names, write the index when there
        is more than one. Returns the weight map (tensor name -> shard file name)."""
        if self._entries or not self.finished_shards:
            if self._scratch is None:
                self._scratch = open(self.out_dir / ".shard-00001.data", "w+b")
            self._finish_shard()
        count = len(self.finished_shards)
        weight_map = {}
        for number, (path, names) in enumerate(self.finished_shards, start=1):
            final = shard_file_name(number, count)
            os.replace(path, self.out_dir / final)
            weight_map.update({name: final for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        """Close and delete the scratch file (the caller removes the directory)."""
        if self._scratch is not None:
            self._scratch.close()
            Path(self._scratch.name).unlink(missing_ok=True)
            self._scratch = None
