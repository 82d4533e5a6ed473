"""Keys and values of the tokens seen so far, so that decoding feeds only the new tokens.

Two caches with one interface (`update(layer, k, v)` -> the keys and values to attend over, `attend(q, k, v)`):

- `KVCache` grows by concatenation: nothing is reserved, but every token has a new shape, so a compiled
  decode step would recompile (and a CUDA graph re-record) at each one.
- `StaticKVCache` is preallocated to [batch, kv_heads, max_length, head_dim] per layer and written in place at
  positions held in a device tensor, with the slots not yet written masked out of attention. A decode step
  then has the same shapes and the same tensors (addresses) at every token: what torch.compile's
  mode="reduce-overhead" needs to replay one CUDA graph. transformers' StaticCache works the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """SDPA of q [batch, heads, new, dim] over k, v [batch, kv_heads, total, dim], heads a multiple of
    kv_heads (grouped-query attention: query head h reads kv head h // (heads // kv_heads), as
    transformers' repeat_kv). allowed: a [new, total] mask, or causal. A decode step (no causal mask)
    groups the query heads of each kv head as rows of one attention instead of copying K and V per
    query head: with a long cache that copy would cost more memory traffic than the step's weights."""
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal)
    if causal:  # the causal fast path needs one row per position: expand K and V (a prefill, once)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=True)
    batch, heads, new, dim = q.shape
    grouped = q.reshape(batch, k.shape[1], rep * new, dim)  # rows: (rep, new), rep-major
    mask = None if allowed is None else allowed.repeat(rep, 1)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
    return out.reshape(batch, heads, new, dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last q.shape[-2] positions over all k.shape[-2] (earlier ones cached)."""
    new, total = q.shape[-2], k.shape[-2]
    if new == total:
        return attention(q, k, v, causal=True)
    if new == 1:  # one new token sees everything before it
        return attention(q, k, v)
    return attention(q, k, v, torch.ones(new, total, dtype=torch.bool, device=q.device).tril(total - new))


class KVCache:
    """Each layer's keys and values of the tokens seen so far (after rotary). Pass one to
    LlamaForCausalLM.forward as past_key_values; it grows in place."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat((self.keys[layer], k), dim=-2)
            self.values[layer] = torch.cat((self.values[layer], v), dim=-2)
        return self.keys[layer], self.values[layer]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_attention(q, k, v)


class StaticKVCache:
    """Each layer's keys and values in buffers of a fixed length, written in place.

    `length` (a 0-d long tensor on the device) counts the positions written; the model reads its
    positions from it and `advance` moves it in place, so no host value changes from token to token.
    `seen` mirrors it on the host, for the bounds check that must come before a write (an index past
    the end would be a device-side assert on CUDA). An eager forward checks and advances `seen` itself;
    a caller that compiles the forward calls `reserve(count)` before each compiled call (qlora's
    generate does), because a host count read inside the graph would recompile it at every token.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_length: int, batch_size: int = 1,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        shape = (batch_size, kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.arange(max_length, device=device)
        self.seen = 0
        for tensor in (*self.keys, *self.values, self.length, self.slots):
            # A fixed address lets a CUDA graph write these in place instead of skipping the graph.
            torch._dynamo.mark_static_address(tensor)

    @classmethod
    def for_model(cls, model, max_length: int | None = None, batch_size: int = 1) -> StaticKVCache:
        """A cache shaped for a qlora Llama (its config, compute dtype and device); max_length defaults
        to the model's context and may not exceed it."""
        config = model.config
        context = config.max_position_embeddings
        if config.sliding_window is not None:
            context = min(context, config.sliding_window)  # qlora's Llama attends over whole sequences only
        max_length = context if max_length is None else max_length
        if not 0 < max_length <= context:
            raise ValueError(f"StaticKVCache: max_length {max_length} must be in 1..{context} (the model's context)")
        embedding = model.get_input_embeddings().weight
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, max_length, batch_size,
                   embedding.dtype, embedding.device)

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[-2]

    def __len__(self) -> int:
        return self.seen

    def reserve(self, count: int) -> None:
        """Check on the host that `count` more positions fit, and count them as taken."""
        if self.seen + count > self.max_length:
            raise ValueError(f"StaticKVCache of shape {list(self.keys[0].shape)} is full: {self.seen} positions "
                             f"written, {count} more do not fit in max_length {self.max_length}")
        self.seen += count

    def positions(self, count: int) -> torch.Tensor:
        """Positions of the `count` tokens this forward writes (a device tensor: no host sync)."""
        return self.length + self.slots[:count]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        if k.shape[:2] != keys.shape[:2] or k.shape[-1] != keys.shape[-1] or k.dtype != keys.dtype:
            raise ValueError(f"StaticKVCache layer {layer}: keys of shape {list(k.shape)} {k.dtype} do not fit "
                             f"the cache's {list(keys.shape)} {keys.dtype}")
        at = self.positions(k.shape[-2])
        keys.index_copy_(2, at, k)
        values.index_copy_(2, at, v)
        return keys, values

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Each new token sees the slots up to its own position: earlier tokens, never unwritten slots.
        allowed = self.slots[None, :] <= self.positions(q.shape[-2])[:, None]
        return attention(q, k, v, allowed)

    def reset(self) -> None:
        """Empty again, the same tensors (addresses) kept: slots past `length` are masked, not zeroed."""
        self.length.zero_()
        self.seen = 0

    def advance(self, count: int) -> None:
        """After every layer has written: the next forward starts `count` positions later."""
        self.length.add_(count)
