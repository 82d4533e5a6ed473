"""Tiny random-init transformers models of the families users bring, shared by tests/test_hf_*.py."""
from __future__ import annotations

import copy

import pytest
import torch

VOCAB = 256
FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma", "gemma2", "gpt2")


def tiny_config(family: str):
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                                       bos_token_id=0, eos_token_id=0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config,
           "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config}[family]
    if family in ("gemma", "gemma2"):
        common["head_dim"] = 16
    return cls(**common)


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    return model.to(dtype).eval()


def tokens(seed: int = 1, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: thread start-up costs more than the work (several times, on a busy CI runner).
    A module imports it to use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def train(model, ids, steps, lr):
    """AdamW on the trainable parameters, the batch as its own labels; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def dequantised_base(model):
    """The prepared model without adapters, every 4-bit layer dequantised back to its own class."""
    from qlora.layer import QuantLoRALinear
    from qlora.lora_embedding import LoRAEmbedding
    from qlora.lora_linear import LoRALinear
    from qlora.merge import merge_and_unload
    from qlora.targets import set_submodule

    twin = copy.deepcopy(model)
    for name, layer in list(twin.named_modules()):
        if isinstance(layer, (LoRAEmbedding, LoRALinear)):
            set_submodule(twin, name, layer.base_layer)
        elif isinstance(layer, QuantLoRALinear):
            layer.add_adapter(0, 1)
    merge_and_unload(twin)
    return twin.eval()
