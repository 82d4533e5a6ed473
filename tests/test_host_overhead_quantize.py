"""quantize_nf4's per-call costs: the non-finite check reads the block scales, not the input again,
and holds nothing of the input's size (issue 12 item 8: a 3.3x peak); the code tables are copied
to the device once."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qlora
from qlora.kernels import quantize as Q

from helpers import IGNORE_ZERO_BLOCK_WARNINGS

pytestmark = IGNORE_ZERO_BLOCK_WARNINGS


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_nonfinite_found_from_the_block_scales(monkeypatch, backend_name, bad):
    # One bad value in the middle of a block, others finite and larger: the scale must still show it.
    monkeypatch.setenv("QLORA_BACKEND", backend_name)
    w = torch.randn(6, 64 * 5) * 0.02
    w[0, 3] = 5.0
    w[2, 70] = bad
    w[5, 319] = bad
    with pytest.raises(ValueError, match=r"up_proj: shape \[6, 320\] holds 2 NaN/Inf values"):
        qlora.quantize_nf4(w, name="up_proj")
    assert qlora.quantize_nf4(w, allow_nonfinite=True).numel == w.numel()


def test_nan_propagates_through_the_kernel_absmax():
    # The kernel's max keeps NaN (a plain max may drop it): the block's scale is NaN.
    x = torch.randn(64 * 3) * 0.1
    x[64 + 10] = float("nan")
    _, absmax = Q.quantize_nf4_blocks_triton(x, 64)
    assert torch.isnan(absmax[1]) and torch.isfinite(absmax[[0, 2]]).all()


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import qlora
    from qlora.kernels import quantize
    quantize.REFERENCE_CHUNK = 1 << 16  # the reference's own chunk temporaries, small beside the input
    n = int(sys.argv[1])
    w = torch.empty(n, dtype=torch.bfloat16).normal_(0, 0.02)
    torch.set_num_threads(1)
    qlora.quantize_nf4(w[:4096].clone())  # imports and first-call allocations out of the way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q = qlora.quantize_nf4(w)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024 / (2 * n))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in kilobytes is Linux's")
def test_peak_memory_stays_near_the_output_size():
    # 4 M bf16 elements (8 MB). What must be new: the packed codes (1/4 of the input), the scales
    # (1/32) and a chunk's temporaries; a whole-tensor isfinite alone would add 1/2 more.
    env = dict(os.environ, QLORA_BACKEND="torch", PYTHONPATH=str(Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(4 << 20)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = float(out.stdout.strip().splitlines()[-1])
    assert growth < 0.75, f"quantize_nf4 grew the peak by {growth:.2f}x the input"


def test_code_tables_copied_once_per_device(monkeypatch):
    # NF4Weight's tables come from a per-device cache (a device-side clone), not a fresh host copy.
    calls = []
    real = Q.device_code_table.__wrapped__
    Q.device_code_table.cache_clear()
    monkeypatch.setattr(Q.device_code_table, "__wrapped__", real)
    first = qlora.quantize_nf4(torch.randn(64, 64))
    second = qlora.quantize_nf4(torch.randn(64, 64))
    info = Q.device_code_table.cache_info()
    assert info.misses == 2 and info.hits >= 2, info  # nf4 and dynamic: built once, then reused
    assert first.quant_map.data_ptr() != second.quant_map.data_ptr()  # each weight owns its copy
    assert torch.equal(first.quant_map, qlora.nf4_codebook()) and calls == []
