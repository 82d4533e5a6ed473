"""bench/sass_report.py keeps compiling on CI (Triton's own ptxas, nvdisasm and cuobjdump build for
sm_90a without a GPU), and the inner loops keep issue 9's targets on that build."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tools_ship_with_triton():
    # Not a skip condition: the report (and this test) rely on them being there.
    triton = pytest.importorskip("triton")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    assert all((bin_dir / tool).exists() for tool in ("ptxas", "nvdisasm", "cuobjdump"))


def test_report_builds_and_meets_the_loop_targets(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("QLORA_BACKEND", None)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_report.py"), "--shapes", "4096x4096",
                             "--ms", "1,4096", "--only", "dequantise,quantise,forward,input grad", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["config"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"dequantise 4096x4096", "quantise 4096x4096", "forward 4096x4096 M=1",
                         "forward 4096x4096 M=4096", "input grad 4096x4096 M=4096"}
    for row in rows.values():
        assert row["regs"] > 0 and row["spills"] == 0 and row["waves"] > 0 and row["sass_per_element"] > 0
    dequantise, quantise, gemv = (rows[k] for k in ("dequantise 4096x4096", "quantise 4096x4096",
                                                    "forward 4096x4096 M=1"))
    assert dequantise["sass_per_element"] <= 4 and "128" in dequantise["loads"] and dequantise["stores"] == "128"
    assert quantise["sass_per_element"] <= 16 and "128" in quantise["stores"]
    # GEMV at M = 1: <= 5 (each 16-byte run summed in-thread, scaled once); no cross-lane sum in the loop.
    assert gemv["kernel"] == "_nf4_gemv_kernel" and gemv["shuffles"] == 0 and gemv["sass_per_element"] <= 5
    # Large M: fused wgmma tiles, two CTAs per SM, each decoding in less time than its own MMA takes,
    # so the other CTA's decode hides behind it (the model's overlap).
    for config in ("forward 4096x4096 M=4096", "input grad 4096x4096 M=4096"):
        row = rows[config]
        assert row["mma"] == "wgmma (HGMMA)" and row["ctas_per_sm"] >= 2 and row["waves"] >= 1
        assert row["notes"]["overlap"] == f"{row['ctas_per_sm']} CTAs" and row["notes"]["decode_over_mma"] < 1
        assert row["modelled_us"] == pytest.approx(row["floor_us"], rel=0.01)  # tensor-core bound
    assert "| dequantise 4096x4096 |" in result.stdout  # the markdown table too


def test_gemv_keeps_its_registers_at_large_blocksizes(tmp_path):
    # bitsandbytes allows blocksizes up to 4096: the GEMV's tile (and its accumulator at M >= 2) must
    # not grow with the blocksize until it spills (it spilled 4-14 KB per thread at 1024-4096).
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("QLORA_BACKEND", None)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_report.py"), "--shapes", "4096x4096",
                             "--ms", "1,2,4", "--only", "forward", "--blocksize", "4096", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["config"] for row in rows] == [f"forward 4096x4096 M={m}" for m in (1, 2, 4)]
    for row in rows:
        assert row["kernel"] == "_nf4_gemv_kernel" and row["spills"] == 0 and row["waves"] >= 1
