"""The backend rule, and qlora without triton (macOS / Windows): the torch reference does everything."""
import subprocess
import sys
import textwrap

import pytest
import torch

from qlora.kernels import backend


def test_cpu_tensors_use_the_reference_unless_triton_is_forced(monkeypatch):
    monkeypatch.delenv("QLORA_BACKEND", raising=False)
    assert not backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    assert backend.use_triton(torch.zeros(1))  # under the interpreter on this machine
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    assert not backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("QLORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="QLORA_BACKEND='cuda': expected 'torch' or 'triton'"):
        backend.use_triton(torch.zeros(1))


WITHOUT_TRITON = textwrap.dedent("""
    import importlib.abc, os, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("No module named 'triton' (blocked for the test)")

    sys.meta_path.insert(0, NoTriton())
    import torch, qlora
    from qlora.kernels import backend
    assert not backend.HAS_TRITON

    w = torch.randn(96, 130, dtype=torch.bfloat16) * 0.02
    q = qlora.quantize_nf4(w)
    error = ((q.dequantize().float() - w.float()).norm() / w.float().norm()).item()
    assert error < 0.1, error
    x = torch.randn(3, 130, dtype=torch.bfloat16)
    y = qlora.nf4_linear(x, q)
    expected = x.double() @ q.dequantize(torch.float32).double().T
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-2

    os.environ["QLORA_BACKEND"] = "triton"
    try:
        qlora.quantize_nf4(w)
    except RuntimeError as err:
        assert "triton is not installed" in str(err), err
    else:
        raise AssertionError("QLORA_BACKEND=triton without triton must fail")
    print("ok")
""")


def test_qlora_imports_and_quantises_without_triton():
    env = {k: v for k, v in __import__("os").environ.items() if k != "QLORA_BACKEND"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
