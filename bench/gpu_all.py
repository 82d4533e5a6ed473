"""Measure the whole stack on one GPU in one command, within a hard time budget (issue 13).

    python bench/gpu_all.py OUTDIR [--budget 540] [--smoke] [--only kernels,e2e,...]

In order, each step in its own try/except so that one failure loses nothing else: the environment header
(device, driver, versions, measured copy bandwidth and bf16 matmul rate); a correctness pass (NF4 bytes and
dequantised values against bitsandbytes' kernels on 8192 x 8192 = 67M bf16 values, mismatch counts; the
matmuls against float64 at M = 1, 16, 4096); bench/kernels.py; bench/layer.py; bench/optim.py; bench/e2e.py
for the 7B shape (qlora, then transformers + PEFT + bitsandbytes, each in its own process) and the 65B shape
(qlora, fp32 and bf16 adapters); `qlora bench-memory --measure` against its own prediction for both shapes.
OUTDIR gets summary.md (one table of every target: figure, baseline from the same run, ratio, limit,
verdict), summary.json, tables.md (the benchmarks' own tables), log.txt (everything they printed) and the
two bench-memory JSON files: 6 files, within what the device tool brings back.

A watchdog stops the run at --budget seconds (default 540, 9 minutes), whatever is running: it kills the
current child process, writes the summary of what was measured, and exits with 124. SIGTERM, SIGINT and
SIGHUP do the same (exit 128 + the signal). Each child also gets at most the time left.

--only reruns the named steps into the same OUTDIR: the other steps keep the earlier run's results there
(status, rows, seconds, read from its summary.json), marked "earlier run, not rerun"; a step no earlier
run measured reads "skipped (--only)".

bitsandbytes is not on the GPU machine: bench/fetch_wheels.sh downloads its wheel into .whl/ (git-ignored)
here; when .whl/ holds wheels and bitsandbytes does not import, this script installs them with
`pip install --no-index --no-deps --target /tmp/site` and puts /tmp/site on the path (its own and the
children's). The device command (one call, the machine's start not counted in the 600 s):

    run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_all.py $OUT/gpu", carry=[".whl"], timeout_s=600)

--smoke runs every step on the CPU with tiny shapes, in this process (tests/test_gpu_all.py): kernels,
layer and optimizer benchmarks then print that there is no CUDA device, and their targets read "not
measured"; the figures of a smoke run mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STARTED = time.monotonic()  # the budget counts from here: installing the wheel and importing torch count too
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SITE = "/tmp/site"


def install_wheels() -> str:
    """Install .whl/*.whl into SITE when bitsandbytes is missing; returns what was done."""
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    try:
        import bitsandbytes  # noqa: F401
        return "bitsandbytes already importable"
    except Exception:  # missing, or broken on this machine
        pass
    if not wheels:
        return "no bitsandbytes and no wheels in .whl/ (run bench/fetch_wheels.sh where pip works)"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", SITE, *wheels],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode:
        return f"pip install of {len(wheels)} wheel(s) failed: {proc.stderr.strip()[-300:]}"
    sys.path.insert(0, SITE)
    return f"installed {', '.join(Path(w).name for w in wheels)} into {SITE}"


sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import gpu_env  # noqa: E402
import gpu_targets as T  # noqa: E402
from common import git_commit  # noqa: E402

SMOKE_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
                "max_position_embeddings": 64}


class Run:
    """The run's state: its output folder, the summary rows, the log, the child running now, the deadline."""

    def __init__(self, out: Path, smoke: bool, budget: float, wheels: str = ""):
        self.out, self.smoke, self.budget = out, smoke, budget
        self.device = torch.device("cpu" if smoke else "cuda")
        self.start = STARTED
        self.data: dict = {}     # step -> what it measured (set as it goes, so a stopped step keeps its part)
        self.status: dict = {}   # step -> "ok", "running", "error: ...", "not reached", ...
        self.seconds: dict = {}
        self.env: dict = {"wheels": wheels}
        self.earlier_rows: dict = {}  # step -> its rows in the earlier run's summary (a step --only skips)
        self.child: subprocess.Popen | None = None
        self.lock = threading.RLock()
        self.finished = False
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "log.txt", "a")  # a rerun with --only adds to it

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def log(self, text: str) -> None:
        with self.lock:
            self.log_file.write(text if text.endswith("\n") else text + "\n")
            self.log_file.flush()
        print(text, flush=True)

    def env_vars(self) -> dict:
        paths = [str(ROOT)] + ([SITE] if Path(SITE).is_dir() else []) + [os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}

    def run_child(self, cmd: list[str], cap: float) -> tuple[int, str]:
        """Run cmd in its own process group for at most min(cap, time left - 5 s); (exit code, output)."""
        timeout = max(min(cap, self.left() - 5), 1)
        self.log(f"$ {' '.join(cmd)}  (at most {timeout:.0f} s)")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=self.env_vars(), start_new_session=True)
        self.child = proc
        try:
            output, _ = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            self.kill_child()
            output, _ = proc.communicate()
            code = 124
            output += f"\n[stopped after {timeout:.0f} s]"
        finally:
            self.child = None
        self.log(output)
        return code, output

    def run_main(self, module: str, argv: list[str], cap: float) -> tuple[int, str]:
        """A bench script's main(argv): in its own process on the GPU, in this one for --smoke."""
        if not self.smoke:
            return self.run_child([sys.executable, str(BENCH / f"{module}.py"), *argv], cap)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            code = importlib.import_module(module).main(argv)
        self.log(buffer.getvalue())
        return int(code or 0), buffer.getvalue()

    def kill_child(self) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)

    def stop(self, reason: str, code: int) -> None:
        """The watchdog and the signals: kill the child, write what there is, leave at once."""
        with self.lock:
            if self.finished:
                return
            self.kill_child()
            for name, status in self.status.items():
                if status == "running":
                    self.status[name] = f"stopped: {reason}"
            self.write_summary(stopped=reason)
            self.log_file.flush()
            os._exit(code)

    def rows(self) -> list[dict]:
        """Every target's row, from what each step measured; a step that did not finish gives its reason."""
        out = []
        for name, _, rows_of in STEPS:
            status = self.status.get(name, "not reached")
            if name in self.earlier_rows:
                out += self.earlier_rows[name]
                continue
            try:
                out += rows_of(self.data.get(name), "" if status == "ok" else status)
            except Exception as err:  # an output we cannot read must not lose the rest of the summary
                out.append(T.row(name, f"(its output could not be read: {type(err).__name__}: {err})", "-", "-",
                                 None, "-", status))
        return out

    def write_summary(self, stopped: str | None = None) -> str:
        with self.lock:
            text = summary_markdown(self, stopped)
            record = {"env": self.env, "status": self.status, "seconds": self.seconds, "rows": self.rows(),
                      "data": {k: v for k, v in self.data.items() if not isinstance(v, str)}, "stopped": stopped}
            for name, data in (("summary.md", text), ("summary.json", json.dumps(record, indent=2, default=str))):
                partial = self.out / f".{name}.partial"
                partial.write_text(data)
                os.replace(partial, self.out / name)
            return text


def summary_markdown(run: Run, stopped: str | None) -> str:
    env = run.env
    lines = [f"## GPU run: {env.get('device', '?')} ({datetime.date.today().isoformat()}, commit {git_commit()})", ""]
    if run.smoke:
        lines += ["SMOKE RUN: CPU, tiny shapes; the figures mean nothing.", ""]
    lines.append(", ".join(f"{k} {env[k]}" for k in ("driver", "python", "torch", "cuda", "triton", "transformers",
                                                      "peft", "bitsandbytes") if k in env) + ".")
    if "copy_bytes_per_s" in env:
        lines.append(f"Measured here: device copy {env['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), "
                     f"bf16 matmul {env['bf16_matmul_flop_per_s'] / 1e12:.1f} TFLOP/s. Wheels: {env['wheels']}.")
    if stopped:
        lines.append(f"**Stopped early: {stopped}.** Rows below are what was measured until then.")
    if run.earlier_rows:
        lines.append(f"Not rerun (--only): {', '.join(run.earlier_rows)}; their rows are the earlier run's, read "
                     "from summary.json in this folder.")
    lines += ["", "| step | target | figure | baseline (same run) | ratio | limit | verdict |", "|---|---|---|---|---|---|---|"]
    for r in run.rows():
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3g}"
        lines.append(f"| {r['step']} | {r['target']} | {r['figure']} | {r['baseline']} | {ratio} | {r['limit']} | "
                     f"{r['verdict']} |")
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    for name, _, _ in STEPS:
        seconds = run.seconds.get(name)
        lines.append(f"| {name} | {run.status.get(name, 'not reached')} | "
                     f"{'-' if seconds is None else f'{seconds:.1f}'} |")
    return "\n".join(lines) + "\n"


NOT_RERUN = " (earlier run, not rerun)"


def keep_earlier_results(run: Run, skipped: list[str]) -> None:
    """--only: the steps it skips keep what the earlier run in the same folder measured (status, seconds,
    rows, data), marked as not rerun; a step with no earlier result reads "skipped (--only)"."""
    try:
        earlier = json.loads((run.out / "summary.json").read_text())
        statuses, rows = earlier["status"], earlier["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no earlier run here (or an unreadable summary): nothing to keep
    for name in skipped:
        status = statuses.get(name, "not reached")
        if status == "not reached" or status.startswith(("skipped", "running")):
            continue  # the earlier run has no result for it either
        run.status[name] = status if status.endswith(NOT_RERUN) else status + NOT_RERUN
        run.earlier_rows[name] = [r for r in rows if r.get("step") == name]
        if name in earlier.get("seconds", {}):
            run.seconds[name] = earlier["seconds"][name]
        if name in earlier.get("data", {}):
            run.data[name] = earlier["data"][name]
    if "environment" in run.earlier_rows:  # the header describes the machine the kept rows were measured on
        run.env = {**earlier.get("env", {}), "wheels": run.env.get("wheels", "")}


def plan(run: Run, only: list[str]) -> None:
    """Every step's status before the run: "not reached" for those it runs, and for the others --only
    skips, the earlier run's results where there are any."""
    run.status = {name: "not reached" if name in only else "skipped (--only)" for name, _, _ in STEPS}
    keep_earlier_results(run, [name for name, _, _ in STEPS if name not in only])


# ---- the steps: each measures into run.data[name] and returns its status ---------------------------------

def environment_step(run: Run) -> str:
    big = not run.smoke
    run.env.update(gpu_env.environment(run.device, 1 << 30 if big else 1 << 20, 8192 if big else 128,
                                       10 if big else 2))
    run.data["environment"] = dict(run.env)
    return "ok"


def correctness_step(run: Run) -> str:
    shape, ms = ((8192, 8192), (1, 16, 4096)) if not run.smoke else ((64, 1024), (1, 16, 64))
    run.data["correctness"] = gpu_env.correctness(run.device, *shape, ms)
    return "ok"


def _script_step(run: Run, name: str, module: str, argv: list[str], cap: float) -> str:
    code, output = run.run_main(module, argv, cap)
    run.data[name] = output
    if not torch.cuda.is_available():
        return "no CUDA: nothing measured"
    return "ok" if code == 0 else f"error: exit {code}"


def kernels_step(run: Run) -> str:
    return _script_step(run, "kernels", "kernels", ["--reps", "20", "--out", str(run.out / "tables.md")], 150)


def layer_step(run: Run) -> str:
    return _script_step(run, "layer", "layer", ["--reps", "20", "--warmup", "5", "--out", str(run.out / "tables.md")],
                        90)


def optim_step(run: Run) -> str:
    figures = run.out / "optim.json"
    status = _script_step(run, "optimizer", "optim", ["--reps", "10", "--out", str(run.out / "tables.md"),
                                                      "--json", str(figures)], 90)
    run.data["optimizer"] = json.loads(figures.read_text()) if figures.exists() else None
    return status


E2E_RUNS = [("7b-qlora", "qlora", "llama-7b", False), ("7b-hf", "hf", "llama-7b", False),
            ("65b-qlora-fp32", "qlora", "llama-65b", False), ("65b-qlora-bf16", "qlora", "llama-65b", True)]
MEMORY_RUNS = [  # (shape, preset, bench-memory arguments, cap): the 65B one with its states paged out, as e2e runs it
    ("7B", "llama-7b", ["--modes", "qlora"], 120),
    ("65B", "llama-65b", ["--bf16-adapters", "--modes", "qlora-paged", "--gpu-budget", "32MiB"], 240)]
E2E_CAPS = {"7b-qlora": 90, "7b-hf": 120, "65b-qlora-fp32": 150, "65b-qlora-bf16": 150}


def e2e_step(run: Run) -> str:
    import e2e

    results = run.data.setdefault("e2e", {})
    if run.device.type == "cuda":  # what this process holds (its context): in every child's "in use" figure
        free, total = torch.cuda.mem_get_info()
        results["parent_in_use_bytes"] = total - free
    for key, stack, preset, bf16_adapters in E2E_RUNS:
        budget = e2e.qlora_budget(preset)
        if run.smoke:  # the tiny model, on the CPU, in this process (paging simulated where budgeted)
            preset = str(run.out / "smoke-config.json")
            try:
                results[key] = (e2e.run_qlora(preset, 1, bf16_adapters, "cpu", 32, 0, budget) if stack == "qlora"
                                else e2e.run_hf(preset, 1, "cpu", 32, warmup=0))
            except Exception as err:
                results[key] = {"stack": stack, "preset": preset, "error": f"{type(err).__name__}: {err}"}
        else:
            code, output = run.run_child(e2e.child_command(stack, preset, 3, bf16_adapters, budget), E2E_CAPS[key])
            results[key] = e2e.read_result(stack, preset, code, output, output)
        run.log(f"e2e {key}: {json.dumps(results[key])}")
    errors = [key for key, r in results.items() if isinstance(r, dict) and "error" in r]
    return f"error in {', '.join(errors)}" if errors else "ok"


def memory_step(run: Run) -> str:
    results = run.data.setdefault("bench-memory", {})
    for shape, preset, extra, cap in MEMORY_RUNS:
        path = run.out / f"memory-{shape.lower()}.json"
        argv = ["bench-memory", "--grad-ckpt", "--measure", "--json", str(path), *extra]
        if run.smoke:
            from qlora.cli import main as qlora_main

            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                code = qlora_main(argv + ["--config", str(run.out / "smoke-config.json"), "--seq", "32",
                                          "--device", "cpu"])
            run.log(buffer.getvalue())
        else:
            code, _ = run.run_child([sys.executable, "-m", "qlora.cli", *argv, "--preset", preset, "--device", "cuda"],
                                    cap)
        results[shape] = json.loads(path.read_text()) if code == 0 and path.exists() else {"error": f"exit {code}"}
    errors = [shape for shape, r in results.items() if "error" in r]
    return f"error in {', '.join(errors)}" if errors else "ok"


STEPS = [
    ("environment", environment_step, lambda data, reason: []),
    ("correctness", correctness_step, T.correctness_rows),
    ("kernels", kernels_step, T.kernel_rows),
    ("layer", layer_step, T.layer_rows),
    ("optimizer", optim_step, T.optim_rows),
    ("e2e", e2e_step, lambda data, reason: T.e2e_rows(data or {}, reason)),
    ("bench-memory", memory_step, lambda data, reason: T.memory_rows(data or {}, reason)),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for summary.md, summary.json, tables.md, log.txt, ...")
    parser.add_argument("--budget", type=float, default=540, help="seconds before the watchdog stops the run")
    parser.add_argument("--smoke", action="store_true", help="every step on the CPU with tiny shapes")
    parser.add_argument("--only", help="comma-separated steps to run (a second run after a partial one; the "
                                       "others keep the earlier run's results in OUT): "
                                       + ",".join(name for name, _, _ in STEPS))
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",")] if args.only else [name for name, _, _ in STEPS]
    unknown = sorted(set(only) - {name for name, _, _ in STEPS})
    if unknown:
        parser.error(f"--only: unknown steps {unknown}")
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu_all.py: no CUDA device here; run it on the GPU machine, or --smoke for the CPU check")
        return 0
    run = Run(args.out, args.smoke, args.budget, "smoke run: no install" if args.smoke else install_wheels())
    plan(run, only)
    if args.smoke:
        (args.out / "smoke-config.json").write_text(json.dumps(SMOKE_CONFIG))
    watchdog = threading.Timer(max(run.left(), 0), run.stop, (f"the {args.budget:.0f} s budget ran out", 124))
    watchdog.daemon = True
    watchdog.start()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, _f: run.stop(f"signal {signal.Signals(n).name}", 128 + n))
    for name, measure, _ in STEPS:
        if name not in only:
            continue
        run.status[name] = "running"
        run.log(f"== {name} ({run.left():.0f} s left)")
        started = time.monotonic()
        try:
            run.status[name] = measure(run)
        except Exception as err:  # one step's failure loses nothing else
            run.status[name] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            run.log(run.status[name])
        run.seconds[name] = time.monotonic() - started
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        run.write_summary()
    with run.lock:
        run.finished = True
        watchdog.cancel()
        print(run.write_summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
