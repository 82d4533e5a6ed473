"""The targets of issue 13's GPU run, and the summary rows read from each benchmark's output.

A row: step, target, figure, baseline (measured in the same run), ratio, limit and verdict ("pass", "FAIL",
or "not measured" with the reason). The limits come from issues 3-6:

    dequantise >= 90 % of copy bandwidth; quantise >= 7x bitsandbytes; M = 1 >= 3.3x and M = 16 >= 3.0x bf16;
    M = 4096 forward and input gradient <= 1.02x bf16; QuantLoRALinear fwd+bwd <= 1.10x bf16 + LoRA and
    >= 1.2x faster than bitsandbytes + PEFT; AdamW step <= 1.2x torch fused, and at a 25 % budget <= 1.5x
    bytes / pinned bandwidth; 7B training >= 1.3x the tokens/s of transformers + PEFT + bitsandbytes at
    <= 0.8x its device memory; 65B shape <= 44 GB device memory in use; bench-memory within 10 % of the
    measured peak.

bench/kernels.py and bench/layer.py print markdown tables; they are read by their column names, so that a
new column does not break the summary (a table that cannot be read gives a "not measured" row instead).
"""
from __future__ import annotations

import re

KERNEL_TARGETS = [  # (measurement starts with, target, limit)
    ("dequantise", "dequantise: share of copy bandwidth", ">= 0.90"),
    ("quantise", "quantise: speed-up over bitsandbytes", ">= 7"),
    ("M=1 forward", "M=1 forward: speed-up over bf16", ">= 3.3"),
    ("M=16 forward", "M=16 forward: speed-up over bf16", ">= 3.0"),
    ("M=4096 forward", "M=4096 forward: time over bf16", "<= 1.02"),
    ("M=4096 input gradient", "M=4096 input gradient: time over bf16", "<= 1.02"),
]
GOAL_65B_BYTES = 44e9


def verdict(ratio: float | None, limit: str) -> str:
    """"pass" or "FAIL" for a ratio against a limit such as ">= 1.3", "<= 1.02" or "== 0" or "0.90..1.10"."""
    if ratio is None:
        return "not measured"
    if ".." in limit:
        low, high = (float(x) for x in limit.split(".."))
        return "pass" if low <= ratio <= high else "FAIL"
    op, value = limit.split()
    ok = {">=": ratio >= float(value), "<=": ratio <= float(value), "==": ratio == float(value)}[op]
    return "pass" if ok else "FAIL"


def row(step: str, target: str, figure: str, baseline: str, ratio: float | None, limit: str,
        reason: str = "") -> dict:
    result = verdict(ratio, limit)
    if ratio is None and reason:
        result = f"not measured ({reason})"
    return {"step": step, "target": target, "figure": figure, "baseline": baseline,
            "ratio": ratio, "limit": limit, "verdict": result}


def markdown_tables(text: str | None) -> list[list[dict]]:
    """Every markdown table in text, as a list of {header: cell} rows."""
    tables, lines = [], [line.strip() for line in (text or "").splitlines()]
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def _number(cell: str | None) -> float | None:
    match = re.match(r"\s*([0-9]+(?:\.[0-9]+)?)", cell or "")
    return float(match.group(1)) if match else None


def kernel_rows(text: str, reason: str) -> list[dict]:
    """bench/kernels.py's table: one row per target and shape (the kernels' own check must say ok)."""
    rows = [r for table in markdown_tables(text) for r in table if "measurement" in r and "ratio" in r]
    out = []
    for prefix, target, limit in KERNEL_TARGETS:
        found = [r for r in rows if r["measurement"].startswith(prefix)]
        for r in found:
            shape = next(iter(r.values()))
            ratio = _number(r.get("ratio"))
            item = row("kernels", f"{target} ({shape})", f"{r.get('qlora us', '?')} us", r.get("baseline", ""),
                       ratio, limit, "no bitsandbytes" if ratio is None else "")
            if r.get("check", "ok") != "ok":
                item["verdict"] = f"FAIL (check: {r['check']})"
            out.append(item)
        if not found:
            out.append(row("kernels", target, "-", "-", None, limit, reason))
    return out


def layer_rows(text: str, reason: str) -> list[dict]:
    """bench/layer.py's table: QuantLoRALinear against bf16 + LoRA and against bitsandbytes + PEFT."""
    by_shape: dict[str, dict[str, float]] = {}
    for table in markdown_tables(text):
        for r in table:
            if "layer" in r and "ms" in r:
                by_shape.setdefault(next(iter(r.values())), {})[r["layer"]] = _number(r["ms"])
    out = []
    for shape, times in by_shape.items():
        ours = next((t for name, t in times.items() if "qlora" in name), None)
        bf16 = next((t for name, t in times.items() if "bf16" in name), None)
        bnb = next((t for name, t in times.items() if "bnb" in name), None)
        out.append(row("layer", f"QuantLoRALinear fwd+bwd over bf16 + LoRA ({shape})", f"{ours} ms",
                       f"{bf16} ms", ours / bf16 if ours and bf16 else None, "<= 1.10"))
        out.append(row("layer", f"QuantLoRALinear speed-up over bnb + PEFT ({shape})", f"{ours} ms", f"{bnb} ms",
                       bnb / ours if ours and bnb else None, ">= 1.2", "no bitsandbytes + PEFT"))
    if not out:
        out = [row("layer", "QuantLoRALinear fwd+bwd over bf16 + LoRA", "-", "-", None, "<= 1.10", reason),
               row("layer", "QuantLoRALinear speed-up over bnb + PEFT", "-", "-", None, ">= 1.2", reason)]
    return out


def optim_rows(figures: dict | None, reason: str) -> list[dict]:
    """bench/optim.py's --json figures."""
    f = figures or {}
    return [
        row("optimizer", "AdamW step, all resident, over torch fused", f"{f['resident_ms']:.3f} ms" if f else "-",
            f"{f['fused_ms']:.3f} ms" if f else "-", f.get("resident_ratio"), "<= 1.2", reason),
        row("optimizer", "AdamW step at a 25 % budget over bytes / pinned bandwidth",
            f"{f['paged_ms']:.3f} ms" if f else "-", f"{f['ideal_ms']:.3f} ms" if f else "-",
            f.get("paged_ratio"), "<= 1.5", reason),
    ]


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def e2e_rows(results: dict, reason: str) -> list[dict]:
    """bench/e2e.py's children: results keyed "7b-qlora", "7b-hf", "65b-qlora-fp32", "65b-qlora-bf16"; device
    memory in use less "parent_in_use_bytes" (what bench/gpu_all.py itself held on the device meanwhile)."""
    parent = results.get("parent_in_use_bytes") or 0
    results = {key: ({**r, "device_in_use_bytes": r["device_in_use_bytes"] - parent}
                     if isinstance(r, dict) and r.get("device_in_use_bytes") else r) for key, r in results.items()}
    ours, theirs = results.get("7b-qlora") or {}, results.get("7b-hf") or {}
    why = ours.get("error") or theirs.get("error") or reason
    speed = (ours["tokens_per_second"] / theirs["tokens_per_second"]
             if "tokens_per_second" in ours and "tokens_per_second" in theirs else None)
    mem = (ours["device_in_use_bytes"] / theirs["device_in_use_bytes"]
           if ours.get("device_in_use_bytes") and theirs.get("device_in_use_bytes") else None)
    out = [row("e2e", "7B training tokens/s over transformers + PEFT + bitsandbytes",
               f"{ours.get('tokens_per_second', 0):.0f} tok/s", f"{theirs.get('tokens_per_second', 0):.0f} tok/s",
               speed, ">= 1.3", why),
           row("e2e", "7B device memory in use over transformers + PEFT + bitsandbytes",
               _gb(ours.get("device_in_use_bytes")), _gb(theirs.get("device_in_use_bytes")), mem, "<= 0.8",
               why or "no device memory on the CPU")]
    for key, label in (("65b-qlora-fp32", "fp32 adapters, states paged out"),
                       ("65b-qlora-bf16", "bf16 adapters, states paged out")):
        r = results.get(key) or {}
        used = r.get("device_in_use_bytes")
        out.append(row("e2e", f"65B shape device memory in use, {label} (over 44 GB)", _gb(used), "44 GB limit",
                       used / GOAL_65B_BYTES if used else None, "<= 1.0",
                       r.get("error") or reason or "no device memory on the CPU"))
    return out


def memory_rows(results: dict, reason: str) -> list[dict]:
    """`qlora bench-memory --measure --json` outputs, keyed by shape: measured peak over the prediction."""
    out = []
    for shape in ("7B", "65B"):
        result = results.get(shape) or {}
        rows = result.get("rows") or [{}]
        for r in rows:
            measured, predicted = r.get("measured_peak_bytes"), r.get("predicted_total_bytes")
            out.append(row("bench-memory", f"{shape} {r.get('mode', 'qlora')}: measured peak over predicted",
                           _gb(measured), _gb(predicted), measured / predicted if measured and predicted else None,
                           "0.90..1.10", result.get("error") or reason))
    return out


def correctness_rows(figures: dict | None, reason: str) -> list[dict]:
    """The correctness pass: mismatch counts against bitsandbytes, matmul errors against float64."""
    f = figures or {}
    out = []
    for key, target in (("packed_mismatches", "NF4 packed bytes vs bitsandbytes (mismatches)"),
                        ("absmax_mismatches", "absmax codes vs bitsandbytes (mismatches)"),
                        ("dequant_same_bytes_mismatches", "dequantise bitsandbytes' bytes vs bitsandbytes "
                                                          "(mismatches)"),
                        ("dequant_own_mismatches", "dequantise (own bytes) vs bitsandbytes (mismatches)")):
        value = f.get(key)
        out.append(row("correctness", target, "-" if value is None else f"{value} of {f.get('values', '?')}",
                       "bitsandbytes", value, "== 0", f.get("bnb_error") or reason))
    for key, value in sorted((k, v) for k, v in f.items() if k.startswith("rel_err")):
        out.append(row("correctness", f"{key[len('rel_err_'):]} vs float64 (relative error)", f"{value:.2e}",
                       "float64", value, "<= 0.01"))
    return out
