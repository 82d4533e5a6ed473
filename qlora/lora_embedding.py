"""LoRAEmbedding: a frozen nn.Embedding plus a LoRA update, in PEFT's layout.

Embeddings stay in full precision (QLoRA quantises linears only). As in PEFT, the adapter is
`lora_embedding_A` [r, num_embeddings] (zeros) and `lora_embedding_B` [embedding_dim, r] (normal),
plain Parameters, so a row lookup in A^T followed by B^T gives scale * (B A)^T[ids]; a model's
embed_scale (Gemma) multiplies the update as it multiplies the base lookup.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora.full_precision_lora import FullPrecisionLoRA
from qlora.layer import lora_scale


class LoRAEmbedding(FullPrecisionLoRA):
    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if r <= 0:
            raise ValueError(f"r must be > 0 for an embedding adapter, got {r}")
        self.base_layer = base_layer
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.r, self.alpha, self.use_rslora = int(r), alpha, use_rslora
        self.scaling = lora_scale(self.r, alpha, use_rslora)
        device = base_layer.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(self.r, self.num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.randn(self.embedding_dim, self.r, device=device, dtype=dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The base table, so code reading model.get_input_embeddings().weight keeps working."""
        return self.base_layer.weight

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * (B A)^T: what the adapter adds to the [num_embeddings, dim] table."""
        return (self.lora_embedding_B.to(dtype) @ self.lora_embedding_A.to(dtype)).T * self.scaling

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(ids)
        if not self.adapter_active:
            return out
        base = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                              sparse=base.sparse)
        update = (after_a @ self.lora_embedding_B.T) * self.scaling
        embed_scale = getattr(base, "embed_scale", None)
        if isinstance(embed_scale, torch.Tensor):
            update = update * embed_scale.to(update.dtype)
        return out + update.to(out.dtype)

    def merged_embedding(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        """The base nn.Embedding (same class, so embed_scale and the like stay) holding W + delta (see
        FullPrecisionLoRA._merged_base)."""
        return self._merged_base(dtype)
