"""CPU quantise throughput (parameters/s): qlora's reference against bitsandbytes' CPU quantiser.

    python bench/quantize_cpu.py [--repeats 5] [--threads N]

Measured in the same run, same process, same threads:
  1. one 4096x4096 bf16 tensor, N(0, 0.02), NF4 with double quantisation, block 64;
  2. the embedded tiny Llama: every linear weight quantised in memory by each library, and
     qlora's whole `quantize` command (read, quantise, write shards) on it, I/O included.
Each figure is the median of --repeats runs after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: tables, allocator, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import bitsandbytes
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import load_file

    from qlora.nf4 import quantize_nf4
    from qlora.quantize_checkpoint import DEFAULT_MODEL, plan_quantization, quantize_checkpoint
    from qlora.checkpoint import tensor_headers

    def bnb_quantize(w):
        return bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def ours_quantize(w):
        return quantize_nf4(w, blocksize=64, double_quant=True)

    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    rows = []

    w = (torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    for label, fn in (("qlora quantize_nf4", ours_quantize), ("bitsandbytes quantize_4bit", bnb_quantize)):
        seconds = median_seconds(lambda: fn(w), args.repeats)
        rows.append(("4096x4096 bf16", label, w.numel(), seconds))

    tensors = load_file(DEFAULT_MODEL / "model.safetensors")
    linears, _ = plan_quantization(tensor_headers(DEFAULT_MODEL), ("lm_head",))
    linear_params = sum(tensors[n].numel() for n in linears)
    for label, fn in (("qlora quantize_nf4", ours_quantize), ("bitsandbytes quantize_4bit", bnb_quantize)):
        seconds = median_seconds(lambda: [fn(tensors[n]) for n in linears], args.repeats)
        rows.append((f"tiny Llama, {len(linears)} linears in memory", label, linear_params, seconds))

    all_params = sum(t.numel() for t in tensors.values())
    with tempfile.TemporaryDirectory() as tmp:
        seconds = median_seconds(
            lambda: quantize_checkpoint(DEFAULT_MODEL, os.path.join(tmp, "out"), force=True, progress=False),
            args.repeats)
    rows.append(("tiny Llama, whole checkpoint (I/O incl.)", "qlora quantize", all_params, seconds))

    width = max(len(r[0]) for r in rows)
    print(f"{'workload':<{width}}  {'quantiser':<27} {'params':>10} {'median s':>9} {'Mparams/s':>10}")
    for workload, label, params, seconds in rows:
        print(f"{workload:<{width}}  {label:<27} {params:>10,} {seconds:>9.4f} {params / seconds / 1e6:>10.2f}")


if __name__ == "__main__":
    main()
