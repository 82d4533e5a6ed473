"""A small Llama-family causal LM in plain torch, laid out so Hugging Face checkpoints load by key.

Module names follow transformers' LlamaForCausalLM (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`model.layers.N.mlp.gate_proj`, `model.norm`, `lm_head`, ...), so a state dict saved by transformers, or a
quantised one in bitsandbytes' layout, fills it directly, and `qlora.prepare_model` finds the same linears
PEFT would. This is what the core install (no transformers) fine-tunes.

The numerics follow transformers too (RMSNorm in float32, rotary tables in float32 then cast, logits upcast
for the loss), so logits match LlamaForCausalLM to rounding.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora.kv_cache import KVCache, StaticKVCache, causal_attention  # KVCache: also imported from here

# model_type values whose checkpoints have exactly this architecture (Mistral adds an optional sliding window).
LLAMA_FAMILY = ("llama", "mistral")


class ConfigError(ValueError):
    """A config.json that does not describe a Llama-family model this module can build."""


# Sizes the model is built from: each must be a positive integer when given.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")


def check_field_types(raw: dict, source: str) -> None:
    """ConfigError naming the field for a value of the wrong type or range, which would otherwise fail later
    (a division by zero heads, a negative size) or be silently wrong (a string "false" is true)."""
    for name in SIZE_FIELDS:
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
    for name in ("rms_norm_eps", "rope_theta"):
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ConfigError(f"{source}: {name} must be a positive number, got {value!r}")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if raw.get(name) is not None and not isinstance(raw[name], bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {raw[name]!r}")
    if raw.get("rope_scaling") is not None and not isinstance(raw["rope_scaling"], dict):
        raise ConfigError(f"{source}: rope_scaling must be an object, got {raw['rope_scaling']!r}")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, kept for round trips

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> LlamaConfig:
        model_type = raw.get("model_type")
        if model_type not in LLAMA_FAMILY:
            raise ConfigError(f"{source}: model_type {model_type!r} is not a Llama-family model "
                              f"(supported: {', '.join(LLAMA_FAMILY)})")
        raw = dict(raw)
        # transformers 5 writes rope_parameters = {"rope_type", "rope_theta", ...}; 4.x wrote rope_theta + rope_scaling.
        rope = raw.pop("rope_parameters", None)
        if isinstance(rope, dict):
            raw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                raw["rope_scaling"] = rope
        check_field_types(raw, source)
        scaling = raw.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ConfigError(f"{source}: rope scaling {kind!r} is not supported (llama3, linear)")
        if raw.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"{source}: hidden_act {raw.get('hidden_act')!r} is not supported (silu)")
        names = {f.name for f in fields(cls)} - {"extra"}
        try:
            config = cls(**{k: v for k, v in raw.items() if k in names and v is not None},
                         extra={k: v for k, v in raw.items() if k not in names})
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None
        if config.num_attention_heads % config.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads {config.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads {config.num_key_value_heads}")
        return config

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **out}

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def load_config(path: str | Path) -> LlamaConfig:
    """Read a model directory's config.json (or the file itself); ConfigError if it is not Llama-family."""
    path = Path(path)
    return LlamaConfig.from_dict(read_config_file(path), source=str(path / "config.json" if path.is_dir() else path))


def read_config_file(path: str | Path) -> dict:
    """A model directory's config.json (or the file itself) as a dict; ConfigError if it is not one."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return raw


def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3 or linear scaling (as transformers does)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: LlamaConfig, seq_len: int, device, dtype, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables_at(config, torch.arange(start, start + seq_len, device=device), dtype)


def rope_tables_at(config: LlamaConfig, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed per forward rather than kept as buffers: a model built on the meta device needs no fix-up.
    freqs = positions.float()[:, None] * rope_inv_freq(config, positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype: transformers' order of roundings. The result
        # keeps the input dtype even when prepare_model has made the weight float32, so the residual
        # stream and lm_head (left in bf16) see one dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h.to(x.dtype)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int = 0):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        hd, bias = config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | StaticKVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        hd = self.config.head_dim
        q = self.q_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        # K and V keep their kv heads: attention groups the query heads over them (kv_cache.attention).
        out = cache.attend(q, k, v) if cache is not None else causal_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int = 0):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | StaticKVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLMOutput(NamedTuple):
    loss: torch.Tensor | None
    logits: torch.Tensor


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM; forward(input_ids, labels=None) -> CausalLMOutput(loss, logits)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    # transformers-style hooks, so helpers written for HF models (prepare_model, PEFT) work unchanged.
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def enable_input_require_grads(self) -> None:
        # With a frozen embedding and checkpointed layers, the layers' input must require grad or
        # no gradient reaches the adapters inside them.
        self._input_grad_hook = self.model.embed_tokens.register_forward_hook(
            lambda module, inputs, output: output.requires_grad_(True))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | StaticKVCache | None = None, **_ignored) -> CausalLMOutput:
        """past_key_values: a KVCache or StaticKVCache holding the earlier tokens (filled in place);
        input_ids are the new ones."""
        # Causal attention over full rows only: a padded batch would silently attend to its padding.
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"attention_mask of shape {list(attention_mask.shape)} masks out tokens; "
                             "this model attends causally over whole rows (pack or trim the batch instead)")
        h = self.model.embed_tokens(input_ids)
        if isinstance(past_key_values, StaticKVCache):
            # Positions come from the cache's device counter: the same graph serves every token.
            if not torch.compiler.is_compiling():
                past_key_values.reserve(input_ids.shape[-1])  # a compiled caller reserves outside the graph
            cos, sin = rope_tables_at(self.config, past_key_values.positions(input_ids.shape[-1]), h.dtype)
        else:
            past = len(past_key_values) if past_key_values is not None else 0
            self.check_length(past + input_ids.shape[-1])
            cos, sin = rope_tables(self.config, input_ids.shape[-1], h.device, h.dtype, start=past)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each layer's input; recompute its inside during backward.
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin, past_key_values)
        if isinstance(past_key_values, StaticKVCache):
            past_key_values.advance(input_ids.shape[-1])
        logits = self.lm_head(self.model.norm(h))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss, logits)

    def check_length(self, seq: int) -> None:
        if seq > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {seq} tokens exceeds the model's context of "
                             f"{self.config.max_position_embeddings}")
        if self.config.sliding_window is not None and seq > self.config.sliding_window:
            raise ValueError(f"sequence of {seq} tokens exceeds the sliding window of {self.config.sliding_window}")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t+1]; labels equal to ignore_index are skipped."""
    shifted = labels[..., 1:].reshape(-1)
    flat = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, shifted, ignore_index=ignore_index)


def build_model(config: LlamaConfig, device="meta", dtype=torch.bfloat16) -> LlamaForCausalLM:
    """The model with uninitialised weights (meta device by default: no memory until loaded)."""
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def load_plain_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a plain safetensors checkpoint (one file or shards with an index)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / s for s in shards]
    else:
        files = [model_dir / "model.safetensors"]
    state = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing weights file")
        state.update(load_file(str(file)))
    return state


def from_pretrained(model_dir: str | Path, dtype=torch.bfloat16, device="cpu") -> LlamaForCausalLM:
    """A plain (unquantised) HF Llama-family directory as a full-precision model: for tests and small models."""
    config = load_config(model_dir)
    model = build_model(config, device="meta", dtype=dtype)
    state = {k: v.to(dtype) for k, v in load_plain_state_dict(model_dir).items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not fit the config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device)
