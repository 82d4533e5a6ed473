"""Loading a causal LM and its tokenizer in 4 bits, for `qlora finetune` and `qlora generate`.

Llama-family directories (llama, mistral) load into qlora's own Llama, which needs nothing beyond
torch. Any other causal LM needs transformers: its module is built from config.json on the meta
device (AutoModelForCausalLM, trust_remote_code=False always: a model's own code never runs) and
filled by load_quantized, so in both cases no full-precision copy of the quantised weights is built.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.errors import UserError

HF_EXTRA = "pip install 'qlora[hf]'"


@dataclass
class ModelInfo:
    """What finetune checks before loading anything: the vocabulary, the context, who builds it."""

    model_type: str
    vocab_size: int
    context: int
    native: bool  # qlora's own Llama builds it (no transformers needed)


def read_config(model_dir: Path) -> dict:
    from qlora.llama import ConfigError, read_config_file

    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model directory not found")
    try:
        return read_config_file(model_dir)
    except ConfigError as err:
        raise UserError(str(err)) from None


def device_and_dtype(device: str | None, compute_dtype: str) -> tuple[torch.device, torch.dtype]:
    """--device (default: cuda when available) and --compute-dtype, checked."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(compute_dtype)
    if dtype is None:
        raise UserError(f"--compute-dtype {compute_dtype!r}: use bfloat16, float16 or float32")
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return device, dtype


def describe_model(model_dir: Path) -> ModelInfo:
    from qlora.llama import LLAMA_FAMILY, ConfigError, LlamaConfig

    raw = read_config(model_dir)
    model_type = raw.get("model_type")
    if model_type in LLAMA_FAMILY:
        try:
            config = LlamaConfig.from_dict(raw, source=str(model_dir / "config.json"))
            return ModelInfo(model_type, config.vocab_size, config.max_position_embeddings, native=True)
        except ConfigError as err:
            if importlib.util.find_spec("transformers") is None:
                raise UserError(str(err)) from None
            # e.g. a rope scaling qlora's Llama lacks: transformers' own class builds it.
    config = _transformers_config(model_dir).to_dict()
    context = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if config.get(k)), None)
    if not isinstance(config.get("vocab_size"), int) or not isinstance(context, int):
        raise UserError(f"{model_dir / 'config.json'}: needs vocab_size and max_position_embeddings (or n_positions)")
    return ModelInfo(str(model_type), config["vocab_size"], context, native=False)


def _transformers_config(model_dir: Path):
    try:
        from transformers import AutoConfig
    except ImportError:
        raise UserError(f"{model_dir}: model_type {read_config(model_dir).get('model_type')!r} is not "
                        f"Llama-family; other models need transformers ({HF_EXTRA})") from None
    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as err:  # transformers raises ValueError, KeyError, OSError... the user needs one line
        raise UserError(f"{model_dir}: transformers cannot read its config ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None


def is_quantised(model_dir: Path) -> bool:
    config = read_config(model_dir)
    quant = config.get("quantization_config") or {}
    if not quant:
        return False
    if quant.get("quant_method") != "bitsandbytes" or not quant.get("load_in_4bit", False) \
            or quant.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
        raise UserError(f"{model_dir}: quantization_config is not bitsandbytes NF4 or FP4 4-bit "
                        f"(quant_method={quant.get('quant_method')!r}, "
                        f"bnb_4bit_quant_type={quant.get('bnb_4bit_quant_type')!r})")
    return True


def build_on_meta(model_dir: Path) -> torch.nn.Module:
    """The model's module tree with no memory behind its weights: qlora's Llama or transformers'."""
    if describe_model(model_dir).native:
        from qlora.llama import build_model, load_config

        return build_model(load_config(model_dir), device="meta")
    from transformers import AutoModelForCausalLM

    config = _transformers_config(model_dir)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as err:
        raise UserError(f"{model_dir}: model_type {config.model_type!r} is not a causal LM transformers "
                        f"can build ({str(err).splitlines()[0]})") from None


def load_model(model_dir: Path, device: torch.device, compute_dtype: torch.dtype, work_dir: Path):
    """The model on the meta device, filled 4-bit from the checkpoint: a plain checkpoint is first
    quantised (streaming, one tensor at a time) into work_dir, so no full-precision copy of the model
    is ever built."""
    from qlora.checkpoint import CheckpointError
    from qlora.model import load_quantized

    model_dir = Path(model_dir)
    model = build_on_meta(model_dir)
    quantised_dir = model_dir
    try:
        if not is_quantised(model_dir):
            from qlora.convert import quantize_checkpoint

            quantised_dir = Path(work_dir) / "nf4"
            quantize_checkpoint(model_dir, quantised_dir, compute_dtype=str(compute_dtype).removeprefix("torch."),
                                device=device.type, force=True, progress=False)
        load_quantized(model, quantised_dir, device=device, compute_dtype=compute_dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    return model.eval()


def load_tokenizer(model_dir: Path, vocab_size: int):
    """The byte tokenizer for models that declare it (the embedded one); else transformers' tokenizer."""
    from qlora.tokenizer import VOCAB_SIZE, ByteTokenizer

    config_file = model_dir / "tokenizer_config.json"
    try:
        declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    except (ValueError, AttributeError, RecursionError):
        raise UserError(f"{config_file}: not a JSON object") from None
    if declared in ("qlora.tokenizer.ByteTokenizer", "qlora.ByteTokenizer", "ByteTokenizer"):
        if vocab_size < VOCAB_SIZE:
            raise UserError(f"{model_dir}: byte tokenizer needs vocab_size >= {VOCAB_SIZE}, config has {vocab_size}")
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"{model_dir}: its tokenizer needs transformers ({HF_EXTRA})") from None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds; the user needs the one line
        raise UserError(f"{model_dir}: could not load its tokenizer ({type(err).__name__}: {err})") from None
