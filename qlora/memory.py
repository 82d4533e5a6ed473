"""`qlora bench-memory`: what a training step needs, by component, predicted and (optionally) measured.

This module is the command: its arguments and their checks, the table, the JSON and the chart. The
analytic model is qlora.memory_predict (one device) and qlora.memory_placement (paged optimizer states,
several ranks); the measured step is qlora.memory_measure.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from qlora.checkpoint import replacing
from qlora.errors import UserError
from qlora.lora_options import check_lora_settings
# Re-exported: bench/e2e.py and callers of the earlier single module import these from qlora.memory.
from qlora.memory_measure import build_random_model, measure  # noqa: F401
from qlora.memory_placement import DEFAULT_GPU_MEMORY, Placement, place
from qlora.memory_predict import COMPONENTS, MODES, PAGE_BYTES, PRESETS, Shape, predict, preset_config  # noqa: F401

LORA_MODES = tuple(m for m in MODES if m != "bf16-full")
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, option: str) -> int:
    """A size as bytes: a number with an optional unit (KB, MB, GB = powers of 1000; KiB, MiB, GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise UserError(f"{option}: {text!r} is not a size (a number of bytes, or with a unit: 44GB, 512MiB)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}" if n < 1e8 else f"{n / 1e9:.2f}"


def format_table(rows: list[dict]) -> str:
    header = ["mode"] + list(COMPONENTS) + ["predicted", "measured", "meas/pred"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        measured = row.get("measured_peak_bytes")
        cells = [row["mode"]] + [_gb(row["predicted"][c]) for c in COMPONENTS] + [_gb(row["predicted_total_bytes"])]
        cells += [_gb(measured), f"{measured / row['predicted_total_bytes']:.3f}"] if measured else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(GB = 1e9 bytes)"


def format_fit(row: dict, gpu_memory: int) -> str:
    """One line: does the peak fit the device, and (qlora-paged) where the optimizer states are."""
    verdict = "fits" if row["fits"] else "does NOT fit"
    line = f"{row['mode']}: peak {_gb(row['predicted_total_bytes'])} GB, {verdict} in {_gb(gpu_memory)} GB"
    if row["mode"] == "qlora-paged" and row["host_bytes"]:
        on_device, on_host = row["state_pages"]
        line += (f"; optimizer states: {on_device} pages on the device (streaming slots included), {on_host} "
                 f"({_gb(row['host_bytes'])} GB) in pinned host memory")
    if row["mode"] == "qlora-paged" and not row["fits"]:
        best = row["largest_budget"]
        line += (f"; it fits with --gpu-budget {best // 2**20}MiB or less" if best is not None
                 else "; no budget makes it fit")
    return line
def write_png(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--png needs matplotlib: pip install 'qlora[chart]' (or pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    modes = [row["mode"] for row in rows]
    bottom = [0.0] * len(rows)
    for component in COMPONENTS:
        values = [row["predicted"][component] / 1e9 for row in rows]
        ax.bar(modes, values, bottom=bottom, label=component.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    measured = [(i, row["measured_peak_bytes"] / 1e9) for i, row in enumerate(rows) if row.get("measured_peak_bytes")]
    if measured:
        ax.scatter([i for i, _ in measured], [m for _, m in measured], marker="_", s=900, color="black",
                   zorder=3, label="measured peak")
    ax.set_ylabel("GB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path) as partial:
        fig.savefig(partial, dpi=120, format="png")
    plt.close(fig)



def default_gpu_memory(device: str) -> int:
    """Bytes of the CUDA device being predicted for, or an 80 GB H100's where there is none."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return DEFAULT_GPU_MEMORY


def bench_memory(preset: str | None = None, config_path: str | None = None, seq: int = 2048, batch: int = 1,
                 grad_ckpt: bool = False, r: int = 64, dropout: float = 0.05, modes=MODES, measure_step: bool = False,
                 device: str | None = None, bf16_adapters: bool = False, gpu_budget: int | str = "auto",
                 gpu_memory: int | None = None, world_size: int = 1, fsdp: bool = False) -> dict:
    """Predicted (and with measure_step, measured) memory of one training step per mode, for one rank."""
    from qlora.llama import ConfigError, load_config

    config = preset_config(preset) if preset else load_config(config_path)
    if measure_step and seq > config.max_position_embeddings:
        raise ConfigError(f"--seq {seq} is longer than the model's context ({config.max_position_embeddings} tokens); "
                          "a real step cannot run it")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = Shape(seq=seq, batch=batch, grad_ckpt=grad_ckpt, r=r, dropout=dropout, device=torch.device(device).type,
                  adapter_bytes=2 if bf16_adapters else 4)
    placement = Placement(world_size, fsdp, gpu_budget, gpu_memory or default_gpu_memory(device))
    rows = []
    for mode in modes:
        row = {"mode": mode, **place(config, mode, shape, placement)}
        if measure_step:
            result = measure(config, mode, shape, device, gpu_budget=gpu_budget)
            row["measured_peak_bytes"] = result.pop("peak_bytes")
            row["measured"] = result
        rows.append(row)
    return {"model": preset or str(config_path), "config": config.to_dict(), "seq": seq, "batch": batch,
            "grad_ckpt": grad_ckpt, "r": r, "dropout": dropout, "device": device, "world_size": world_size,
            "fsdp": fsdp, "gpu_budget": gpu_budget, "gpu_memory": placement.gpu_memory, "rows": rows}


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=list(PRESETS), help="a published model's shape")
    source.add_argument("--config", help="a Hugging Face config.json (or its directory)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (per rank)")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing per decoder layer")
    parser.add_argument("--r", type=int, default=64, help="LoRA rank (default 64)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--bf16-adapters", action="store_true", help="LoRA weights in bf16 (default float32)")
    parser.add_argument("--modes", help=f"comma-separated, from {','.join(MODES)} (default all; "
                                        "with --fsdp the LoRA modes)")
    parser.add_argument("--gpu-budget", default="auto",
                        help="qlora-paged: device memory the optimizer states may hold (e.g. 2GB, 64MiB), or auto "
                             "(default, as PagedAdamW32bit: what the device holds beside a step's peak, less a 5%% reserve)")
    parser.add_argument("--gpu-memory", help="memory of one device, e.g. 44GB or 24GiB (default: the CUDA device's, "
                                             "or 80 GiB where there is none)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) training together: per-rank memory")
    parser.add_argument("--fsdp", action="store_true", help="with --world-size: FSDP2 sharding instead of DDP")
    parser.add_argument("--measure", action="store_true",
                        help="also run one real training step (on the CPU: only sensible for small configs)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--png", help="write a stacked bar chart (needs matplotlib)")


def _check_output_file(path: str | None, option: str) -> None:
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    if not target.parent.is_dir():
        raise UserError(f"{option} {path}: the folder {target.parent} does not exist")


def _check_arguments(args) -> list[str]:
    """The modes to run, after every argument is checked (each problem one line)."""
    if args.seq < 2 or args.batch < 1:
        raise UserError("--seq must be at least 2, --batch at least 1")
    check_lora_settings(args.r, None, args.dropout, cli=True)  # the same words as qlora finetune
    if args.world_size < 1:
        raise UserError(f"--world-size {args.world_size}: must be at least 1")
    default_modes = LORA_MODES if args.fsdp else MODES
    modes = [m.strip() for m in (args.modes or ",".join(default_modes)).split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--modes: unknown {bad or modes}; choose from {','.join(MODES)}")
    if args.fsdp and "bf16-full" in modes:
        raise UserError("--fsdp: bf16-full is not modelled sharded; choose from " + ",".join(LORA_MODES))
    if args.measure and (args.world_size > 1 or args.fsdp):
        raise UserError("--measure runs one process on one device; per-rank memory (--world-size, --fsdp) is "
                        "predicted only")
    try:
        kind = torch.device(args.device).type if args.device else None
    except RuntimeError:
        kind = "?"
    if kind not in (None, "cuda", "cpu"):
        raise UserError(f"--device {args.device!r}: choose cuda or cpu")
    if args.measure and kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--measure --device cuda: torch sees no CUDA device here; measure on the CPU "
                        "(--device cpu, small configs) or predict without --measure")
    _check_output_file(args.json, "--json")
    _check_output_file(args.png, "--png")
    return modes


def _budget(args) -> int | str:
    if args.gpu_budget == "auto":
        return "auto"
    budget = parse_bytes(args.gpu_budget, "--gpu-budget")
    if budget < 2 * PAGE_BYTES:
        raise UserError(f"--gpu-budget {args.gpu_budget}: below two pages of {PAGE_BYTES // 2**20} MiB, the least "
                        "PagedAdamW32bit streams with")
    return budget


def run(args) -> int:
    from qlora.llama import ConfigError

    modes = _check_arguments(args)
    gpu_memory = parse_bytes(args.gpu_memory, "--gpu-memory") if args.gpu_memory else None
    if gpu_memory == 0:
        raise UserError("--gpu-memory: must be more than 0 bytes")
    try:
        result = bench_memory(args.preset, args.config, args.seq, args.batch, args.grad_ckpt, args.r, args.dropout,
                              modes, args.measure, args.device, args.bf16_adapters, _budget(args), gpu_memory,
                              args.world_size, args.fsdp)
    except ConfigError as err:
        raise UserError(str(err)) from None
    ranks = (f", per rank of {args.world_size} ({'FSDP2' if args.fsdp else 'DDP'})"
             if args.world_size > 1 or args.fsdp else "")
    title = (f"{result['model']}: seq {args.seq}, batch {args.batch}, r {args.r}, "
             f"grad ckpt {'on' if args.grad_ckpt else 'off'}{ranks}")
    print(title)
    print(format_table(result["rows"]))
    if torch.device(result["device"]).type == "cuda":
        for row in result["rows"]:
            print(format_fit(row, result["gpu_memory"]))
    if args.json:
        with replacing(args.json) as partial:
            partial.write_text(json.dumps(result, indent=2) + "\n")
    if args.png:
        write_png(result["rows"], Path(args.png), title)
    return 0
