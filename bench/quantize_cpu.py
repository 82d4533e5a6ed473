"""CPU quantise throughput (parameters/s): qlora's reference against bitsandbytes' CPU quantiser.

    python bench/quantize_cpu.py [--repeats 7] [--threads N]

Measured in the same run, same process, same threads:
  1. one 4096x4096 bf16 tensor, N(0, 0.02), NF4 with double quantisation, block 64;
  2. the embedded tiny Llama: every linear weight quantised in memory by each library, and
     qlora's whole `quantize` command (read, quantise, write shards) on it, I/O included.
Each figure: best and median of --repeats runs after one warm-up, the quantisers taking turns.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def interleaved_seconds(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{label: (best, median)} seconds. The functions take turns (A B A B ...) so that load from
    other processes on a shared machine falls on all of them alike; best is the least disturbed."""
    for fn in fns.values():
        fn()  # warm-up: tables, allocator, lazy imports
    times = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {label: (min(t), statistics.median(t)) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import bitsandbytes
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import load_file

    from qlora.nf4 import quantize_nf4
    from qlora.convert import DEFAULT_MODEL, plan_quantization, quantize_checkpoint
    from qlora.checkpoint import tensor_headers

    def bnb_quantize(w):
        return bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def ours_quantize(w):
        return quantize_nf4(w, blocksize=64, double_quant=True)

    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    rows = []

    w = (torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    results = interleaved_seconds({"qlora quantize_nf4": lambda: ours_quantize(w),
                                   "bitsandbytes quantize_4bit": lambda: bnb_quantize(w)}, args.repeats)
    rows += [("4096x4096 bf16", label, w.numel(), *times) for label, times in results.items()]

    tensors = load_file(DEFAULT_MODEL / "model.safetensors")
    linears, _ = plan_quantization(tensor_headers(DEFAULT_MODEL), ("lm_head",))
    linear_params = sum(tensors[n].numel() for n in linears)
    all_params = sum(t.numel() for t in tensors.values())
    with tempfile.TemporaryDirectory() as tmp:
        results = interleaved_seconds({
            "qlora quantize_nf4": lambda: [ours_quantize(tensors[n]) for n in linears],
            "bitsandbytes quantize_4bit": lambda: [bnb_quantize(tensors[n]) for n in linears],
            "qlora quantize (CLI path)": lambda: quantize_checkpoint(
                DEFAULT_MODEL, os.path.join(tmp, "out"), force=True, progress=False),
        }, args.repeats)
    for label, times in results.items():
        if label.endswith("(CLI path)"):
            rows.append(("tiny Llama, whole checkpoint, I/O incl.", label, all_params, *times))
        else:
            rows.append((f"tiny Llama, {len(linears)} linears in memory", label, linear_params, *times))

    width = max(len(r[0]) for r in rows)
    print(f"{'workload':<{width}}  {'quantiser':<27} {'params':>10} {'best s':>8} {'median s':>9} "
          f"{'Mparams/s best':>15} {'median':>7}")
    for workload, label, params, best, median in rows:
        print(f"{workload:<{width}}  {label:<27} {params:>10,} {best:>8.4f} {median:>9.4f} "
              f"{params / best / 1e6:>15.1f} {params / median / 1e6:>7.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
