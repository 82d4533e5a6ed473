"""`qlora quantize`: turn a checkpoint into an NF4 checkpoint in bitsandbytes' Hugging Face layout.

One tensor at a time: read (safe_open), quantise if it is a linear layer's weight, append
to the current shard. Peak memory is about the largest tensor plus its quantisation
buffers, whatever the model's size. The output is built in a temporary directory beside
DST and renamed at the end, so an error or Ctrl-C leaves no DST behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, PICKLE_SUFFIXES, CheckpointError, ShardWriter, TensorHeader,
    nf4_prefixes, read_json_object, read_tensors, tensor_headers,
)
from qlora.conv1d_names import conv1d_module_names, conv1d_weights
from qlora.kernels.quantize import check_blocksize
from qlora.codebook import QUANT_TYPES
from qlora.nf4 import SUPPORTED_DTYPES, quantize_nf4
from qlora.errors import UserError
from qlora.safe_output import check_output_apart, make_partial_dir, remove_stale_partials, replace_dir

DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "tiny-llama"
DEFAULT_OUTPUT = Path("qlora-out") / "tiny-llama-nf4"
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# Left unquantised by default: output heads are sensitive (QLoRA keeps lm_head in 16 bit).
DEFAULT_SKIP = ("lm_head",)
# Weight files of the source are replaced by the output shards, never copied.
WEIGHT_SUFFIXES = (".safetensors", ".h5", ".msgpack", ".gguf") + PICKLE_SUFFIXES
WEIGHT_FILES = ("config.json", INDEX_FILE, "pytorch_model.bin.index.json")


@dataclass
class QuantizeSummary:
    """What quantize_checkpoint wrote."""

    output: Path
    tensors_quantized: int = 0
    tensors_copied: int = 0
    params_quantized: int = 0
    params_total: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    quantized_bits: int = 0  # bits of the NF4 codes and scales of the quantised tensors
    skipped_modules: list[str] = field(default_factory=list)
    shards: int = 1
    seconds: float = 0.0
    quant_type: str = "nf4"  # what the weights were quantised to: "nf4" or "fp4"

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the quantised weights (codes + block scales)."""
        return self.quantized_bits / max(self.params_quantized, 1)

    @property
    def model_bits_per_param(self) -> float:
        """Bits per parameter of the whole output, unquantised tensors and tables included."""
        return 8 * self.bytes_after / max(self.params_total, 1)

    def lines(self) -> list[str]:
        return [
            f"wrote {self.output.resolve()} ({self.shards} shard{'s' if self.shards != 1 else ''}) in {self.seconds:.1f} s",
            f"tensors: {self.tensors_quantized} quantised to {self.quant_type.upper()}, {self.tensors_copied} copied unchanged",
            f"size: {_human(self.bytes_before)} -> {_human(self.bytes_after)} "
            f"({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)",
            f"bits per parameter: {self.bits_per_param:.3f} in quantised weights "
            f"({self.params_quantized:,} params), {self.model_bits_per_param:.3f} over the whole model",
            f"left unquantised: {', '.join(self.skipped_modules) or 'none'}",
        ]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r} is not like 5GB, 500MB or 1000000")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit else 1000
    return int(number * base**power)


def module_matches(module: str, skip_name: str) -> bool:
    """A skip name matches a module when its dotted parts are a run of the module's parts:
    "lm_head", "down_proj", "layers.0.mlp" or a full path ("layers.1" does not match "layers.11")."""
    parts, wanted = module.split("."), skip_name.strip(".").split(".")
    return any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


def _is_embedding_or_norm(module: str) -> bool:
    last = module.rsplit(".", 1)[-1].lower()
    return "embed" in last or "norm" in last or last in ("wte", "wpe")


def plan_quantization(headers: dict[str, TensorHeader], skip: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(weights to quantise, modules of 2-D weights left as they are).

    Quantised: every 2-D `.weight` of a linear layer, i.e. not an embedding or a norm and not
    matched by a skip name. Everything else is copied unchanged."""
    quantize, kept = [], []
    for name, header in headers.items():
        if not name.endswith(".weight") or len(header.shape) != 2:
            continue
        module = name[: -len(".weight")]
        if _is_embedding_or_norm(module) or any(module_matches(module, s) for s in skip):
            kept.append(module)
        else:
            quantize.append(name)
    return quantize, kept


def quantization_config(double_quant: bool, compute_dtype: str, skip_modules: list[str],
                        quant_type: str = "nf4") -> dict:
    """The config.json block transformers reads to load a bitsandbytes 4-bit checkpoint."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def _check_inputs(src: Path, dst: Path, blocksize, compute_dtype: str, device: str, force: bool) -> None:
    try:
        check_blocksize(blocksize)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if compute_dtype not in COMPUTE_DTYPES:
        raise CheckpointError(f"compute dtype {compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CheckpointError(f"device {device!r} is not cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__}); "
                              "use --device cpu")
    try:  # DST is a directory apart from the source: --force never replaces a source or a plain file
        check_output_apart(dst, {"source": src}, "DST")
    except UserError as err:
        raise CheckpointError(str(err)) from None
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists; pass --force to replace it")


def _copy_other_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer, generation config and the like; weight files are replaced, not copied."""
    copied = []
    for entry in sorted(src_dir.iterdir()):
        if entry.name.startswith(".") or entry.name in WEIGHT_FILES or entry.suffix in WEIGHT_SUFFIXES:
            continue
        if entry.is_dir():  # e.g. Llama 3's original/ holds pickled weights beside params.json
            weights = shutil.ignore_patterns(".*", *(f"*{suffix}" for suffix in WEIGHT_SUFFIXES))
            shutil.copytree(entry, out_dir / entry.name, ignore=weights)
        else:
            shutil.copy2(entry, out_dir / entry.name)
        copied.append(entry.name)
    return copied


def _progress_bar(total_bytes: int, n_tensors: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                desc=f"quantising 0/{n_tensors} tensors", dynamic_ncols=True)


def _write_tensor(writer: ShardWriter, name: str, tensor: torch.Tensor, header: TensorHeader, quantize: bool,
                  blocksize: int, double_quant: bool, device: str, allow_nonfinite: bool,
                  summary: QuantizeSummary) -> None:
    """Quantise (or copy) one tensor into the writer. A function of its own so that nothing of
    this tensor outlives the call while the next one is read."""
    summary.params_total += tensor.numel()
    if not quantize:
        writer.add({name: tensor})
        summary.tensors_copied += 1
        return
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"{header.file}: tensor {name}: dtype {tensor.dtype} of shape {list(tensor.shape)} "
                              "cannot be quantised (float32, bfloat16 or float16 only); pass --skip to keep it")
    if tensor.numel() == 0:
        raise CheckpointError(f"{header.file}: tensor {name}: shape {list(tensor.shape)} has no elements and "
                              "cannot be quantised; pass --skip to keep it")
    if not allow_nonfinite and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{header.file}: tensor {name}: shape {list(tensor.shape)} holds {bad} NaN/Inf "
                              "values; pass --allow-nonfinite to quantise it anyway")
    weight = quantize_nf4(tensor.to(device), blocksize, double_quant, name=name, allow_nonfinite=True,
                          quant_type=summary.quant_type).to("cpu")
    writer.add(weight.state_dict(name[: -len(".weight")]))
    summary.tensors_quantized += 1
    summary.params_quantized += weight.numel
    summary.quantized_bits += round(weight.bits_per_param * weight.numel)


def _write_checkpoint(out_dir: Path, headers: dict[str, TensorHeader], to_quantize: set[str], blocksize: int,
                      double_quant: bool, device: str, allow_nonfinite: bool, max_shard_bytes: int,
                      summary: QuantizeSummary, progress: bool, transposed: frozenset = frozenset()) -> None:
    writer = ShardWriter(out_dir, max_shard_bytes)
    bar = _progress_bar(sum(h.nbytes for h in headers.values()), len(headers), progress)
    try:
        done = 0  # not enumerate(): its cached result tuple would keep the previous tensor alive
        for name, tensor in read_tensors(headers):
            if name in transposed:  # Conv1D [in, out] -> [out, in], as bitsandbytes quantises it
                tensor = tensor.T.contiguous()
            _write_tensor(writer, name, tensor, headers[name], name in to_quantize, blocksize, double_quant,
                          device, allow_nonfinite, summary)
            del tensor
            done += 1
            bar.set_description(f"quantising {done}/{len(headers)} tensors", refresh=False)
            bar.update(headers[name].nbytes)
        weight_map = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    shards = set(weight_map.values())
    summary.shards = len(shards)
    summary.bytes_after = sum((out_dir / shard).stat().st_size for shard in shards)
    summary.bytes_before = sum(file.stat().st_size for file in {h.file for h in headers.values()})


def quantize_checkpoint(
    src: str | os.PathLike | None = None,
    dst: str | os.PathLike | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    skip: tuple[str, ...] | list[str] = (),
    compute_dtype: str = "bfloat16",
    device: str = "cpu",
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    quant_type: str = "nf4",
) -> QuantizeSummary:
    """Quantise every linear layer's weight of SRC to NF4 and write DST in bitsandbytes' HF layout.

    src: a Hugging Face model directory or a single .safetensors file (default: the embedded
    tiny Llama). dst: the output directory (default ./qlora-out/tiny-llama-nf4). lm_head,
    embeddings and norms stay as they are; `skip` adds module names ("down_proj", "layers.0").
    quant_type: "nf4" (default) or "fp4", bitsandbytes' bnb_4bit_quant_type.
    Raises CheckpointError (a ValueError) with one line naming the file and tensor on bad input.
    """
    started = time.perf_counter()
    src = Path(src) if src is not None else DEFAULT_MODEL
    dst = Path(dst) if dst is not None else DEFAULT_OUTPUT
    _check_inputs(src, dst, blocksize, compute_dtype, device, force)
    if quant_type not in QUANT_TYPES:
        raise CheckpointError(f"quant type {quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    headers = tensor_headers(src)
    if nf4_prefixes(headers):
        raise CheckpointError(f"{src}: already holds NF4 weights (quant_state keys); nothing to quantise")
    config = _read_config(src)
    skip = tuple(s.strip() for item in ([skip] if isinstance(skip, str) else skip)
                 for s in item.split(",") if s.strip())
    for name in skip:
        if not any(module_matches(n[: -len(".weight")], name) for n in headers if n.endswith(".weight")):
            raise CheckpointError(f"--skip {name}: matches no module of {src}")
    to_quantize, kept = plan_quantization(headers, DEFAULT_SKIP + skip)
    transposed = frozenset(conv1d_weights(to_quantize, conv1d_module_names(src)) if src.is_dir() else ())
    # Full module names: every transformers version's matcher then skips exactly these.
    skipped_modules = sorted(set(kept) | set(DEFAULT_SKIP), key=lambda m: (m != "lm_head", m))
    summary = QuantizeSummary(output=dst, skipped_modules=skipped_modules, quant_type=quant_type)

    remove_stale_partials(dst)
    work_dir = make_partial_dir(dst)
    try:
        _write_checkpoint(work_dir, headers, set(to_quantize), blocksize, double_quant, device,
                          allow_nonfinite, max_shard_bytes, summary, progress, transposed)
        config["quantization_config"] = quantization_config(double_quant, compute_dtype, skipped_modules, quant_type)
        (work_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if src.is_dir():
            _copy_other_files(src, work_dir)
        replace_dir(work_dir, dst, force)  # without force, a DST made meanwhile is an error here
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - started
    return summary


def _read_config(src: Path) -> dict:
    """config.json of a model directory ({} for a single file); refuses an already quantised one."""
    path = src / "config.json"
    if not src.is_dir() or not path.exists():
        return {}
    config = read_json_object(path)
    if not isinstance(config.get("quantization_config", {}), dict):
        raise CheckpointError(f"{path}: quantization_config is not an object")
    if "quantization_config" in config:
        raise CheckpointError(f"{path}: the model is already quantised "
                              f"({config['quantization_config'].get('quant_method', 'unknown method')})")
    return config


# ---------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser) -> None:
    parser.add_argument("src", nargs="?", default=None,
                        help="Hugging Face model directory or .safetensors file (default: the embedded tiny Llama)")
    parser.add_argument("dst", nargs="?", default=None, help=f"output directory (default: ./{DEFAULT_OUTPUT})")
    parser.add_argument("--blocksize", type=int, default=64, help="NF4 block size, a power of two 32..4096 (64)")
    parser.add_argument("--quant-type", default="nf4", choices=QUANT_TYPES,
                        help="4-bit type, bitsandbytes' bnb_4bit_quant_type: nf4 or fp4 (nf4)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="keep block scales in float32 (4.5 bits/param instead of 4.127)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAMES",
                        help="comma-separated module names to leave unquantised, besides lm_head "
                             "(e.g. down_proj, layers.0); repeatable")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=COMPUTE_DTYPES,
                        help="bnb_4bit_compute_dtype recorded in config.json (bfloat16)")
    parser.add_argument("--device", default="cpu", help="where to quantise: cpu or cuda (cpu)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB (5GB)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--allow-nonfinite", action="store_true", help="quantise weights holding NaN or Inf")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:

    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as err:
        raise UserError(f"--max-shard-size: {err}") from None
    try:
        summary = quantize_checkpoint(
            args.src, args.dst, blocksize=args.blocksize, double_quant=args.double_quant, skip=args.skip,
            compute_dtype=args.compute_dtype, device=args.device, force=args.force,
            allow_nonfinite=args.allow_nonfinite, progress=args.progress, max_shard_bytes=max_shard_bytes,
            quant_type=args.quant_type,
        )
    except CheckpointError as err:
        raise UserError(str(err)) from None
    except OSError as err:  # disk full, permission denied: the OS message names the file
        raise UserError(str(err)) from None
    for line in summary.lines():
        print(line)
    return 0
