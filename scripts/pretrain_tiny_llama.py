"""Pretrain the embedded tiny Llama briefly on Python's own standard-library sources.

    python scripts/pretrain_tiny_llama.py [OUT_DIR] [--steps 700] [--threads 1]

Every Python installation ships these files, so anyone can rebuild the checkpoint without a download.
A random-init model is not worth fine-tuning: its held-out loss on any text is ~log(259) and LoRA on top
of random features learns little. After a few minutes here the model knows bytes, words and code
structure, so `qlora finetune` on its (English prose) default text shows a real held-out loss drop.

Deterministic for a given Python version and torch build: fixed file list, fixed seed, fixed step count
(no wall-clock budget). Trains in float32 on the CPU and writes bf16 through make_tiny_llama().
About 6-7 minutes with one thread on a 2-core machine.
"""
from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from make_tiny_llama import CONFIG, DEFAULT_OUT_DIR, make_tiny_llama, random_init  # noqa: E402

from qlora.llama import LlamaConfig, build_model  # noqa: E402

# Present in every CPython from 3.10 to 3.13 (zipfile became a package in 3.12: either form is taken).
TRAIN_FILES = [
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py",
    "fractions.py", "functools.py", "gettext.py", "heapq.py", "inspect.py", "ipaddress.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "logging/__init__.py", "operator.py", "optparse.py", "pprint.py",
    "queue.py", "random.py", "shlex.py", "shutil.py", "statistics.py", "string.py", "tempfile.py",
    "threading.py", "tokenize.py", "traceback.py", "typing.py", "weakref.py",
]
HELD_OUT_FILES = ["textwrap.py", "fnmatch.py"]


def read_stdlib(names: list[str]) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: standard-library file not found")
        chunks.append(path.read_bytes())
    return b"\n\n".join(chunks)


def random_windows(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq, (batch,), generator=generator)
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, seq: int) -> float:
    model.eval()
    n = (len(data) - 1) // seq
    windows = data[: n * seq].view(n, seq)
    losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    model.train()
    return sum(losses) / len(losses)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine to 10% of peak


def pretrain(steps: int = 700, batch: int = 8, seq: int = 256, lr: float = 2e-3, seed: int = 0,
             threads: int = 1, log_every: int = 50) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train = torch.frombuffer(bytearray(read_stdlib(TRAIN_FILES)), dtype=torch.uint8).long()
    held_out = torch.frombuffer(bytearray(read_stdlib(HELD_OUT_FILES)), dtype=torch.uint8).long()
    print(f"train text: {len(train):,} bytes from {len(TRAIN_FILES)} stdlib files; "
          f"held out: {len(held_out):,} bytes ({', '.join(HELD_OUT_FILES)})")

    model = build_model(LlamaConfig.from_dict(CONFIG), device="cpu", dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in random_init(seed).items()})
    model.train()
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    print(f"held-out loss at init: {held_out_loss(model, held_out, seq):.3f}")
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=50)
        ids = random_windows(train, batch, seq, generator)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{steps}  loss {loss.item():.3f}  "
                  f"{(step + 1) * batch * seq / elapsed:,.0f} tokens/s  {elapsed:.0f}s", flush=True)
    print(f"held-out loss after {steps} steps: {held_out_loss(model, held_out, seq):.3f}")
    return {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    state_dict = pretrain(steps=args.steps, seed=args.seed, threads=args.threads)
    print(f"wrote {make_tiny_llama(args.out_dir, state_dict=state_dict)}")


if __name__ == "__main__":
    main()
