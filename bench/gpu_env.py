"""The first two steps of bench/gpu_all.py: the environment header (device, driver, versions, measured copy
bandwidth and bf16 matmul rate) and the correctness pass (qlora's NF4 bytes and dequantised values against
bitsandbytes' kernels on the same device, qlora's matmuls against float64). Both run on any device: on the
CPU (--smoke) with tiny sizes, against bitsandbytes' CPU kernels."""
from __future__ import annotations

import platform
import statistics
import subprocess
import time

import torch

from common import cuda_median_ms


def median_ms(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of fn(): CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        return cuda_median_ms(fn, reps)
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception as err:  # not installed, or broken on this machine
        return f"not available ({type(err).__name__})"


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, copy_bytes: int, matmul_n: int, reps: int) -> dict:
    """Versions, device, and two ceilings measured here: device copy bandwidth (bytes read + written per
    second) and the bf16 matmul rate (FLOP/s) of an n x n x n product."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "peft", "bitsandbytes"):
        env[name] = _version(name)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", driver=_driver())
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                   driver="-")
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    env["copy_bytes_per_s"] = 2 * copy_bytes / (median_ms(lambda: dst.copy_(src), reps, device) * 1e-3)
    del src, dst
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    env["bf16_matmul_flop_per_s"] = 2 * matmul_n**3 / (median_ms(lambda: a @ b, reps, device) * 1e-3)
    return env


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def correctness(device: torch.device, out_features: int, in_features: int, ms: tuple[int, ...]) -> dict:
    """Mismatch counts against bitsandbytes on out x in bf16 values N(0, 0.02), and the relative errors of
    nf4_linear / nf4_linear_grad_input against float64 at each M."""
    from qlora.nf4 import NF4Weight, nf4_linear, nf4_linear_grad_input, quantize_nf4

    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g, device=device).mul_(0.02).to(torch.bfloat16)
    ours = quantize_nf4(w)
    result: dict = {"values": w.numel(), "shape": f"{out_features}x{in_features}"}
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        theirs_w = bnbf.dequantize_4bit(packed, state)
        result["packed_mismatches"] = int((ours.packed.view(-1) != packed.view(-1)).sum())
        result["absmax_mismatches"] = int((ours.absmax.view(-1) != state.absmax.view(-1)).sum())
        # Their bytes through our dequantiser: the dequantise kernel alone, whatever the quantisers did.
        same_bytes = NF4Weight(packed=packed.view(-1, 1), absmax=state.absmax, shape=tuple(w.shape), dtype=w.dtype,
                               blocksize=64, quant_map=state.code.float(), nested_absmax=state.state2.absmax,
                               nested_code=state.state2.code.float(), offset=state.offset)
        bits = torch.bfloat16
        result["dequant_same_bytes_mismatches"] = int((same_bytes.dequantize(bits).view(torch.int16)
                                                       != theirs_w.view(torch.int16)).sum())
        result["dequant_own_mismatches"] = int((ours.dequantize(bits).view(torch.int16)
                                                != theirs_w.view(torch.int16)).sum())
        del theirs_w, same_bytes
    except Exception as err:  # no bitsandbytes, or no build for this device
        result["bnb_error"] = f"bitsandbytes: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    reference = ours.dequantize(torch.bfloat16).double()
    for m in ms:
        x = torch.randn(m, in_features, generator=g, device=device).to(torch.bfloat16)
        result[f"rel_err_nf4_linear_M{m}"] = _rel_err(nf4_linear(x, ours), x.double() @ reference.T)
        grad = torch.randn(m, out_features, generator=g, device=device).to(torch.bfloat16)
        result[f"rel_err_grad_input_M{m}"] = _rel_err(nf4_linear_grad_input(grad, ours), grad.double() @ reference)
    return result
