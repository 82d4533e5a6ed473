"""Timing and reporting shared by the GPU benchmarks in bench/. Each is run as a script, so its own
folder is first on sys.path and it imports this module as `common`."""
from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The checkout's short HEAD hash, or "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(title: str, **versions: str) -> list[str]:
    """Markdown lines: the title, then the date, the commit, torch's and triton's versions and any others."""
    import triton

    extra = "".join(f", {name} {version}" for name, version in versions.items())
    return [
        title,
        "",
        f"date {datetime.datetime.now().isoformat(timespec='minutes')}, commit {git_commit()}, torch {torch.__version__}, "
        f"triton {triton.__version__}{extra}",
        "",
    ]


def arg_parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """A parser described by the first line of doc, with --reps (default reps) and --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--out", type=Path, help="append the table to this markdown file")
    return parser


def no_cuda(note: str) -> bool:
    """True, after printing note, where there is no CUDA device to measure on."""
    if torch.cuda.is_available():
        return False
    print(note)
    return True


def cuda_median_ms(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over reps calls, each timed with CUDA events and followed by a
    device synchronisation, after warmup untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def emit(text: str, out: Path | None) -> None:
    """Print the table and, when out is given, append it to that file after a blank line."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text)
