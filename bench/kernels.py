"""NF4 kernels on a GPU, as same-run ratios (issue 3's targets):

- dequantise (NF4 + double quant -> bf16): bandwidth as a share of the measured device copy bandwidth (>= 90 %);
- quantise (bf16 -> NF4 + double quant): speed-up over bitsandbytes (>= 7x);
- nf4_linear at M = 1 and M = 16: speed-up over bf16 F.linear (>= 3.3x, >= 3.0x);
- nf4_linear and nf4_linear_grad_input at M = 4096: time over bf16 F.linear / g @ W (<= 1.02x),
  with the dequantise + cuBLAS alternative timed beside the fused kernel (the large-M rule in
  qlora/kernels/matmul.py is to be confirmed or moved by this column).

    python bench/kernels.py [--reps 50] [--out bench/RESULTS.md]

Weights smaller than about twice the 50 MB L2 are rotated over several copies so that every call reads
HBM. CUDA events, warm-up, median of repetitions. Each shape is first checked for correctness on the
GPU (dequantise and quantise identical to the torch reference, matmuls within 1e-2). Prints a markdown
table with device, date, git commit and versions; exits 0 with a note where there is no CUDA device.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import arg_parser, cuda_median_ms, emit, header, no_cuda  # noqa: E402
from qlora.kernels import dequantize as D  # noqa: E402
from qlora.kernels import matmul as MM  # noqa: E402
from qlora.kernels import quantize as Q  # noqa: E402
from qlora.nf4 import quantize_nf4  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]  # [out, in]
ROTATE_BYTES = 128 << 20  # > 2x the H100's 50 MB L2
DTYPE = torch.bfloat16


def bitsandbytes():
    try:
        import bitsandbytes.functional as bnbf
        import bitsandbytes as bnb
        return bnb, bnbf
    except Exception as err:  # not installed, or no CUDA build
        print(f"note: bitsandbytes column skipped ({err})", file=sys.stderr)
        return None, None


def time_us(fn, n_args: int, reps: int) -> float:
    """Median microseconds per call of fn(i), i cycling over n_args rotated copies (each timing
    covers one pass over all of them; warm-up: every copy, and at least 3 calls)."""
    def one_pass():
        for i in range(n_args):
            fn(i)

    return cuda_median_ms(one_pass, reps, warmup=-(-3 // n_args)) * 1000 / n_args


def copies_for(nbytes: int) -> int:
    return max(4, -(-ROTATE_BYTES // nbytes)) if nbytes < ROTATE_BYTES else 1


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda i: dst.copy_(src), 1, reps)
    return 2 * src.numel() / (us * 1e-6)


def kernel_args(w):
    return (w.packed, w.absmax, w.quant_map, *w.shape, w.blocksize, w.nested_absmax, w.nested_code, w.offset)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check(w_bf16, q) -> str:
    """Correctness on this GPU against the torch reference (on the same device)."""
    args = kernel_args(q)
    N, K = q.shape
    ref_packed, ref_absmax = Q.quantize_nf4_blocks_reference(w_bf16, q.blocksize)
    ok_q = torch.equal(q.packed.view(-1), ref_packed)
    absmax = D.dequantize_absmax_reference(q.absmax, q.nested_absmax, q.nested_code, q.offset)
    ref_w = D.dequantize_nf4_reference(q.packed, absmax, q.quant_map, N * K, q.blocksize, DTYPE).view(N, K)
    ok_d = torch.equal(q.dequantize(DTYPE).view(torch.int16), ref_w.view(torch.int16))
    errs = []
    for M in (1, 16, 256):
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        errs.append(rel_err(MM.nf4_linear(x, *args), x.double() @ ref_w.double().T))
        g = torch.randn(M, N, device="cuda", dtype=DTYPE)
        errs.append(rel_err(MM.nf4_linear_grad_input(g, *args), g.double() @ ref_w.double()))
    ok_m = max(errs) <= 1e-2
    return "ok" if ok_q and ok_d and ok_m else f"FAIL quant={ok_q} dequant={ok_d} matmul_err={max(errs):.2e}"


def bench_shape(N: int, K: int, reps: int, bnb, bnbf, copy_bw: float) -> list[tuple]:
    rows = []
    w = torch.randn(N, K, device="cuda", dtype=DTYPE) * 0.02
    q = quantize_nf4(w)
    status = check(w, q)
    nf4_bytes = q.nbytes
    n_q = copies_for(nf4_bytes)
    n_w = copies_for(w.numel() * 2)
    qs = [q] + [quantize_nf4(w) for _ in range(n_q - 1)]
    args = [kernel_args(x) for x in qs]
    ws = [w] + [w.clone() for _ in range(n_w - 1)]
    bnb_states = [bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True) for _ in range(n_q)] if bnbf else None

    # Dequantise: bytes read (codes, scales) + written (bf16 weights).
    deq_bytes = nf4_bytes + N * K * 2
    ours = time_us(lambda i: D.dequantize_nf4(*args[i][:3], N * K, q.blocksize, DTYPE, *args[i][6:]), n_q, reps)
    bnb_us = (time_us(lambda i: bnbf.dequantize_4bit(*bnb_states[i]), n_q, reps) if bnbf else None)
    share = deq_bytes / (ours * 1e-6) / copy_bw
    rows.append((f"{N}x{K}", "dequantise (share of copy bandwidth)", f"{ours:.1f}",
                 f"{deq_bytes / 1e9:.3f} GB moved", f"{share:.2f}",
                 "" if bnb_us is None else f"{bnb_us:.1f} ({deq_bytes / (bnb_us * 1e-6) / copy_bw:.2f})",
                 ">= 0.90", status))

    # Quantise, with double quantisation (both sides).
    # The kernel-level entry points (what NF4Weight construction adds is a finiteness check with a sync).
    ours = time_us(lambda i: Q.quantize_absmax(Q.quantize_nf4_blocks(ws[i % n_w], 64)[1]), n_w, reps)
    if bnbf:
        bnb_us = time_us(lambda i: bnbf.quantize_4bit(ws[i % n_w], quant_type="nf4", compress_statistics=True), n_w, reps)
        rows.append((f"{N}x{K}", "quantise (speed-up over bnb)", f"{ours:.1f}", f"{bnb_us:.1f} (bnb)",
                     f"{bnb_us / ours:.2f}", f"{bnb_us:.1f}", ">= 7", status))
    else:
        rows.append((f"{N}x{K}", "quantise", f"{ours:.1f}", "-", "-", "", ">= 7x bnb", status))

    # Small M: speed-up over bf16 F.linear.
    for M, target in ((1, ">= 3.3"), (16, ">= 3.0")):
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        ours = time_us(lambda i: MM.nf4_linear(x, *args[i]), n_q, reps)
        base = time_us(lambda i: F.linear(x, ws[i % n_w]), n_w, reps)
        bnb_us = (time_us(lambda i: bnb.matmul_4bit(x, bnb_states[i][0].t(), bnb_states[i][1]), n_q, reps)
                  if bnb else None)
        rows.append((f"{N}x{K}", f"M={M} forward (speed-up over bf16)", f"{ours:.1f}", f"{base:.1f} (bf16)",
                     f"{base / ours:.2f}", "" if bnb_us is None else f"{bnb_us:.1f}", target, status))

    # Large M: time over bf16, fused against dequantise + cuBLAS.
    M = 4096
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)
    g = torch.randn(M, N, device="cuda", dtype=DTYPE)
    base = time_us(lambda i: F.linear(x, ws[i % n_w]), n_w, reps)
    ours = time_us(lambda i: MM.nf4_linear(x, *args[i]), n_q, reps)
    unfused = time_us(lambda i: MM.nf4_linear_dequant_matmul(x, *args[i]), n_q, reps)
    bnb_us = (time_us(lambda i: bnb.matmul_4bit(x, bnb_states[i][0].t(), bnb_states[i][1]), n_q, reps)
              if bnb else None)
    rows.append((f"{N}x{K}", "M=4096 forward (time over bf16)", f"{ours:.1f}", f"{base:.1f} (bf16)",
                 f"{ours / base:.3f}", "" if bnb_us is None else f"{bnb_us:.1f}",
                 f"<= 1.02; dequant+cuBLAS {unfused / base:.3f}", status))
    base = time_us(lambda i: g @ ws[i % n_w], n_w, reps)
    ours = time_us(lambda i: MM.nf4_linear_grad_input(g, *args[i]), n_q, reps)
    unfused = time_us(lambda i: MM.nf4_linear_dequant_matmul(g, *args[i], transpose=True), n_q, reps)
    rows.append((f"{N}x{K}", "M=4096 input gradient (time over bf16)", f"{ours:.1f}", f"{base:.1f} (bf16)",
                 f"{ours / base:.3f}", "", f"<= 1.02; dequant+cuBLAS {unfused / base:.3f}", status))
    return rows


def main(argv=None) -> int:
    parser = arg_parser(__doc__, reps=50)
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    args = parser.parse_args(argv)
    if no_cuda("bench/kernels.py: no CUDA device here; nothing measured (the kernels run under the "
               "Triton interpreter in the tests instead)."):
        return 0
    torch.manual_seed(0)
    bnb, bnbf = bitsandbytes()
    copy_bw = copy_bandwidth(args.reps)
    lines = header(f"## NF4 kernels: {torch.cuda.get_device_name()}",
                   bitsandbytes=getattr(bnb, "__version__", "not installed"))
    lines += [f"device copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s", "",
              "| shape [out, in] | measurement | qlora us | baseline | ratio | bnb us | target | check |",
              "|---|---|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        N, K = (int(s) for s in shape.split("x"))
        for r in bench_shape(N, K, args.reps, bnb, bnbf, copy_bw):
            lines.append("| " + " | ".join(r) + " |")
        torch.cuda.empty_cache()
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
