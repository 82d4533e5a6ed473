"""CPU time per call of qlora.nf4_linear with the GPU launch stubbed, against F.linear.

    python bench/host_overhead.py [--reps 2000] [--shape 4096x4096] [--json FILE]

What a GPU run cannot hide: everything Python and torch do on the host before a kernel starts.
The Triton path runs (QLORA_BACKEND=triton) with every Triton launch replaced by a no-op, the launch
planned for an H100's 132 SMs, on two kinds of tensors: CPU tensors (torch's own small ops, e.g. the
split-K sum, do their arithmetic on the CPU: an upper bound) and meta tensors (no arithmetic, but
torch's meta kernels dispatch more slowly than CUDA ones: F.linear shows by how much). So the figures are qlora's host
work (checks, dispatch, allocations, autograd) without Triton's launcher and without device time.
Each mode is the median of rounds of --reps calls, CPU time of this process:

- inference forward (torch.inference_mode), M = 1 (decoding);
- training forward + backward (grad mode, x requiring grad), M = 1;
- the same two for F.linear with a bf16 weight of the same shape, also on meta tensors: torch's own
  per-call overhead on this machine, the floor for any op.

Goals (issue 9, on the 2-core development machine): <= 50 us per inference forward, <= 120 us per
training forward + backward.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ["QLORA_BACKEND"] = "triton"  # the Triton path's host code, on CPU tensors
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qlora  # noqa: E402
from qlora.kernels import adamw, backend, dequantize, gemv, matmul, quantize  # noqa: E402

GOALS_US = {"inference forward": 50.0, "training forward+backward": 120.0}


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextmanager
def launches_stubbed(sm_count: int = 132):
    """Every Triton kernel in qlora.kernels becomes a no-op while inside, and the host plans its
    launches for an H100's 132 SMs (the split-K paths a GPU would take, with their extra work)."""
    saved = [(mod, name, getattr(mod, name)) for mod in (adamw, dequantize, gemv, matmul, quantize)
             for name in dir(mod) if name.endswith("_kernel") and hasattr(getattr(mod, name), "fn")]
    saved_sm_count = backend.sm_count
    try:
        for mod, name, _ in saved:
            setattr(mod, name, _NoLaunch())
        backend.sm_count = lambda device: sm_count
        yield
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)
        backend.sm_count = saved_sm_count


def per_call_us(fn, reps: int, rounds: int = 7) -> float:
    """Median over rounds of the mean CPU (process) time of one call, after a warm-up round."""
    for _ in range(max(10, reps // 10)):
        fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(reps):
            fn()
        times.append((time.process_time() - start) / reps * 1e6)
    return statistics.median(times)


def measure(shape=(4096, 4096), reps: int = 2000, device: str = "cpu") -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    N, K = shape
    torch.manual_seed(0)
    # Quantised with the reference (quick on CPU): the bytes do not matter, the launches are stubbed.
    with_env = os.environ.pop("QLORA_BACKEND")
    w = qlora.quantize_nf4(torch.randn(N, K, dtype=torch.bfloat16) * 0.02).to(device)
    os.environ["QLORA_BACKEND"] = with_env
    assert backend.use_triton(w.packed), "the Triton path must be the one measured"
    x, g = (torch.randn(1, n, dtype=torch.bfloat16).to(device) for n in (K, N))
    # F.linear's weight: tiny on CPU (its arithmetic would hide its overhead), full size on meta.
    small_w = torch.randn(8, 8, dtype=torch.bfloat16) if device == "cpu" else torch.empty(N, K, device=device,
                                                                                           dtype=torch.bfloat16)
    small_x, small_g = (x[:, :8], g[:, :8]) if device == "cpu" else (x, g)

    def train(op, x, g):
        x = x.detach().requires_grad_()
        op(x).backward(g)

    results = {}
    with launches_stubbed():
        with torch.inference_mode():
            results["inference forward"] = {
                "qlora": per_call_us(lambda: qlora.nf4_linear(x, w), reps),
                "F.linear": per_call_us(lambda: F.linear(small_x, small_w), reps)}
        results["training forward+backward"] = {
            "qlora": per_call_us(lambda: train(lambda t: qlora.nf4_linear(t, w), x, g), reps // 4),
            "F.linear": per_call_us(lambda: train(lambda t: F.linear(t, small_w), small_x, small_g), reps // 4)}
    return results


def markdown(results: dict, shape) -> str:
    lines = [f"| tensors | mode ({shape[0]}x{shape[1]}, M = 1) | qlora us / call | F.linear us / call | goal | met |",
             "|---|---|---|---|---|---|"]
    for device, by_mode in results.items():
        for mode, r in by_mode.items():
            goal = GOALS_US[mode]
            lines.append(f"| {device} | {mode} | {r['qlora']:.1f} | {r['F.linear']:.1f} | <= {goal:.0f} | "
                         f"{'yes' if r['qlora'] <= goal else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split("x"))
    results = {device: measure(shape, args.reps, device) for device in ("cpu", "meta")}
    print(f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, 1 thread")
    print(markdown(results, shape))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".partial")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
