"""Host time per decoded token: eager with the growing cache, eager with the static cache, and compiled.

    python bench/decode.py [--tokens 64] [--reps 3] [--weights plain|nf4] [--compile-backend inductor] [--out FILE]

The embedded tiny Llama, greedy, a 16-token prompt; --weights nf4 quantises it on load as `qlora
generate` does (the default on CUDA), plain keeps its bf16 nn.Linear layers (the default on the CPU,
where qlora's NF4 reference dequantises each weight at every call, tens of ms per layer on this
machine, which would hide the per-token host costs this measures). For each mode: wall and CPU (this process) milliseconds per decoded token, the median of
--reps generations, after one untimed generation (which, compiled, pays the compile). On the CPU
the wall time is the compute itself and the compiled mode has no CUDA graph (reduce-overhead only
captures CUDA), so it shows what torch.compile's own dispatch costs; on CUDA the compiled mode is
torch.compile(mode="reduce-overhead", fullgraph=True): one CUDA graph replayed per token, and the
CPU column is what the host spends per token while the GPU works.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import arg_parser, emit, header  # noqa: E402
from qlora.decoding import generate_ids  # noqa: E402
from qlora.generate import load  # noqa: E402
from qlora.llama import from_pretrained  # noqa: E402

PROMPT = list(range(40, 56))


def per_token_ms(model, tokens: int, **options) -> tuple[float, float]:
    """(wall, CPU) milliseconds per token after the first, for one greedy generation."""
    stream = generate_ids(model, PROMPT, tokens, **options)
    next(stream)  # the prefill: not a decode step
    wall, cpu = time.perf_counter(), time.process_time()
    count = sum(1 for _ in stream)
    return (time.perf_counter() - wall) * 1e3 / count, (time.process_time() - cpu) * 1e3 / count


def modes(device: torch.device, backend: str) -> dict[str, dict]:
    compiled = {"backend": backend} if backend != "inductor" else True
    found = {"eager, dynamic cache": {}, "eager, static cache": {"cache_implementation": "static"}}
    label = "reduce-overhead (CUDA graph)" if device.type == "cuda" and backend == "inductor" else f"compiled ({backend})"
    found[label] = {"compile": compiled}
    return found


def main(argv=None) -> int:
    parser = arg_parser(__doc__, reps=3)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation (default 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a tiny model gains nothing from more, and on a "
                             "shared machine their spin-waits dominate)")
    parser.add_argument("--weights", choices=("plain", "nf4"), help="default: nf4 on CUDA, plain on the CPU")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled mode (inductor: mode='reduce-overhead')")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = args.weights or ("nf4" if args.device.startswith("cuda") else "plain")
    if weights == "nf4":
        model, _, _ = load(None, device=args.device, compute_dtype="bfloat16")
    else:
        from qlora.finetune import DEFAULT_MODEL

        model = from_pretrained(DEFAULT_MODEL, torch.bfloat16, args.device).eval()
    device = model.get_input_embeddings().weight.device
    rows = []
    for label, options in modes(device, args.compile_backend).items():
        per_token_ms(model, args.tokens, **options)  # warm-up (and the compile)
        runs = [per_token_ms(model, args.tokens, **options) for _ in range(args.reps)]
        rows.append((label, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
    load_average = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = header(f"### Decode: host time per token ({device.type}, embedded tiny Llama, {weights} weights, bf16, "
                   f"{args.tokens} tokens)", threads=str(args.threads), load=load_average)
    lines += ["| mode | wall ms/token | CPU ms/token |", "|---|---|---|"]
    lines += [f"| {label} | {wall:.3f} | {cpu:.3f} |" for label, wall, cpu in rows]
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
