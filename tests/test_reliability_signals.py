"""Signals (issue 12, item 3), each in a process of its own.

| case                                                | expected behaviour                                     |
|-----------------------------------------------------|--------------------------------------------------------|
| SIGTERM / SIGHUP during `qlora quantize`            | exit 128+signal, one line, no DST, no partial folder   |
| SIGTERM during `qlora finetune --force`             | exit 143, old --out intact, no partial or temp folder  |
| SIGKILL during `qlora quantize`, then a new run     | the new run removes the dead run's partial and says so |
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.cli import main
from test_convert import small_model

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI with a pause at a known point: prints READY there and waits for the signal.
DRIVER = """
import importlib, sys, time
from qlora.cli import main
module = importlib.import_module(sys.argv[1])
real = getattr(module, sys.argv[2])
def pause(*args, **kwargs):
    print("READY", flush=True)
    time.sleep(120)
    return real(*args, **kwargs)
setattr(module, sys.argv[2], pause)
sys.exit(main(sys.argv[3:]))
"""


def start(tmp_path: Path, module: str, function: str, *argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", DRIVER, module, function, *map(str, argv)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines = []
    while not lines or lines[-1].strip() != "READY":
        lines.append(process.stdout.readline())
        if not lines[-1]:  # the driver ended before its pause
            process.kill()
            pytest.fail(f"driver did not reach its pause: {lines} {process.communicate()[1][-2000:]}")
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_quantize_cleans_up_on_sigterm_and_sighup(tmp_path, signum):
    src = small_model(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    process = start(tmp_path, "qlora.convert", "quantize_nf4", "quantize", src, out / "dst", "--no-progress")
    assert any(p.name.endswith(".partial") for p in out.iterdir())  # it was writing when signalled
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert err.strip() == f"qlora quantize: terminated by {signal.Signals(signum).name}"
    assert list(out.iterdir()) == []


def test_finetune_sigterm_keeps_the_old_output_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("the previous adapter")
    data = tmp_path / "data.txt"
    data.write_text(("The quick brown fox jumps over the lazy dog. " * 6 + "\n\n") * 2)
    # Paused in load_model: the partial --out and the temporary folder for the 4-bit model both exist.
    process = start(tmp_path, "qlora.finetune", "load_model", "finetune", "--data", data, "--out", out,
                    "--force", "--steps", 1, "--r", 2, "--seq", 32, "--batch", 1, "--no-progress")
    assert len([p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("qlora")]) == 1
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".partial")]) == 1
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "out", "tmp"]
    assert [p.name for p in out.iterdir()] == ["adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_text() == "the previous adapter"
    assert [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("qlora")] == []


def test_sigkill_leaves_a_partial_that_the_next_run_removes(tmp_path, capsys):
    src = small_model(tmp_path / "m")
    out = tmp_path / "out"
    process = start(tmp_path, "qlora.convert", "quantize_nf4", "quantize", src, out / "dst", "--no-progress")
    process.kill()
    process.communicate(timeout=120)
    partials = [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert len(partials) == 1 and f"-{process.pid}-" in partials[0].name
    assert main(["quantize", str(src), str(out / "dst"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"removed {partials[0]}" in err and f"process {process.pid}" in err
    assert [p.name for p in out.iterdir()] == ["dst"]
