"""`qlora finetune`: QLoRA fine-tuning of a Llama-family model, end to end through the engine.

load 4-bit (a plain checkpoint is quantised on load) -> prepare_model (LoRA on every linear but lm_head)
-> gradient checkpointing -> PagedAdamW32bit with the QLoRA paper's defaults (r 64, alpha 16, dropout 0.05,
lr 2e-4, max_grad_norm 0.3, constant schedule) -> a PEFT-format adapter and a report.

With no arguments it fine-tunes the embedded tiny Llama (pretrained on Python's standard library) on an
embedded English text, whose last fifth is held out: the report shows the held-out loss before and after.

The output directory always holds a complete, loadable adapter: checkpoints are written beside it and
moved in by rename, with Ctrl-C held back for those few milliseconds. `--resume` continues from it
(adapter, optimizer state, step).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora.checkpoint import replacing
from qlora.safe_output import (
    check_output_apart, make_partial_dir, remove_stale_partials, removes_partials_on_error, replace_dir,
    signals_held_back,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = DATA_DIR / "tiny-llama"
DEFAULT_DATA = DATA_DIR / "finetune.txt"
DEFAULT_OUT = Path("qlora-out") / "finetune"
HELD_OUT_FRACTION = 0.2
TRAINER_STATE = "trainer_state.safetensors"
REPORT = "report.json"


def _user_error(message: str) -> Exception:
    from qlora.errors import UserError

    return UserError(message)


@dataclass
class Settings:
    """Everything that shapes a run; saved with each checkpoint so --resume can check it matches."""

    model: str
    data: str
    steps: int
    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    lr: float = 2e-4
    max_grad_norm: float | None = 0.3
    weight_decay: float = 0.0
    seq: int = 256
    batch: int = 4
    seed: int = 0
    target_modules: str = "all-linear"
    compute_dtype: str = "bfloat16"
    grad_ckpt: bool = True


# ---- data ----------------------------------------------------------------------------------------

def read_documents(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file one document per line's "text" field."""
    if not path.is_file():
        raise _user_error(f"{path}: data file not found")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise _user_error(f"{path}: data file is empty")
    if path.suffix != ".jsonl":
        return [raw]
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise _user_error(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise _user_error(f"{path}:{lineno}: expected an object with a string \"text\" field")
        if record["text"].strip():
            docs.append(record["text"])
    if not docs:
        raise _user_error(f"{path}: no non-empty \"text\" field in any line")
    return docs


def split_held_out(docs: list[str]) -> tuple[list[str], list[str]]:
    """Hold out the last fifth: whole documents when there are several, else the trailing paragraphs
    of the single text (cut at a blank line, or a newline, near the 80% mark)."""
    if len(docs) >= 5:
        cut = len(docs) - max(1, round(len(docs) * HELD_OUT_FRACTION))
        return docs[:cut], docs[cut:]
    text = "\n\n".join(docs)
    mark = int(len(text) * (1 - HELD_OUT_FRACTION))
    cut = text.rfind("\n\n", 0, mark)
    if cut < len(text) // 2:
        cut = text.rfind("\n", 0, mark)
    if cut < len(text) // 2:
        cut = mark
    return [text[:cut]], [text[cut:].lstrip("\n")]


def tokenize(docs: list[str], tokenizer) -> torch.Tensor:
    """Documents as one token stream, each starting with bos and ending with eos (packed training)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(encode(tokenizer, doc))
    return torch.tensor(ids, dtype=torch.long)


def encode(tokenizer, text: str) -> list[int]:
    from qlora.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text, bos=True, eos=True)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def load_tokenizer(model_dir: Path, vocab_size: int):
    """The byte tokenizer for models that declare it (the embedded one); else transformers' tokenizer."""
    from qlora.tokenizer import VOCAB_SIZE, ByteTokenizer

    config_file = model_dir / "tokenizer_config.json"
    try:
        declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    except (ValueError, AttributeError, RecursionError):
        raise _user_error(f"{config_file}: not a JSON object") from None
    if declared in ("qlora.tokenizer.ByteTokenizer", "qlora.ByteTokenizer", "ByteTokenizer"):
        if vocab_size < VOCAB_SIZE:
            raise _user_error(f"{model_dir}: byte tokenizer needs vocab_size >= {VOCAB_SIZE}, config has {vocab_size}")
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise _user_error(f"{model_dir}: its tokenizer needs transformers (pip install 'qlora[hf]')") from None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)  # never run its code
    except Exception as err:  # transformers raises many kinds; the user needs the one line
        raise _user_error(f"{model_dir}: could not load its tokenizer ({type(err).__name__}: {err})") from None


def batch_at(tokens: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Random windows for a step, a pure function of (seed, step): a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq + 1, (batch,), generator=generator)
    return torch.stack([tokens[s:s + seq] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model, tokens: torch.Tensor, seq: int, device) -> float:
    """Token-weighted mean next-token loss over consecutive windows of the held-out stream."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq):
        window = tokens[start:start + seq + 1][None].to(device)  # +1: the window's last target
        if window.shape[1] < 2:
            break
        logits = model(window[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum")
        total += loss.item()
        count += window.shape[1] - 1
    model.train(was_training)
    return total / count


# ---- model ---------------------------------------------------------------------------------------

def is_quantised(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if not quant:
        return False
    if quant.get("quant_method") != "bitsandbytes" or not quant.get("load_in_4bit", False) \
            or quant.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
        raise _user_error(f"{model_dir}: quantization_config is not bitsandbytes NF4 or FP4 4-bit "
                          f"(quant_method={quant.get('quant_method')!r}, "
                          f"bnb_4bit_quant_type={quant.get('bnb_4bit_quant_type')!r})")
    return True


def load_model(model_dir: Path, device: torch.device, compute_dtype: torch.dtype, work_dir: Path):
    """Our Llama on the meta device, filled 4-bit from the checkpoint: a plain checkpoint is first
    quantised (streaming, one tensor at a time) into work_dir, so no full-precision copy of the model
    is ever built."""
    from qlora.llama import ConfigError, build_model, load_config
    from qlora.model import load_quantized

    try:
        config = load_config(model_dir)
    except ConfigError as err:
        raise _user_error(str(err)) from None
    quantised_dir = model_dir
    if not is_quantised(model_dir):
        from qlora.convert import quantize_checkpoint

        quantised_dir = work_dir / "nf4"
        quantize_checkpoint(model_dir, quantised_dir, compute_dtype=str(compute_dtype).removeprefix("torch."),
                            device=device.type, force=True, progress=False)
    model = build_model(config, device="meta")
    load_quantized(model, quantised_dir, device=device, compute_dtype=compute_dtype)
    return model


# ---- checkpoints ---------------------------------------------------------------------------------

def save_trainer_state(file: Path, step: int, optimizer_state: dict, settings: dict) -> None:
    """The optimizer's tensors in safetensors, everything else as JSON metadata: no pickle to load."""
    from safetensors.torch import save_file

    tensors, scalars = {}, {}
    for index, entry in optimizer_state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars[f"state.{index}.{name}"] = value
    meta = {"step": step, "settings": settings, "param_groups": optimizer_state["param_groups"], "scalars": scalars}
    save_file(tensors, str(file), metadata={"trainer_state": json.dumps(meta)})


def load_trainer_state(file: Path) -> dict:
    """Inverse of save_trainer_state: {"step", "settings", "optimizer": an optimizer state dict}."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as reader:
            meta = json.loads((reader.metadata() or {})["trainer_state"])
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except (KeyError, ValueError, OSError, SafetensorError, RecursionError) as err:
        raise _user_error(f"{file}: not a qlora trainer state ({type(err).__name__}: {err})") from None
    try:
        state: dict[int, dict] = {}
        for key, value in [*tensors.items(), *meta["scalars"].items()]:
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group
                  for group in meta["param_groups"]]
        step, settings = int(meta["step"]), dict(meta["settings"])
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise _user_error(f"{file}: corrupt qlora trainer state ({type(err).__name__}: {err})") from None
    return {"step": step, "settings": settings, "optimizer": {"state": state, "param_groups": groups}}


def save_checkpoint(out: Path, model, optimizer, step: int, settings: Settings) -> None:
    from qlora.model import save_adapter

    staging = out / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter(model, staging, base_model_name_or_path=settings.model)
    save_trainer_state(staging / TRAINER_STATE, step, optimizer.state_dict(), asdict(settings))
    with signals_held_back():
        # The trainer state goes last: whatever step it names, the adapter beside it is at least as new
        # only in a crash between two renames, never on Ctrl-C.
        for name in sorted(os.listdir(staging), key=lambda n: n == TRAINER_STATE):
            os.replace(staging / name, out / name)
        staging.rmdir()


def load_checkpoint(out: Path, settings: Settings) -> dict:
    file = out / TRAINER_STATE
    if not file.is_file():
        raise _user_error(f"{out}: nothing to resume (no {TRAINER_STATE}); run without --resume first")
    state = load_trainer_state(file)
    saved = state["settings"]
    for key in ("r", "alpha", "target_modules", "compute_dtype"):
        if saved.get(key) != getattr(settings, key):
            raise _user_error(f"{out}: was trained with {key}={saved.get(key)!r}, not {getattr(settings, key)!r}")
    if Path(saved["model"]).resolve() != Path(settings.model).resolve():
        raise _user_error(f"{out}: was trained on {saved['model']}, not {settings.model}")
    return state


def _check_numbers(**values) -> None:
    """Finite values in range: a NaN alpha would train to NaN and report it as a result."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise _user_error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= values["dropout"] < 1:
        raise _user_error(f"--dropout must be in [0, 1), got {values['dropout']}")
    for name in ("max_grad_norm", "weight_decay"):
        if values[name] is not None and values[name] < 0:
            raise _user_error(f"--{name.replace('_', '-')} must not be negative, got {values[name]}")


# ---- memory --------------------------------------------------------------------------------------

def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): the allocator's peak on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    try:
        import resource  # Unix only; imported here so qlora itself imports on Windows
    except ImportError:
        return 0, "not measured (no resource module on this platform)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "process peak RSS"  # bytes on macOS, KiB on Linux


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


# ---- the run -------------------------------------------------------------------------------------

@removes_partials_on_error
def finetune(
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    steps: int = 100,
    r: int = 64,
    alpha: float = 16,
    dropout: float = 0.05,
    lr: float = 2e-4,
    max_grad_norm: float | None = 0.3,
    weight_decay: float = 0.0,
    seq: int | None = None,
    batch: int = 4,
    device: str | None = None,
    resume: bool = False,
    force: bool = False,
    save_every: int = 20,
    seed: int = 0,
    grad_ckpt: bool = True,
    compute_dtype: str = "bfloat16",
    gpu_budget: int | str = "auto",
    progress: bool = True,
    step_callback=None,
) -> dict:
    """Fine-tune and return the report (also written to OUT/report.json). Raises qlora.errors.UserError on
    bad input. step_callback(step, loss), if given, runs after every optimizer step."""
    from tqdm.auto import tqdm

    from qlora.llama import load_config
    from qlora.model import count_parameters, load_adapter, prepare_model
    from qlora.optim import PagedAdamW32bit

    model_dir = Path(model) if model is not None else DEFAULT_MODEL
    data_path = Path(data) if data is not None else DEFAULT_DATA
    out = Path(out) if out is not None else DEFAULT_OUT
    if steps < 1 or batch < 1 or save_every < 1:
        raise _user_error("--steps, --batch and --save-every must be at least 1")
    if r < 1:
        raise _user_error(f"--r must be at least 1, got {r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise _user_error(f"--lr must be a positive number, got {lr}")
    _check_numbers(alpha=alpha, dropout=dropout, max_grad_norm=max_grad_norm, weight_decay=weight_decay)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(compute_dtype)
    if dtype is None:
        raise _user_error(f"--compute-dtype {compute_dtype!r}: use bfloat16, float16 or float32")
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise _user_error(f"--device {device!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise _user_error(f"--device {device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _user_error("--device cuda: no CUDA device is available")
    if not model_dir.is_dir():
        raise _user_error(f"{model_dir}: model directory not found")
    try:
        context = load_config(model_dir).max_position_embeddings
    except ValueError as err:
        raise _user_error(str(err)) from None
    seq = seq if seq is not None else min(256, context)
    if seq < 2:
        raise _user_error(f"--seq must be at least 2, got {seq}")
    if seq > context:
        raise _user_error(f"--seq {seq} is longer than the model's context ({context} tokens, "
                          f"max_position_embeddings in {model_dir / 'config.json'})")
    settings = Settings(model=str(model_dir), data=str(data_path), steps=steps, r=r, alpha=alpha, dropout=dropout,
                        lr=lr, max_grad_norm=max_grad_norm, weight_decay=weight_decay, seq=seq, batch=batch,
                        seed=seed, compute_dtype=compute_dtype, grad_ckpt=grad_ckpt)
    check_output_apart(out, {"model directory": model_dir, "data file": data_path})
    remove_stale_partials(out)
    resumed = load_checkpoint(out, settings) if resume else None
    final_out = out
    if not resume and out.exists() and any(out.iterdir()):
        if not force:
            raise _user_error(f"{out}: already exists; pass --resume to continue it or --force to start over")
        out = make_partial_dir(final_out)  # the old output is replaced only once this one is complete

    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir, config.vocab_size)
    train_docs, held_docs = split_held_out(read_documents(data_path))
    train_tokens, held_tokens = tokenize(train_docs, tokenizer), tokenize(held_docs, tokenizer)
    if len(train_tokens) < seq:
        raise _user_error(f"{data_path}: {len(train_tokens)} training tokens, fewer than --seq {seq}; "
                          "use a longer text or a smaller --seq")
    if len(held_tokens) < 2:
        raise _user_error(f"{data_path}: the held-out part (last {HELD_OUT_FRACTION:.0%}) is too short")
    largest = max(int(train_tokens.max()), int(held_tokens.max()))
    if largest >= config.vocab_size:
        raise _user_error(f"{data_path}: token id {largest} outside the model's vocabulary of {config.vocab_size}")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_load = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlora-finetune-") as work_dir:
        try:
            net = load_model(model_dir, device, dtype, Path(work_dir))
        except (ValueError, OSError) as err:  # CheckpointError and the loader's shape errors name the tensor
            raise _user_error(f"{model_dir}: {err}" if str(model_dir) not in str(err) else str(err)) from None
    torch.manual_seed(seed)  # the adapters' initialisation
    prepare_model(net, r=r, alpha=alpha, dropout=dropout, compute_dtype=dtype, gradient_checkpointing=grad_ckpt,
                  verbose=False)
    load_seconds = time.perf_counter() - start_load
    trainable, total = count_parameters(net)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = PagedAdamW32bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                                gpu_budget=gpu_budget, max_grad_norm=max_grad_norm)
    first_step = 0
    if resumed is not None:
        try:
            load_adapter(net, out)
            optimizer.load_state_dict(resumed["optimizer"])
        except Exception as err:  # safetensors, JSON and shape errors alike: the file is not this run's
            raise _user_error(f"{out}: cannot resume ({type(err).__name__}: {err})") from None
        first_step = int(resumed["step"])
        if first_step >= steps:
            raise _user_error(f"{out}: already trained {first_step} steps; pass a larger --steps to continue")
    out.mkdir(parents=True, exist_ok=True)

    print(f"qlora finetune: {model_dir.name} ({total / 1e6:.1f}M params, {trainable / 1e6:.2f}M trainable, "
          f"r={r}) on {data_path.name} ({len(train_tokens):,} train / {len(held_tokens):,} held-out tokens), "
          f"{device.type}, seq {seq} x batch {batch}" + (f", resuming at step {first_step}" if resumed else ""))
    loss_before = held_out_loss(net, held_tokens, seq, device)
    net.train()
    bar = tqdm(range(first_step, steps), total=steps, initial=first_step, disable=not progress,
               desc="finetune", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    trained_tokens, loss_value = 0, float("nan")
    for step in bar:
        torch.manual_seed(seed * 1_000_003 + step)  # dropout masks, too, are a function of the step
        ids = batch_at(train_tokens, step, batch, seq, seed).to(device)
        loss = net(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        trained_tokens += ids.numel()
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{trained_tokens / elapsed:,.0f}",
                        mem=_mib(peak_memory(device)[0]))
        if step_callback is not None:
            step_callback(step + 1, loss_value)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_checkpoint(out, net, optimizer, step + 1, settings)
    bar.close()
    train_seconds = time.perf_counter() - start
    loss_after = held_out_loss(net, held_tokens, seq, device)
    peak, peak_kind = peak_memory(device)
    report = {
        "model": str(model_dir), "data": str(data_path), "out": str(final_out), "device": str(device),
        "steps": steps, "first_step": first_step, "seq": seq, "batch": batch,
        "r": r, "alpha": alpha, "dropout": dropout, "lr": lr, "max_grad_norm": max_grad_norm,
        "trainable_params": trainable, "total_params": total,
        "train_tokens": trained_tokens, "held_out_tokens": len(held_tokens),
        "held_out_loss_before": round(loss_before, 4), "held_out_loss_after": round(loss_after, 4),
        "last_train_loss": round(loss_value, 4),
        "load_seconds": round(load_seconds, 2), "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(trained_tokens / max(train_seconds, 1e-9), 1),
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
    }
    with replacing(out / REPORT) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")
    if out != final_out:
        replace_dir(out, final_out, force=True)
        out = final_out
    print(f"held-out loss {loss_before:.3f} -> {loss_after:.3f} "
          f"({(loss_after - loss_before) / loss_before:+.1%}) after {steps} steps; "
          f"train {train_seconds:.1f}s at {report['tokens_per_second']:,.0f} tokens/s; "
          f"peak memory {_mib(peak)} ({peak_kind})")
    print(f"adapter: {out} (load with peft.PeftModel.from_pretrained or qlora.load_adapter)")
    return report


# ---- CLI -----------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--model", help="Hugging Face Llama-family directory, plain or 4-bit "
                                        "(default: the embedded tiny Llama)")
    parser.add_argument("--data", help="a .txt file, or a .jsonl with a \"text\" field per line "
                                       "(default: the embedded text); the last fifth is held out")
    parser.add_argument("--out", help=f"output directory for the adapter and report (default: {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--r", type=int, default=64, help="LoRA rank (default 64)")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default 16)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate, constant (default 2e-4)")
    parser.add_argument("--max-grad-norm", type=float, default=0.3, help="gradient clipping (default 0.3; 0: off)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seq", type=int, help="tokens per sequence (default min(256, model context))")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off")
    parser.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    finetune(model=args.model, data=args.data, out=args.out, steps=args.steps, r=args.r, alpha=args.alpha,
             dropout=args.dropout, lr=args.lr, max_grad_norm=args.max_grad_norm or None,
             weight_decay=args.weight_decay, seq=args.seq, batch=args.batch, device=args.device,
             resume=args.resume, force=args.force, save_every=args.save_every, seed=args.seed,
             grad_ckpt=not args.no_grad_ckpt, compute_dtype=args.compute_dtype, progress=not args.no_progress)
    return 0
