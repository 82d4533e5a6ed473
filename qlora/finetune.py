"""`qlora finetune`: QLoRA fine-tuning of a causal LM (qlora's own Llama, or transformers'), end to end.

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
from qlora.finetune_data import HELD_OUT_FRACTION, batch_at, held_out_loss, read_records, split_held_out, tokenize
from qlora.finetune_model import describe_model, device_and_dtype, load_model, load_tokenizer
from qlora.lora_options import check_lora_settings
from qlora.safe_output import (
    check_output_apart, make_partial_dir, remove_stale_partials, removes_partials_on_error, replace_dir,
    signals_held_back,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = DATA_DIR / "tiny-llama"
DEFAULT_DATA = DATA_DIR / "finetune.txt"
DEFAULT_OUT = Path("qlora-out") / "finetune"
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
    """Finite values in range: a NaN clip would train to NaN and report it as a result."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise _user_error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
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
    fsdp: bool = False,
    save_nf4: bool = False,
) -> dict:
    """Fine-tune and return the report (also written to OUT/report.json). Raises qlora.errors.UserError on
    bad input. step_callback(step, loss), if given, runs after every optimizer step.

    Under torchrun: data parallel over the ranks (DDP, or FSDP2 with fsdp=True), batch rows per rank;
    the loss passed to step_callback and reported is the mean over the ranks. See qlora.distributed.
    save_nf4: also write the 4-bit base model to OUT/nf4 (the same bytes whether sharded or not)."""
    arguments = {name: value for name, value in locals().items() if name != "fsdp"}
    from qlora.distributed import from_environment

    run = from_environment(fsdp, device)
    try:
        return _finetune(run, **arguments)
    finally:
        run.close()


def _finetune(run, *, model, data, out, steps, r, alpha, dropout, lr, max_grad_norm, weight_decay, seq, batch,
              device, resume, force, save_every, seed, grad_ckpt, compute_dtype, gpu_budget, progress,
              step_callback, save_nf4) -> dict:
    from tqdm.auto import tqdm

    from qlora.model import count_parameters, load_adapter, prepare_model
    from qlora.optim import PagedAdamW32bit

    model_dir = Path(model) if model is not None else DEFAULT_MODEL
    data_path = Path(data) if data is not None else DEFAULT_DATA
    out = Path(out) if out is not None else DEFAULT_OUT
    if steps < 1 or batch < 1 or save_every < 1:
        raise _user_error("--steps, --batch and --save-every must be at least 1")
    check_lora_settings(r, alpha, dropout, cli=True)
    if not (lr > 0 and math.isfinite(lr)):
        raise _user_error(f"--lr must be a positive number, got {lr}")
    _check_numbers(max_grad_norm=max_grad_norm, weight_decay=weight_decay)
    device, dtype = device_and_dtype(device, compute_dtype)
    device = run.device(str(device))
    info = describe_model(model_dir)
    context = info.context
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
    if run.is_main:
        remove_stale_partials(out)
    resumed = load_checkpoint(out, settings) if resume else None
    final_out = out
    if not resume and out.exists() and any(out.iterdir()):
        if not force:
            raise _user_error(f"{out}: already exists; pass --resume to continue it or --force to start over")
        run.barrier()  # every rank has checked before rank 0 starts the new output
        if run.is_main:  # the other ranks write nothing
            out = make_partial_dir(final_out)  # the old output is replaced only once this one is complete

    tokenizer = load_tokenizer(model_dir, info.vocab_size)
    train_docs, held_docs = split_held_out(read_records(data_path))
    where = f"{data_path} with the tokenizer of {model_dir}"
    train_tokens, held_tokens = tokenize(train_docs, tokenizer, seq, where), tokenize(held_docs, tokenizer, seq, where)
    if train_tokens.starts is not None and (len(train_tokens.starts) < 2 or len(held_tokens.starts) < 2):
        raise _user_error(f"{data_path}: no conversation in the training or held-out part has an assistant "
                          f"token within --seq {seq} tokens")
    if train_tokens.starts is None and len(train_tokens) < seq:
        raise _user_error(f"{data_path}: {len(train_tokens)} training tokens, fewer than --seq {seq}; "
                          "use a longer text or a smaller --seq")
    if len(held_tokens) < 2:
        raise _user_error(f"{data_path}: the held-out part (last {HELD_OUT_FRACTION:.0%}) is too short")
    largest = max(int(train_tokens.ids.max()), int(held_tokens.ids.max()))
    if largest >= info.vocab_size:
        raise _user_error(f"{data_path}: token id {largest} outside the model's vocabulary of {info.vocab_size}")
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_load = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlora-finetune-") as work_dir:
        try:
            # Under FSDP the model is read into host memory: fully_shard then moves one block at a time to
            # the GPU as it shards it, so no GPU ever holds the whole 4-bit model.
            net = load_model(model_dir, torch.device("cpu") if run.mode == "fsdp" else device, dtype, Path(work_dir))
        except (ValueError, OSError) as err:  # CheckpointError and the loader's shape errors name the tensor
            raise _user_error(f"{model_dir}: {err}" if str(model_dir) not in str(err) else str(err)) from None
    torch.manual_seed(seed)  # the adapters' initialisation
    prepare_model(net, r=r, alpha=alpha, dropout=dropout, compute_dtype=dtype, gradient_checkpointing=grad_ckpt,
                  verbose=False)
    load_seconds = time.perf_counter() - start_load
    trainable, total = count_parameters(net)
    first_step = 0
    try:
        if resumed is not None:
            load_adapter(net, out)
        net = run.wrap(net)  # DDP / FSDP2 under torchrun (after the adapter is loaded, before the optimizer)
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = PagedAdamW32bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                                    gpu_budget=gpu_budget, max_grad_norm=max_grad_norm)
        if resumed is not None:
            run.load_optimizer_state(optimizer, resumed["optimizer"])
    except Exception as err:  # safetensors, JSON and shape errors alike: the file is not this run's
        if resumed is None:
            raise
        raise _user_error(f"{out}: cannot resume ({type(err).__name__}: {err})") from None
    if resumed is not None:
        first_step = int(resumed["step"])
        if first_step >= steps:
            raise _user_error(f"{out}: already trained {first_step} steps; pass a larger --steps to continue")
    run.barrier()
    if run.is_main:
        out.mkdir(parents=True, exist_ok=True)
    progress = progress and run.is_main
    say = print if run.is_main else (lambda *args, **kwargs: None)

    say(f"qlora finetune: {model_dir.name} ({total / 1e6:.1f}M params, {trainable / 1e6:.2f}M trainable, "
        f"r={r}) on {data_path.name} ({len(train_tokens):,} train / {len(held_tokens):,} held-out tokens), "
        f"{device.type}, seq {seq} x batch {batch}" + (f", resuming at step {first_step}" if resumed else "")
        + (f" per rank x {run.world_size} ranks ({run.mode})" if run.active else ""))
    loss_before = held_out_loss(run.unwrap(net), held_tokens, seq, device)
    net.train()
    bar = tqdm(range(first_step, steps), total=steps, initial=first_step, disable=not progress,
               desc="finetune", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    trained_tokens, loss_value = 0, float("nan")
    for step in bar:
        # Dropout masks, too, are a function of the step (and of the rank: each draws its own).
        torch.manual_seed(seed * 1_000_003 + step + 7_919 * run.rank)
        ids, labels = (run.rows(t).to(device)
                       for t in batch_at(train_tokens, step, batch * run.world_size, seq, seed, pad_id))
        loss = net(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = run.mean(loss)
        trained_tokens += ids.numel() * run.world_size
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{trained_tokens / elapsed:,.0f}",
                        mem=_mib(peak_memory(device)[0]))
        if step_callback is not None:
            step_callback(step + 1, loss_value)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            with run.whole(net, optimizer) as (whole_net, whole_optimizer):  # collective under FSDP
                if run.is_main:
                    save_checkpoint(out, whole_net, whole_optimizer, step + 1, settings)
            run.barrier()
    bar.close()
    train_seconds = time.perf_counter() - start
    loss_after = held_out_loss(run.unwrap(net), held_tokens, seq, device)
    if save_nf4:
        from qlora.distributed import save_base_model

        save_base_model(run.unwrap(net), out / "nf4", model_dir, compute_dtype, write=run.is_main)
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
    if run.active:
        report.update(world_size=run.world_size, parallel=run.mode)
    if not run.is_main:
        return report
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
    parser.add_argument("--model", help="Hugging Face causal-LM directory, plain or 4-bit: Llama-family ones "
                                        "run on qlora's own Llama, others need transformers "
                                        "(default: the embedded tiny Llama)")
    parser.add_argument("--data", help="a .txt file, or a .jsonl with a \"text\" field per line, or a "
                                       "\"messages\" list per line (chat: loss on the assistant's tokens only) "
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
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the 4-bit model with FSDP2 instead of DDP (--batch is per rank)")
    parser.add_argument("--save-nf4", action="store_true",
                        help="also write the 4-bit base model to OUT/nf4 (bitsandbytes layout, loadable by --model)")


def run(args) -> int:
    finetune(model=args.model, data=args.data, out=args.out, steps=args.steps, r=args.r, alpha=args.alpha,
             dropout=args.dropout, lr=args.lr, max_grad_norm=args.max_grad_norm or None,
             weight_decay=args.weight_decay, seq=args.seq, batch=args.batch, device=args.device,
             resume=args.resume, force=args.force, save_every=args.save_every, seed=args.seed,
             grad_ckpt=not args.no_grad_ckpt, compute_dtype=args.compute_dtype, progress=not args.no_progress,
             fsdp=args.fsdp, save_nf4=args.save_nf4)
    return 0
