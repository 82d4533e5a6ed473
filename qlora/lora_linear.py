"""LoRALinear: LoRA on a linear left in full precision (lm_head, or anything in prepare_model's skip
list named as a target), as PEFT adapts it: y = base(x) + scale * B(A(dropout(x))), with PEFT's
`lora_A` / `lora_B` submodules. A tied lm_head stays tied: the base keeps its Parameter."""
from __future__ import annotations

import math

import torch
from torch import nn

from qlora.full_precision_lora import FullPrecisionLoRA
from qlora.layer import lora_scale


class LoRALinear(FullPrecisionLoRA):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if r <= 0:
            raise ValueError(f"r must be > 0 for an adapter on a full-precision linear, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = int(r), alpha, use_rslora
        self.scaling = lora_scale(self.r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * B A: what the adapter adds to W [out, in]."""
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.adapter_active:
            return out
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)

    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The base nn.Linear holding W + scale * B A (see FullPrecisionLoRA._merged_base)."""
        return self._merged_base(dtype)
