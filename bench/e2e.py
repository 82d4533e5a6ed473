"""End-to-end QLoRA training step: qlora against transformers + PEFT + bitsandbytes, on one GPU.

    python bench/e2e.py [--out bench/e2e.md] [--steps 5] [--skip-hf] [--skip-65b] [--hf-65b]

bench/gpu_all.py runs the same children (child_command, read_result); with --device cpu it runs them on
tiny shapes as a smoke test.

The same recipe on both sides: a Llama-2-7B-shaped model with random weights, seq 2048, batch 1,
gradient checkpointing (use_reentrant=False), LoRA r=64 / alpha 16 / dropout 0.05 on every linear but
lm_head, paged AdamW 32-bit (lr 2e-4), gradient clipping at 0.3. Each stack runs in its own process, so
one's cached memory never counts against the other. Memory is the device memory in use after the timed
steps (torch.cuda.mem_get_info: total - free), which sees bitsandbytes' managed-memory optimizer states;
the allocator's peak is reported beside it. Goals (issue 6): qlora >= 1.3x the tokens/s and <= 0.8x the
device memory of the HF stack; the 65B-shaped headline step within 44 GB of device memory in use (its
optimizer states paged out: PAGED_BUDGET).

Without CUDA it prints why and exits 0 (nothing to measure).
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import git_commit  # noqa: E402

SEQ, BATCH, R, ALPHA, DROPOUT, LR, MAX_GRAD_NORM = 2048, 1, 64, 16, 0.05, 2e-4, 0.3
GOAL_SPEEDUP, GOAL_MEMORY_RATIO, GOAL_65B_BYTES = 1.3, 0.8, 44e9
# The 65B headline pages its optimizer states out (PagedAdamW32bit's smallest budget: two 16 MiB streaming
# slots): with them resident it needs about 48 GB (bench-memory), paged about 41.7 GB, within 44 GB.
# The 7B runs keep "auto" (everything resident when it fits), as bitsandbytes' paged optimizer does.
PAGED_BUDGET = 2 * (16 << 20)


def qlora_budget(preset: str) -> int | str:
    return PAGED_BUDGET if preset == "llama-65b" else "auto"
# REFERENCE section 7 (H100 80GB, transformers 5.17 + PEFT 0.21 + bitsandbytes 0.50.2).
REFERENCE_HF = {"llama-7b": (2771, 10.7e9), "llama-65b": (526, 56.1e9)}


def _config(preset: str):
    """A preset's shape, or a config.json's (the smoke test's tiny model)."""
    from qlora.llama import load_config
    from qlora.memory import preset_config

    return load_config(preset) if preset.endswith(".json") else preset_config(preset)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed_steps(step, n_warmup: int, n_steps: int, device: str = "cuda") -> float:
    for _ in range(n_warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    _synchronize(device)
    return time.perf_counter() - start


def _memory(context_bytes: int | None) -> dict:
    if context_bytes is None:  # the CPU: no device memory to read
        return {"device_in_use_bytes": None, "context_bytes": None, "peak_allocated_bytes": None,
                "peak_reserved_bytes": None}
    free, total = torch.cuda.mem_get_info()
    return {"device_in_use_bytes": total - free, "context_bytes": context_bytes,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def _context_bytes(device: str) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    return total - free


def run_qlora(preset: str, steps: int, bf16_adapters: bool, device: str = "cuda", seq: int = SEQ,
              warmup: int = 2, gpu_budget: int | str = "auto") -> dict:
    from qlora.memory import Shape, build_random_model
    from qlora.optim import PagedAdamW32bit

    context = _context_bytes(device)
    config = _config(preset)
    shape = Shape(seq=seq, batch=BATCH, grad_ckpt=True, r=R, dropout=DROPOUT, device=torch.device(device).type,
                  adapter_bytes=2 if bf16_adapters else 4)
    start = time.perf_counter()
    model = build_random_model(config, "qlora", shape, torch.device(device))  # quantised layer by layer
    build_seconds = time.perf_counter() - start
    model.train()
    optimizer = PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                                max_grad_norm=MAX_GRAD_NORM, gpu_budget=gpu_budget)
    ids = torch.randint(0, config.vocab_size, (BATCH, seq), device=device)
    losses = []

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    seconds = _timed_steps(step, warmup, steps, device)
    return {"stack": "qlora", "preset": preset, "tokens_per_second": steps * BATCH * seq / seconds,
            "step_seconds": seconds / steps, "build_seconds": build_seconds,
            "final_loss": float(losses[-1]), "bf16_adapters": bf16_adapters, "gpu_budget": gpu_budget,
            **_memory(context)}


def _hf_model(config, device: str = "cuda", quant_dtype=torch.bfloat16):
    """transformers' LlamaForCausalLM with bitsandbytes Linear4bit (NF4, double quant, bf16 compute) built
    layer by layer from random weights, as from_pretrained(quantization_config=...) would leave it."""
    import bitsandbytes as bnb
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_dict().items() if k != "rope_scaling"})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = torch.empty(module.out_features, module.in_features, dtype=quant_dtype, device=device)
            w.normal_(0, 0.02, generator=generator)
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                             blocksize=64).to(device)
            del w
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            value = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
            value = value.fill_(1.0) if "norm" in name else value.normal_(0, 0.02, generator=generator)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.nn.Parameter(value, requires_grad=False))
    # Built on the device afterwards: transformers 5's rotary embedding takes no device argument.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config).to(device)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; prepare_model_for_kbit_training reads it
    return model


def run_hf(preset: str, steps: int, device: str = "cuda", seq: int = SEQ, warmup: int = 2) -> dict:
    import bitsandbytes as bnb
    import peft

    context = _context_bytes(device)
    config = _config(preset)
    start = time.perf_counter()
    model = _hf_model(config, device)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    # prepare_model_for_kbit_training alone left checkpointing off here (REFERENCE section 7).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    build_seconds = time.perf_counter() - start
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=0.0)
    ids = torch.randint(0, config.vocab_size, (BATCH, seq), device=device)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    seconds = _timed_steps(step, warmup, steps, device)
    return {"stack": "transformers+peft+bitsandbytes", "preset": preset,
            "tokens_per_second": steps * BATCH * seq / seconds, "step_seconds": seconds / steps,
            "build_seconds": build_seconds, "final_loss": float(losses[-1]), **_memory(context)}


def child_command(stack: str, preset: str, steps: int, bf16_adapters: bool = False,
                  gpu_budget: int | str = "auto") -> list[str]:
    """The command line of one stack's run in its own process (it prints one RESULT line)."""
    cmd = [sys.executable, __file__, "--child", stack, "--preset", preset, "--steps", str(steps),
           "--gpu-budget", str(gpu_budget)]
    return cmd + (["--bf16-adapters"] if bf16_adapters else [])


def read_result(stack: str, preset: str, returncode: int, stdout: str, stderr: str) -> dict:
    """A child's RESULT, or {"error": its last lines}."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        return {"stack": stack, "preset": preset, "error": " | ".join(tail) or f"exit {returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def _in_subprocess(stack: str, preset: str, steps: int, bf16_adapters: bool = False, timeout: int = 3600) -> dict:
    proc = subprocess.run(child_command(stack, preset, steps, bf16_adapters, qlora_budget(preset)),
                          capture_output=True, text=True, timeout=timeout)
    return read_result(stack, preset, proc.returncode, proc.stdout, proc.stderr)


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for name in ("triton", "transformers", "peft", "bitsandbytes"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def markdown(results: list[dict], predictions: dict) -> str:
    device = torch.cuda.get_device_name()
    lines = [f"## End-to-end QLoRA step ({datetime.date.today().isoformat()}, commit {git_commit()})", "",
             f"{device}; {_versions()}.",
             f"seq {SEQ}, batch {BATCH}, gradient checkpointing, LoRA r={R} alpha={ALPHA} dropout={DROPOUT} on every "
             f"linear but lm_head, paged AdamW 32-bit, clip {MAX_GRAD_NORM}; random weights.", "",
             "| model | stack | tokens/s | device memory in use | peak allocated | predicted (bench-memory) | loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['stack']} | failed: {r['error']} | | | | |")
            continue
        label = r["stack"] + (" (bf16 adapters)" if r.get("bf16_adapters") else "")
        pred = predictions.get((r["preset"], r["stack"], r.get("bf16_adapters", False)))
        lines.append(f"| {r['preset']} | {label} | {r['tokens_per_second']:.0f} | {_gb(r['device_in_use_bytes'])} | "
                     f"{_gb(r['peak_allocated_bytes'])} | {_gb(pred)} | {r['final_loss']:.3f} |")
    by = {(r["preset"], r["stack"]): r for r in results if "error" not in r}
    ours, theirs = by.get(("llama-7b", "qlora")), by.get(("llama-7b", "transformers+peft+bitsandbytes"))
    lines.append("")
    if ours and theirs:
        speedup = ours["tokens_per_second"] / theirs["tokens_per_second"]
        ratio = ours["device_in_use_bytes"] / theirs["device_in_use_bytes"]
        lines.append(f"7B: {speedup:.2f}x the tokens/s (goal >= {GOAL_SPEEDUP}x: {'met' if speedup >= GOAL_SPEEDUP else 'MISSED'}), "
                     f"{ratio:.2f}x the device memory (goal <= {GOAL_MEMORY_RATIO}x: "
                     f"{'met' if ratio <= GOAL_MEMORY_RATIO else 'MISSED'}).")
    heads = [r for r in results if r["preset"] == "llama-65b" and r["stack"] == "qlora" and "error" not in r]
    for r in heads:
        ok = r["device_in_use_bytes"] <= GOAL_65B_BYTES
        lines.append(f"65B headline{' (bf16 adapters)' if r.get('bf16_adapters') else ''}: "
                     f"{_gb(r['device_in_use_bytes'])} in use (goal <= 44 GB: {'met' if ok else 'MISSED'}), "
                     f"{r['tokens_per_second']:.0f} tokens/s.")
    lines.append("Reference, transformers + PEFT + bitsandbytes on an H100 (REFERENCE section 7): 7B 2771 tokens/s, "
                 "10.7 GB in use; 65B 526 tokens/s, 56.1 GB.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "e2e.md"), help="markdown file to write")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after 2 warm-up steps)")
    parser.add_argument("--skip-hf", action="store_true", help="only qlora")
    parser.add_argument("--skip-65b", action="store_true", help="no 65B headline run")
    parser.add_argument("--hf-65b", action="store_true", help="also run the HF stack on the 65B shape (slow)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="llama-7b", help=argparse.SUPPRESS)
    parser.add_argument("--bf16-adapters", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-budget", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/e2e.py: no CUDA device; nothing to measure (this benchmark needs an NVIDIA GPU)")
        return 0
    if args.child:
        budget = args.gpu_budget if args.gpu_budget == "auto" else int(args.gpu_budget)
        result = run_qlora(args.preset, args.steps, args.bf16_adapters, gpu_budget=budget) \
            if args.child == "qlora" else run_hf(args.preset, args.steps)
        print("RESULT " + json.dumps(result))
        return 0

    from qlora.memory_placement import Placement, place
    from qlora.memory_predict import Shape

    runs = [("qlora", "llama-7b", False)]
    if not args.skip_hf:
        try:
            import bitsandbytes, peft, transformers  # noqa: F401, E401
            runs.append(("hf", "llama-7b", False))
        except ImportError as err:
            print(f"HF stack skipped: {err}")
    if not args.skip_65b:
        runs += [("qlora", "llama-65b", False), ("qlora", "llama-65b", True)]
        if args.hf_65b and any(s == "hf" for s, _, _ in runs):
            runs.append(("hf", "llama-65b", False))
    results, predictions = [], {}
    for stack, preset, bf16_adapters in runs:
        print(f"running {stack} {preset}{' bf16 adapters' if bf16_adapters else ''} ...", flush=True)
        result = _in_subprocess(stack, preset, args.steps, bf16_adapters)
        print(json.dumps(result), flush=True)
        results.append(result)
        if stack == "qlora":
            shape = Shape(seq=SEQ, batch=BATCH, grad_ckpt=True, r=R, dropout=DROPOUT, device="cuda",
                          adapter_bytes=2 if bf16_adapters else 4)
            budget = qlora_budget(preset)
            placement = Placement(gpu_budget=budget, gpu_memory=torch.cuda.get_device_properties(0).total_memory)
            mode = "qlora" if budget == "auto" else "qlora-paged"
            predictions[(preset, "qlora", bf16_adapters)] = place(_config(preset), mode, shape,
                                                                  placement)["predicted_total_bytes"]
    text = markdown(results, predictions)
    Path(args.out).write_text(text)
    print(text)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
