"""FP4 quantise: qlora against bitsandbytes' quantize_4bit(quant_type="fp4"), bytes and time.

    python bench/quantize_fp4.py [--reps 50] [--out bench/RESULTS.md]

On a GPU: qlora's Triton kernel against bitsandbytes' CUDA kernel, bf16 N(0, 0.02) weights, block 64,
double quantisation. Before timing, the packed codes and absmax of both are compared: equal bytes are
the check that docs/FP4.md's thresholds are the CUDA kernel's (no CUDA test vectors exist for FP4).
Without a GPU: the same comparison and timing on the CPU (qlora's torch reference against
bitsandbytes' CPU quantiser), where the codes are expected to differ as docs/FP4.md describes.
"""
from __future__ import annotations

import time

import torch

from common import arg_parser, cuda_median_ms, emit, header

from qlora.nf4 import quantize_4bit  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (28672, 8192)]


def median_ms(fn, reps: int, on_gpu: bool) -> float:
    if on_gpu:
        return cuda_median_ms(fn, reps)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    args = arg_parser(__doc__, reps=50).parse_args()
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    shapes = SHAPES if on_gpu else SHAPES[:1]
    reps = args.reps if on_gpu else min(args.reps, 5)
    lines = header(f"## FP4 quantise, {'GPU' if on_gpu else 'CPU'}", bitsandbytes=bitsandbytes.__version__)
    lines += ["| shape [out, in] | codes differing | absmax equal | qlora ms | bitsandbytes ms |", "|---|---|---|---|---|"]
    for out_features, in_features in shapes:
        w = (torch.randn(out_features, in_features, device=device) * 0.02).to(torch.bfloat16)
        ours = quantize_4bit(w, "fp4", 64, double_quant=False)
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="fp4")
        a, b = ours.packed.reshape(-1), packed.reshape(-1).view(torch.uint8)
        differing = int(((a >> 4) != (b >> 4)).sum() + ((a & 15) != (b & 15)).sum())
        absmax_equal = torch.equal(ours.absmax, state.absmax)
        t_ours = median_ms(lambda: quantize_4bit(w, "fp4", 64, double_quant=True), reps, on_gpu)
        t_bnb = median_ms(lambda: bnb_functional.quantize_4bit(w, blocksize=64, quant_type="fp4",
                                                               compress_statistics=True), reps, on_gpu)
        lines.append(f"| {out_features}x{in_features} | {differing} of {w.numel()} | {absmax_equal} | "
                     f"{t_ours:.3f} | {t_bnb:.3f} |")
    emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
