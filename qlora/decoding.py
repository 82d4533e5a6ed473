"""The decoding loop: the prompt through the model once (prefill), then one token at a time (decode),
each token chosen on the device and fed straight back as a device tensor.

Choices, and why:
- Selection in the graph. Greedy is an argmax; sampling (temperature, then the top-p nucleus) draws its
  sample as argmax(p / E) with E ~ Exp(1) noise from the seeded generator. That is exactly how
  torch.multinomial draws one sample, so for the same generator state the tokens are the ones
  multinomial gives (the same distribution, and on the CPU the same samples as before); and since the
  noise is an input drawn just outside, the whole step, selection included, is one graph with no host
  value in it.
- On CUDA the host reads each token one step behind. The next step is queued first; the token is
  copied into pinned memory with a non-blocking copy and an event on the token's device, so reading it
  waits for that token only, never for the step queued after it: the device never idles while the host
  streams text or checks stop ids. The price: on a stop token, one step past it has been computed and
  is thrown away. Elsewhere (CPU) a step runs when called, so there is nothing to overlap: each token
  is read before the next step runs, and timings stay per token.
- `compile` wraps the decode step in torch.compile(mode="reduce-overhead", fullgraph=True) with a static
  cache (same shapes and tensor addresses at every token): one CUDA graph replayed per token on CUDA.
  The prefill stays eager (its length varies from prompt to prompt). The static cache stays with the
  model for the next generation of the same shape (one per model, as transformers keeps its own), so
  the graphs recorded over its buffers replay instead of recording again.
"""
from __future__ import annotations

import inspect
import weakref

import torch

CACHE_IMPLEMENTATIONS = ("dynamic", "static")


# ---- choosing the token ------------------------------------------------------------------------

def sampling_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exp(1) noise for `select_tokens`, drawn on the generator's device (the model's when None) and
    moved to `device` without a host wait."""
    where = generator.device if generator is not None else device
    return torch.empty(shape, device=where).exponential_(generator=generator).to(device, non_blocking=True)


def select_tokens(logits: torch.Tensor, noise: torch.Tensor | None = None, temperature: float | torch.Tensor = 1.0,
                  top_p: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The next token of each row of logits [batch, vocab] as a [batch, 1] long tensor on their device:
    the argmax when noise is None (greedy), else a sample at this temperature from the smallest set of
    most likely tokens whose probability reaches top_p, with `noise` from `sampling_noise` (same shape)
    as its randomness. temperature and top_p may be 0-d tensors (then one graph serves every value)."""
    if noise is None:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep a token if the ones more likely than it do not yet reach top_p (the first is always kept).
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    sorted_probs = sorted_probs * keep
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    return order.gather(-1, (sorted_probs / noise).argmax(-1, keepdim=True))


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> int:
    """One position's logits [vocab] -> the next token, on the host (select_tokens for one row)."""
    noise = sampling_noise(logits[None].shape, logits.device, generator) if temperature > 0 else None
    return int(select_tokens(logits[None], noise, temperature, top_p))


class TokenReader:
    """Brings tokens to the host without waiting for the work queued after them (see the module's notes)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def queue(self, token: torch.Tensor):
        if not self.cuda:  # CPU tensors are computed by the time they are returned
            return token
        host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
        host.copy_(token, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(token.device))  # the copy's stream, whatever device is current
        return host, event

    def read(self, pending) -> int:
        if self.cuda:
            host, event = pending
            event.synchronize()
            pending = host
        return int(pending.view(-1)[0])


# ---- running the model -------------------------------------------------------------------------

def cache_keyword(model) -> str | None:
    """The forward's cache argument: None for qlora's Llama; transformers 5.24 renamed
    past_key_values to cache (the old name warns until 5.40). Read once per generation."""
    from qlora.llama import LlamaForCausalLM

    if isinstance(model, LlamaForCausalLM):
        return None
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def compile_options(compile: bool | dict) -> dict:
    """torch.compile's arguments: reduce-overhead (CUDA graphs) and fullgraph, updated by a dict
    (e.g. {"backend": "aot_eager"}; a backend other than inductor drops the default mode)."""
    options = {"mode": "reduce-overhead", "fullgraph": True}
    if isinstance(compile, dict):
        options.update(compile)
        if options.get("backend", "inductor") != "inductor" and "mode" not in compile:
            del options["mode"]
    return options


def compiled_cache_length(model, needed: int) -> int:
    """A compiled step's cache length: `needed` rounded up to a power of two (at least 64) within the
    model's context, so that prompts of other lengths reuse the compiled step (a new cache length is a
    new shape: a recompile, and another CUDA graph)."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if cache_keyword(model) is None and config.sliding_window is not None:
        context = min(context, config.sliding_window)  # qlora's Llama attends over whole sequences only
    length = max(64, 1 << (needed - 1).bit_length())
    return max(needed, min(length, context)) if context else length


def has_sliding_layers(model) -> bool:
    """Whether transformers' StaticCache for this model has a sliding-window layer (built lazily: no memory)."""
    from transformers import StaticCache

    return any(getattr(layer, "is_sliding", False) for layer in StaticCache(config=model.config, max_cache_len=1).layers)


def new_cache(model, keyword: str | None, static: bool, max_length: int, batch_size: int = 1):
    from qlora.kv_cache import KVCache, StaticKVCache

    if keyword is None:
        return StaticKVCache.for_model(model, max_length, batch_size) if static else KVCache()
    if not static:
        return None  # transformers makes its DynamicCache on the first call
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_length)


# A compiled step's static cache, kept per model for the next generation (as transformers keeps its
# own): CUDA graphs recorded over its buffers replay for a later generate() of the same shape, where a
# new cache (new addresses) would make them record again. One per model (the last shape used), so what
# stays allocated after generating is one cache. A cache in use by an unfinished generation is never
# handed out twice: a concurrent one gets its own.
_kept_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def take_cache(model, keyword: str | None, max_length: int, batch_size: int):
    key = (keyword, max_length, batch_size)
    kept_key, cache = _kept_caches.get(model, (None, None))
    if cache is not None and kept_key == key and not cache._qlora_in_use:
        cache.reset()
    else:
        cache = new_cache(model, keyword, True, max_length, batch_size)
        if kept_key is None or not _kept_caches[model][1]._qlora_in_use:
            _kept_caches[model] = (key, cache)
    cache._qlora_in_use = True
    return cache


class Decoder:
    """The model with its cache: `prefill(ids)` and then `step(token)`, each returning the chosen
    next token as a [batch, 1] device tensor. max_length: the positions the cache must hold."""

    def __init__(self, model, max_length: int, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, cache_implementation: str = "dynamic",
                 compile: bool | dict = False):
        if cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, "
                             f"got {cache_implementation!r}")
        self.model, self.generator, self.sampling = model, generator, temperature > 0
        self.device = model.get_input_embeddings().weight.device
        # Tensors, not floats: a compiled step would otherwise be specialised to (and guarded on) each value.
        self.temperature = torch.tensor(float(temperature), device=self.device)
        self.top_p = torch.tensor(float(top_p), device=self.device)
        self.keyword = cache_keyword(model)
        compiling = compile is not False and compile is not None  # {} means the default options
        self.static = compiling or cache_implementation == "static"
        self.max_length = compiled_cache_length(model, max_length) if compiling else max_length
        self.cache = self.vocab = None  # sized by prefill: its batch, the logits' width
        self.compiled = torch.compile(self.choose_next, **compile_options(compile)) if compiling else None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] of the last of the new tokens; the cache takes them all."""
        if self.keyword is None:  # qlora's Llama
            return self.model(ids, past_key_values=self.cache).logits[:, -1]
        out = self.model(input_ids=ids, use_cache=True, **{self.keyword: self.cache})
        if not self.static:
            self.cache = getattr(out, self.keyword)
        return out.logits[:, -1]

    def choose_next(self, ids: torch.Tensor, noise: torch.Tensor | None, temperature: torch.Tensor,
                    top_p: torch.Tensor) -> torch.Tensor:
        return select_tokens(self.logits(ids), noise, temperature, top_p)

    def noise(self, batch: int, vocab: int) -> torch.Tensor | None:
        if not self.sampling:
            return None
        return sampling_noise(torch.Size((batch, vocab)), self.device, self.generator)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            self.cache = (take_cache(self.model, self.keyword, self.max_length, ids.shape[0]) if self.compiled
                          else new_cache(self.model, self.keyword, self.static, self.max_length, ids.shape[0]))
        logits = self.logits(ids)
        self.vocab = logits.shape[-1]  # not the output layer's weight: a quantised lm_head packs it
        return select_tokens(logits, self.noise(*logits.shape), self.temperature, self.top_p)

    def close(self) -> None:
        """The generation is over: a kept cache may serve the next one."""
        if self.compiled is not None and self.cache is not None:
            self.cache._qlora_in_use = False

    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.prefill(token)
        if self.keyword is None:
            self.cache.reserve(token.shape[-1])  # the host bounds check the graph leaves out
        noise = self.noise(token.shape[0], self.vocab)
        torch.compiler.cudagraph_mark_step_begin()
        # A copy: the next replay overwrites the graph's output buffer.
        return self.compiled(token, noise, self.temperature, self.top_p).clone()


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, stop_ids: tuple[int, ...] = (),
                 cache_implementation: str = "dynamic", compile: bool | dict = False):
    """Yield new token ids one at a time (a stop token is yielded, then generation ends). On CUDA the
    host reads each token while the step after it runs (see the module's notes)."""
    decoder = Decoder(model, len(prompt_ids) + max_new_tokens - 1, temperature, top_p, generator,
                      cache_implementation, compile)
    reader = TokenReader(decoder.device)
    try:
        token = decoder.prefill(torch.tensor([prompt_ids], dtype=torch.long, device=decoder.device))
        pending = reader.queue(token)
        ahead = reader.cuda  # elsewhere a step runs when called: read first, nothing to overlap
        for step in range(max_new_tokens):
            last = step == max_new_tokens - 1
            if ahead and not last:
                token = decoder.step(token)  # queued before the current token is read
            value = reader.read(pending)
            if value in stop_ids or last:
                decoder.close()  # before the last yield: a caller that stops reading here need not close us
                yield value
                return
            yield value
            if not ahead:
                token = decoder.step(token)
            pending = reader.queue(token)
    finally:  # also when the caller stops early (the generator is closed)
        decoder.close()
