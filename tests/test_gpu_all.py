"""bench/gpu_all.py: the smoke run on the CPU (every step, the summary of every target), the watchdog and
signals (what was measured is written, the run stops), and the reading of each benchmark's output."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_targets as T  # noqa: E402

STEPS = ["environment", "correctness", "kernels", "layer", "optimizer", "e2e", "bench-memory"]


def start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "gpu_all.py"), "--smoke", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def test_smoke_runs_every_step_and_lists_every_target(tmp_path):
    proc = start(tmp_path / "out")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    record = json.loads((out / "summary.json").read_text())
    assert "SMOKE RUN" in summary
    assert list(record["status"]) == STEPS
    assert record["status"]["kernels"] == record["status"]["layer"] == "no CUDA: nothing measured"
    for step in ("environment", "correctness", "e2e", "bench-memory"):
        assert record["status"][step] == "ok", (step, record["status"][step])
    targets = {r["target"] for r in record["rows"]}
    for _, target, _ in T.KERNEL_TARGETS:
        assert target in targets
    for words in ("over bf16 + LoRA", "over bnb + PEFT", "all resident, over torch fused", "25 % budget",
                  "7B training tokens/s", "7B device memory", "65B shape device memory in use, fp32",
                  "65B shape device memory in use, bf16", "7B qlora: measured peak", "65B qlora-paged: measured peak",
                  "NF4 packed bytes vs bitsandbytes", "nf4_linear_M16 vs float64", "grad_input_M64 vs float64"):
        assert any(words in t for t in targets), words
    by_target = {r["target"]: r for r in record["rows"]}
    # What runs on the CPU is checked for real: bytes equal to bitsandbytes', matmuls near float64, the
    # bench-memory prediction within 10 % of the measured CPU step.
    assert by_target["NF4 packed bytes vs bitsandbytes (mismatches)"]["verdict"] == "pass"
    assert by_target["dequantise bitsandbytes' bytes vs bitsandbytes (mismatches)"]["verdict"] == "pass"
    assert by_target["nf4_linear_M1 vs float64 (relative error)"]["verdict"] == "pass"
    assert by_target["7B qlora: measured peak over predicted"]["verdict"] == "pass"
    assert record["data"]["e2e"]["7b-hf"]["final_loss"] > 0  # transformers + PEFT + bitsandbytes ran too
    # What comes back from the device: few files, plain names, no folders.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files


def test_watchdog_writes_what_it_has_and_stops(tmp_path):
    started = time.monotonic()
    proc = start(tmp_path / "out", "--budget", "4", "--only", "environment,e2e,bench-memory")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 124, output[-3000:]
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert record["stopped"] == "the 4 s budget ran out"
    # The budget counts from the start (imports too): the step running then, if any, is marked stopped.
    stopped = [s for s, status in record["status"].items() if status.startswith("stopped:")]
    assert len(stopped) <= 1 and set(stopped) <= {"environment", "e2e", "bench-memory"}
    assert record["status"]["correctness"] == record["status"]["kernels"] == "skipped (--only)"
    # The steps after it are listed as not reached, their targets too.
    assert record["rows"][-1]["verdict"] == "not measured (not reached)"
    assert "Stopped early: the 4 s budget ran out" in (tmp_path / "out" / "summary.md").read_text()
    assert time.monotonic() - started < 90


def test_only_keeps_the_earlier_results_of_the_steps_it_skips(tmp_path):
    """A rerun of some steps into the same folder: the others keep the earlier run's rows, marked as not rerun."""
    out = tmp_path / "out"
    out.mkdir()
    kernel_row = T.row("kernels", "quantise: speed-up over bitsandbytes (4096x4096)", "30.0", "240.0 (bnb)", 8.0,
                       ">= 7")
    e2e_row = T.row("e2e", "7B training tokens/s over bnb + PEFT", "-", "-", None, "-", "error: exit 1")
    earlier = {"env": {"device": "NVIDIA H200", "torch": "2.13"},
               "status": {"environment": "ok", "correctness": "not reached", "kernels": "ok",
                          "layer": "skipped (--only)", "optimizer": "ok (earlier run, not rerun)",
                          "e2e": "error: exit 1", "bench-memory": "running"},
               "seconds": {"kernels": 41.5, "e2e": 3.0}, "data": {}, "stopped": None,
               "rows": [kernel_row, e2e_row, T.row("optimizer", "AdamW step", "1 ms", "1 ms", 1.0, "<= 1.2")]}
    (out / "summary.json").write_text(json.dumps(earlier))
    import gpu_all

    run = gpu_all.Run(out, smoke=True, budget=600)
    gpu_all.plan(run, ["correctness"])  # what main() does before the steps of `--only correctness` run
    run.write_summary()
    record = json.loads((out / "summary.json").read_text())
    assert record["status"]["correctness"] == "not reached"  # to be rerun
    assert record["status"]["kernels"] == "ok (earlier run, not rerun)" and record["seconds"]["kernels"] == 41.5
    assert record["status"]["e2e"] == "error: exit 1 (earlier run, not rerun)"
    assert record["status"]["optimizer"] == "ok (earlier run, not rerun)"  # not marked twice
    # Steps the earlier run has no result for either are said to be skipped, not measured.
    assert record["status"]["layer"] == record["status"]["bench-memory"] == "skipped (--only)"
    kernels = [r for r in record["rows"] if r["step"] == "kernels"]
    assert kernels == [kernel_row]
    assert [r for r in record["rows"] if r["step"] == "e2e"] == [e2e_row]
    assert all(r["verdict"].startswith("not measured") for r in record["rows"] if r["step"] == "layer")
    assert all(r["verdict"] == "not measured (not reached)" for r in record["rows"] if r["step"] == "correctness")
    assert record["env"]["device"] == "NVIDIA H200"  # the machine the kept rows were measured on
    summary = (out / "summary.md").read_text()
    assert "Not rerun (--only): environment, kernels, optimizer, e2e" in summary
    assert "| kernels | ok (earlier run, not rerun) | 41.5 |" in summary


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_stops_the_run_the_same_way(tmp_path, signum):
    proc = start(tmp_path / "out")
    log = tmp_path / "out" / "log.txt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and "== environment" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, output[-3000:]
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert record["stopped"] == f"signal {signal.Signals(signum).name}"


def test_a_child_gets_at_most_its_cap_and_is_killed_with_its_children(tmp_path):
    import gpu_all

    run = gpu_all.Run(tmp_path / "out", smoke=False, budget=600)
    code, output = run.run_child([sys.executable, "-c", "print('hello')"], cap=30)
    assert (code, output.strip()) == (0, "hello")
    # A child that outlives its cap is killed, its own children too (the whole process group).
    marker = tmp_path / "grandchild-alive"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w')\n")
    child = tmp_path / "child.py"
    child.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(grandchild)!r}])\n"
                     "time.sleep(60)\n")
    started = time.monotonic()
    code, output = run.run_child([sys.executable, str(child)], cap=2)
    assert code == 124 and "[stopped after 2 s]" in output
    assert time.monotonic() - started < 20
    time.sleep(4)
    assert not marker.exists()
    assert "$ " in (tmp_path / "out" / "log.txt").read_text()


KERNELS_OUTPUT = """## NF4 kernels: NVIDIA H200

| shape [out, in] | measurement | qlora us | baseline | ratio | bnb us | target | check |
|---|---|---|---|---|---|---|---|
| 4096x4096 | dequantise (share of copy bandwidth) | 12.0 | 0.042 GB moved | 0.93 | 20.1 (0.55) | >= 0.90 | ok |
| 4096x4096 | quantise (speed-up over bnb) | 30.0 | 240.0 (bnb) | 8.00 | 240.0 | >= 7 | ok |
| 4096x4096 | M=1 forward (speed-up over bf16) | 7.0 | 21.0 (bf16) | 3.00 | 14.0 | >= 3.3 | ok |
| 4096x4096 | M=16 forward (speed-up over bf16) | 7.0 | 22.0 (bf16) | 3.14 | 40.0 | >= 3.0 | FAIL quant=False |
| 4096x4096 | M=4096 forward (time over bf16) | 190.0 | 186.0 (bf16) | 1.022 | 214.0 | <= 1.02; dequant+cuBLAS 1.100 | ok |
"""

LAYER_OUTPUT = """| out x in | layer | ms | vs bf16+LoRA | memory for backward MiB |
|---|---|---|---|---|
| 4096x4096 | bf16 nn.Linear + LoRA | 0.600 | 1.00x | 64.0 (64.0) |
| 4096x4096 | qlora QuantLoRALinear | 0.630 | 1.05x | 66.0 (66.0) |
| 4096x4096 | bnb Linear4bit + PEFT LoRA | 0.700 | 1.17x | 80.0 (80.0) |
"""


def test_kernel_table_is_read_by_column():
    rows = {r["target"]: r for r in T.kernel_rows(KERNELS_OUTPUT, "")}
    assert rows["dequantise: share of copy bandwidth (4096x4096)"]["verdict"] == "pass"      # 0.93 >= 0.90
    assert rows["quantise: speed-up over bitsandbytes (4096x4096)"]["verdict"] == "pass"     # 8.00 >= 7
    assert rows["M=1 forward: speed-up over bf16 (4096x4096)"]["verdict"] == "FAIL"          # 3.00 < 3.3
    assert rows["M=16 forward: speed-up over bf16 (4096x4096)"]["verdict"] == "FAIL (check: FAIL quant=False)"
    assert rows["M=4096 forward: time over bf16 (4096x4096)"]["verdict"] == "FAIL"           # 1.022 > 1.02
    assert rows["M=4096 forward: time over bf16 (4096x4096)"]["baseline"] == "186.0 (bf16)"
    # A target without a row in the output is listed as not measured, with the step's reason.
    assert rows["M=4096 input gradient: time over bf16"]["verdict"] == "not measured"
    assert T.kernel_rows(None, "error: exit 1")[0]["verdict"] == "not measured (error: exit 1)"


def test_layer_table_gives_both_ratios():
    over_bf16, over_bnb = T.layer_rows(LAYER_OUTPUT, "")
    assert over_bf16["ratio"] == pytest.approx(0.630 / 0.600) and over_bf16["verdict"] == "pass"
    assert over_bnb["ratio"] == pytest.approx(0.700 / 0.630) and over_bnb["verdict"] == "FAIL"  # 1.11 < 1.2


def test_e2e_memory_and_verdicts():
    results = {"7b-qlora": {"tokens_per_second": 4000.0, "device_in_use_bytes": 8e9},
               "7b-hf": {"tokens_per_second": 2771.0, "device_in_use_bytes": 10.7e9},
               "65b-qlora-fp32": {"error": "CUDA out of memory"},
               "65b-qlora-bf16": {"device_in_use_bytes": 43e9}}
    speed, memory, fp32, bf16 = T.e2e_rows(results, "")
    assert speed["ratio"] == pytest.approx(4000 / 2771) and speed["verdict"] == "pass"
    assert memory["ratio"] == pytest.approx(8 / 10.7) and memory["verdict"] == "pass"
    assert fp32["verdict"] == "not measured (CUDA out of memory)"
    assert bf16["verdict"] == "pass" and bf16["figure"] == "43.00 GB"
    # What gpu_all.py itself holds on the device is not the child's: 1.5 GB less.
    *_, bf16 = T.e2e_rows({**results, "parent_in_use_bytes": 1.5e9}, "")
    assert bf16["figure"] == "41.50 GB"
    rows = T.memory_rows({"7B": {"rows": [{"mode": "qlora", "measured_peak_bytes": 11.5e9,
                                           "predicted_total_bytes": 10e9}]}}, "")
    assert rows[0]["verdict"] == "FAIL" and rows[1]["verdict"] == "not measured"  # 1.15 is outside 10 %
    assert T.verdict(0.9, "0.90..1.10") == "pass" and T.verdict(0, "== 0") == "pass"
    assert T.verdict(1, "== 0") == "FAIL"
