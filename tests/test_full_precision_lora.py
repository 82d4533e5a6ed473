"""qlora/full_precision_lora.py: merge / unmerge / disable_adapter on LoRAEmbedding and LoRALinear with
QuantLoRALinear's semantics, and a prepared model's disable_adapter() covering every kind of adapter."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_families import one_thread  # noqa: F401  (tiny matrices: one thread is faster)
from qlora.lora_embedding import LoRAEmbedding
from qlora.lora_linear import LoRALinear

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def embedding_layer(dtype):
    torch.manual_seed(0)
    layer = LoRAEmbedding(nn.Embedding(37, 24, padding_idx=3).to(dtype), r=4, alpha=8)
    nn.init.normal_(layer.lora_embedding_A, std=0.5)  # away from the zero init, so the adapter shows
    ids = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    return layer, ids, lambda: nn.functional.embedding(ids, layer.base_layer.weight, padding_idx=3)


def linear_layer(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 17).to(dtype), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    return layer, x, lambda: nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", [embedding_layer, linear_layer], ids=["embedding", "linear"])
def test_disable_adapter_runs_the_base_alone(build, dtype):
    layer, inputs, base = build(dtype)
    adapted, alone = layer(inputs), base()
    assert not torch.allclose(adapted.float(), alone.float(), **TOLERANCE[dtype])  # the adapter does something
    with layer.disable_adapter():
        assert torch.equal(layer(inputs), alone)
    torch.testing.assert_close(layer(inputs), adapted, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", [embedding_layer, linear_layer], ids=["embedding", "linear"])
def test_disable_adapter_on_a_merged_layer_runs_the_original_then_merges_back(build, dtype):
    layer, inputs, base = build(dtype)
    adapted, alone, original = layer(inputs), base(), layer.base_layer.weight.detach().clone()
    parameter = layer.base_layer.weight
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(inputs), adapted, **TOLERANCE[dtype])  # the update is in W now
    merged = layer.base_layer.weight.detach().clone()
    with layer.disable_adapter():
        assert not layer.merged
        torch.testing.assert_close(layer(inputs), alone, **TOLERANCE[dtype])
    assert layer.merged and torch.equal(layer.base_layer.weight, merged)  # the same values, not re-rounded
    assert layer.base_layer.weight is parameter  # one Parameter throughout: a tied weight stays tied
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, **TOLERANCE[dtype])
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()


def test_a_merge_to_non_finite_values_changes_nothing():
    layer, inputs, _ = embedding_layer(torch.float32)
    layer.lora_embedding_B.data[0, 0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)


def test_merged_embedding_of_a_merged_layer_adds_the_update_once():
    layer, inputs, _ = embedding_layer(torch.float32)
    adapted = layer(inputs)
    layer.merge()
    table = layer.merged_embedding()
    torch.testing.assert_close(nn.functional.embedding(inputs, table.weight, padding_idx=3), adapted)


def test_a_prepared_model_disables_every_adapter_and_restores_them():
    pytest.importorskip("transformers")
    from hf_families import dequantised_base, logits, tiny_model, tokens
    from qlora.model import prepare_model

    model = prepare_model(tiny_model("llama"), target_modules=["q_proj", "embed_tokens", "lm_head"], r=4,
                          dropout=0.0, compute_dtype=torch.float32, verbose=False)
    assert isinstance(model.model.embed_tokens, LoRAEmbedding) and isinstance(model.lm_head, LoRALinear)
    torch.manual_seed(2)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    ids = tokens()
    adapted, base = logits(model, ids), logits(dequantised_base(model), ids)
    assert (adapted - base).abs().max() > 1e-2
    model.model.embed_tokens.merge()  # a merged adapter among unmerged ones
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base, rtol=1e-4, atol=1e-4)
    assert model.model.embed_tokens.merged
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-4, atol=1e-4)


def test_disable_adapter_warns_that_modules_to_save_stay_trained():
    # PEFT runs the original modules_to_save inside disable_adapter(); qlora trains them in place, keeps
    # no copy, and says so rather than hand back a silently trained "reference" model.
    pytest.importorskip("transformers")
    import warnings

    from hf_families import tiny_model
    from qlora.model import prepare_model

    plain = prepare_model(tiny_model("llama"), target_modules=["q_proj"], r=4, compute_dtype=torch.float32,
                          verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say when only LoRA trains
        with plain.disable_adapter():
            pass
    saved = prepare_model(tiny_model("llama"), target_modules=["q_proj"], r=4, modules_to_save=["lm_head"],
                          bias="lora_only", compute_dtype=torch.float32, verbose=False)
    with pytest.warns(UserWarning, match=r"lm_head, biases \(bias='lora_only'\) stay as trained"):
        with saved.disable_adapter():
            pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3", "gemma", "gemma2", "gpt2"])
def test_disable_adapter_gives_the_base_logits_for_each_family(family, dtype):
    # Every adapter of the models users bring (4-bit linears or GPT-2's Conv1D, the embedding; tied or
    # untied heads) off inside the block: the dequantised base's logits; after it, the adapted ones.
    pytest.importorskip("transformers")
    from hf_families import dequantised_base, logits, tiny_model, tokens
    from qlora.model import prepare_model

    targets = ["c_attn", "c_proj", "wte"] if family == "gpt2" else ["o_proj", "down_proj", "embed_tokens"]
    model = prepare_model(tiny_model(family, dtype), target_modules=targets, r=4, dropout=0.0, compute_dtype=dtype,
                          verbose=False)
    assert any(isinstance(m, LoRAEmbedding) for m in model.modules())
    torch.manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    ids = tokens()
    adapted, base = logits(model, ids), logits(dequantised_base(model), ids)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=0)
    assert (adapted - base).abs().max() > 1e-2
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base, **tolerance)
    torch.testing.assert_close(logits(model, ids), adapted, **tolerance)
