"""`qlora generate`: text from a 4-bit model (with a LoRA adapter, if given), streamed as it is decoded.

The prompt runs through the model once (prefill), then each new token alone against the KV cache
(decode: M = 1 rows, which nf4_linear sends to its GEMV path on a GPU). Greedy by default
(temperature 0); a temperature samples, with nucleus (top-p) filtering, from a seeded generator.
Works for qlora's own Llama (the embedded model is the default) and any transformers causal LM,
loaded as `qlora finetune` loads them (a plain checkpoint is quantised on load).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.decoding import CACHE_IMPLEMENTATIONS, generate_ids, next_token  # noqa: F401 (imported from here)
from qlora.errors import UserError

DEFAULT_PROMPT = "def "


@dataclass
class Generation:
    text: str  # the new text, without the prompt
    token_ids: list[int]  # the new tokens
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: the tokens after the first, which each ran through the model alone."""
        return max(len(self.token_ids) - 1, 0) / max(self.decode_seconds, 1e-9)


# ---- streaming text ------------------------------------------------------------------------------

class TextStream:
    """Turns token ids into text pieces as they come: the whole is decoded each time and the new
    suffix given out, holding back a trailing half character (a byte tokenizer's multi-byte UTF-8)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.given = tokenizer, [], 0

    def text(self) -> str:
        from qlora.tokenizer import ByteTokenizer

        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.decode(self.ids)
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        piece, self.given = text[self.given:], len(text)
        return piece


# ---- loading and the API -------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    from qlora.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        if chat:
            raise UserError("--chat: the embedded byte tokenizer has no chat template")
        return tokenizer.encode(prompt, bos=True)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: the model's tokenizer has no chat_template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def stop_ids_of(model, tokenizer) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return tuple(sorted(i for i in ids if i is not None))


def load(model: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None,
         device: str | None = None, compute_dtype: str = "bfloat16"):
    """(model, tokenizer, context): a model directory in 4 bits, with the adapter's LoRA, ready to generate."""
    from qlora.finetune import DEFAULT_MODEL
    from qlora.finetune_model import describe_model, device_and_dtype, load_model, load_tokenizer
    from qlora.model import load_adapter

    model_dir = Path(model) if model is not None else DEFAULT_MODEL
    device, dtype = device_and_dtype(device, compute_dtype)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there (expected a PEFT adapter directory)")
    info = describe_model(model_dir)
    tokenizer = load_tokenizer(model_dir, info.vocab_size)
    with tempfile.TemporaryDirectory(prefix="qlora-generate-") as work_dir:
        net = load_model(model_dir, device, dtype, Path(work_dir))
    if adapter is not None:
        try:
            load_adapter(net, adapter)
        except (ValueError, FileNotFoundError) as err:
            raise UserError(f"--adapter {adapter}: {err}") from None
    return net.eval(), tokenizer, info.context


def check_options(max_new_tokens: int, temperature: float, top_p: float,
                  cache_implementation: str = "dynamic") -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"--temperature must be >= 0 and --top-p in (0, 1], got {temperature} and {top_p}")
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise UserError(f"--cache-implementation must be one of {', '.join(CACHE_IMPLEMENTATIONS)}, "
                        f"got {cache_implementation!r}")


def check_static_cache(net, compile: bool | dict) -> None:
    """A static cache needs qlora's Llama or a transformers model; compiling also needs no sliding-window
    layer (transformers' static sliding-window layer counts on the host: a recompile at every token)."""
    from qlora.decoding import cache_keyword, has_sliding_layers

    if cache_keyword(net) is None:
        return
    kind = getattr(getattr(net, "config", None), "model_type", type(net).__name__)
    if not hasattr(net, "config"):
        raise UserError(f"--cache-implementation static: model {kind!r} has no transformers config to size a cache")
    if compile and has_sliding_layers(net):
        raise UserError(f"--compile: model_type {kind!r} has sliding-window layers, whose transformers cache "
                        "recompiles at every token; use qlora's Llama or leave --compile off")


def generate(prompt: str = DEFAULT_PROMPT, model: str | os.PathLike | torch.nn.Module | None = None,
             tokenizer=None, adapter: str | os.PathLike | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, device: str | None = None,
             compute_dtype: str = "bfloat16", chat: bool = False, stream=None,
             cache_implementation: str = "dynamic", compile: bool | dict = False) -> Generation:
    """Generate from a model directory (default: the embedded tiny Llama) or from a loaded model and
    its tokenizer. stream(piece), if given, receives the text as it is decoded. Raises UserError on
    bad input.

    cache_implementation="static" preallocates the KV cache (transformers' name for it); compile=True
    also runs each decode step under torch.compile(mode="reduce-overhead", fullgraph=True), one CUDA
    graph per token on a GPU (a dict updates those torch.compile arguments). The sampler's generator
    lives on the model's device, so a seed gives the same text run after run on one device."""
    from qlora.llama import LlamaForCausalLM

    check_options(max_new_tokens, temperature, top_p, cache_implementation)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None or adapter is not None:
            raise UserError("generate: a loaded model needs its tokenizer, and takes no adapter "
                            "(qlora.load_adapter(model, directory) adds one)")
        net, context = model, None
    else:
        net, tokenizer, context = load(model, adapter, device, compute_dtype)
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    if not prompt_ids:
        raise UserError("--prompt: encodes to no tokens")
    context = context or getattr(getattr(net, "config", None), "max_position_embeddings", None)
    if isinstance(net, LlamaForCausalLM) and net.config.sliding_window:
        context = min(context, net.config.sliding_window)  # qlora's Llama attends over whole sequences only
    if context is not None:
        if len(prompt_ids) >= context:
            raise UserError(f"--prompt: {len(prompt_ids)} tokens, the model's context is {context}")
        max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    if compile or cache_implementation == "static":
        check_static_cache(net, compile)
    device = net.get_input_embeddings().weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    text = TextStream(tokenizer)
    tokens = generate_ids(net, prompt_ids, max_new_tokens, temperature, top_p, generator,
                          stop_ids_of(net, tokenizer), cache_implementation, compile)
    start = time.perf_counter()
    first_at = start
    for count, token in enumerate(tokens):  # each token is on the host once yielded: no other sync needed
        if count == 0:
            first_at = time.perf_counter()
        piece = text.push(token)
        if stream is not None and piece:
            stream(piece)
    end = time.perf_counter()
    return Generation(text.text(), text.ids, len(prompt_ids), first_at - start, end - first_at)


# ---- CLI -----------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--model", help="Hugging Face causal-LM directory, plain or 4-bit "
                                        "(default: the embedded tiny Llama)")
    parser.add_argument("--adapter", help="a LoRA adapter directory (PEFT's format, e.g. qlora finetune's --out)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the text to continue (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy; else sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--cache-implementation", default="dynamic", choices=CACHE_IMPLEMENTATIONS,
                        help="static: a KV cache preallocated to prompt + new tokens (default dynamic)")
    parser.add_argument("--compile", action="store_true",
                        help="decode steps under torch.compile(mode='reduce-overhead', fullgraph=True) with a "
                             "static cache: one CUDA graph per token on a GPU (the first tokens pay the compile)")


def run(args) -> int:
    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    check_options(args.max_new_tokens, args.temperature, args.top_p, args.cache_implementation)
    net, tokenizer, _ = load(args.model, args.adapter, args.device, args.compute_dtype)
    if args.compile or args.cache_implementation == "static":
        check_static_cache(net, args.compile)
    sys.stdout.write(args.prompt)
    result = generate(args.prompt, model=net, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=args.chat, stream=stream,
                      cache_implementation=args.cache_implementation, compile=args.compile)
    sys.stdout.write("\n")
    print(f"{len(result.token_ids)} tokens; prompt {result.prompt_tokens} tokens in {result.prefill_seconds:.2f}s, "
          f"decode {result.tokens_per_second:,.1f} tokens/s", file=sys.stderr)
    return 0
