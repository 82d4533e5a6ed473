"""PEFT's options on qlora models, in PEFT's file format and checked against the installed peft:
LoRA on Conv1D and on embeddings (GPT-2's c_attn / wte / wpe), bias="lora_only"/"all",
modules_to_save, DoRA refused; GPT-2's 4-bit layout equals bitsandbytes'; Trainer with
PagedAdamW32bit saves the adapter through save_model; merge back to NF4 reports its error."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_families import dequantised_base, logits, one_thread, tiny_model, tokens  # noqa: E402,F401
from qlora.layer import QuantLoRALinear  # noqa: E402
from qlora.lora_embedding import LoRAEmbedding  # noqa: E402
from qlora.merge import merge_and_unload  # noqa: E402
from qlora.model import load_adapter, prepare_model, save_adapter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc", "wte", "wpe"]


def randomise_adapters(model, seed=2):
    """B (and the embeddings' A) away from their zero init, so adapters change the output."""
    torch.manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, QuantLoRALinear) and layer.r:
            nn.init.normal_(layer.lora_B.weight, std=0.05)
        elif isinstance(layer, LoRAEmbedding):
            nn.init.normal_(layer.lora_embedding_A, std=0.05)


def test_gpt2_conv1d_quantises_transposed_as_bitsandbytes_writes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from qlora.convert import quantize_checkpoint

    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "src")
    quantize_checkpoint(tmp_path / "src", tmp_path / "ours", progress=False)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=config,
                                                               device_map="cpu")
    theirs.save_pretrained(tmp_path / "theirs")
    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    states = [k for k in theirs if k.endswith("quant_state.bitsandbytes__nf4")]
    assert len(states) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    for key in states:
        a, b = json.loads(bytes(ours[key].tolist())), json.loads(bytes(theirs[key].tolist()))
        assert a["shape"] == b["shape"], key  # e.g. c_attn [192, 64]: [out, in]
        packed = key.replace(".quant_state.bitsandbytes__nf4", "")
        assert torch.equal(ours[packed], theirs[packed]), packed  # the same codes, so the same orientation
    assert json.loads(bytes(ours["transformer.h.0.attn.c_attn.weight.quant_state.bitsandbytes__nf4"].tolist())
                      )["shape"] == [192, 64]


def test_gpt2_conv1d_and_embedding_adapters_load_in_peft_with_the_same_logits(tmp_path):
    model = prepare_model(tiny_model("gpt2"), target_modules=GPT2_TARGETS, r=4, alpha=8, dropout=0.0,
                          compute_dtype=torch.float32, verbose=False)
    assert isinstance(model.transformer.wte, LoRAEmbedding) and isinstance(model.transformer.wpe, LoRAEmbedding)
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out
    randomise_adapters(model)
    ids = tokens()
    ours = logits(model, ids)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"base_model.model.transformer.wte.lora_embedding_A",
            "base_model.model.transformer.wpe.lora_embedding_B",
            "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"} <= keys
    base = dequantised_base(model)
    assert not torch.allclose(logits(base, ids), ours, atol=1e-3)  # the adapters matter
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=1e-4, atol=1e-4)


def test_peft_gpt2_adapter_with_embeddings_loads_in_qlora(tmp_path):
    model = prepare_model(tiny_model("gpt2"), r=0, compute_dtype=torch.float32, verbose=False)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "c_fc", "wte"], init_lora_weights=False,
                             lora_dropout=0.0, fan_in_fan_out=True)
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(dequantised_base(model), config).eval()
    peft_model.save_pretrained(str(tmp_path))
    loaded = load_adapter(model, tmp_path)
    assert "transformer.wte" in loaded and isinstance(model.transformer.wte, LoRAEmbedding)
    ids = tokens()
    torch.testing.assert_close(logits(model.eval(), ids), logits(peft_model, ids), rtol=1e-4, atol=1e-4)


def test_lm_head_and_embed_tokens_adapters_round_trip_with_peft(tmp_path):
    """LoRA on lm_head (kept in full precision, as PEFT adapts it) and on embed_tokens."""
    targets = ["q_proj", "lm_head", "embed_tokens"]
    model = prepare_model(tiny_model("llama"), target_modules=targets, r=4, dropout=0.0,
                          compute_dtype=torch.float32, verbose=False)
    assert type(model.lm_head).__name__ == "LoRALinear" and type(model.lm_head.base_layer) is nn.Linear
    randomise_adapters(model)
    torch.manual_seed(3)
    nn.init.normal_(model.lm_head.lora_B.weight, std=0.05)
    ids = tokens()
    ours = logits(model.eval(), ids)
    save_adapter(model, tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(dequantised_base(model), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=1e-4, atol=1e-4)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    fresh = prepare_model(tiny_model("llama"), target_modules=["q_proj"], r=0, compute_dtype=torch.float32,
                          verbose=False)
    assert set(load_adapter(fresh, tmp_path / "theirs")) >= {"lm_head", "model.embed_tokens"}
    torch.testing.assert_close(logits(fresh.eval(), ids), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_and_modules_to_save_train_and_round_trip_with_peft(bias, tmp_path):
    model = prepare_model(tiny_model("qwen2"), target_modules=["q_proj", "v_proj"], r=4, dropout=0.0, bias=bias,
                          modules_to_save=["lm_head"], compute_dtype=torch.float32, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.bias" in trainable and "lm_head.weight" in trainable
    assert ("model.layers.0.self_attn.k_proj.bias" in trainable) == (bias == "all")
    ids = tokens()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ours = logits(model.eval(), ids)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["bias"], config["modules_to_save"]) == (bias, ["lm_head"])
    base = prepare_model(tiny_model("qwen2"), target_modules=["q_proj", "v_proj"], r=0,
                         compute_dtype=torch.float32, verbose=False)
    peft_model = peft.PeftModel.from_pretrained(dequantised_base(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=1e-4, atol=1e-4)
    # And back: PEFT's file into a fresh qlora model gives the trained biases and lm_head.
    peft_model.save_pretrained(str(tmp_path / "from_peft"))
    load_adapter(base, tmp_path / "from_peft")
    torch.testing.assert_close(logits(base.eval(), ids), ours, rtol=1e-4, atol=1e-4)


def bnb_loaded_llama(tmp_path, quant_type):
    """A tiny random Llama loaded by transformers + bitsandbytes in 4 bit, as the tutorials load one."""
    pytest.importorskip("bitsandbytes")
    tiny_model("llama").save_pretrained(tmp_path / "src")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=config,
                                                             device_map="cpu")


def test_bnb_fp4_model_bridges_to_the_same_bytes(tmp_path):
    """bnb_4bit_quant_type="fp4": the bridge keeps bitsandbytes' FP4 bytes and table."""
    model = bnb_loaded_llama(tmp_path, "fp4")
    packed = model.model.layers[0].mlp.up_proj.weight.data.clone()
    prepare_model(model, r=4, compute_dtype=torch.float32, verbose=False)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.nf4_weight.quant_type == "fp4" and torch.equal(layer.weight, packed)
    reference = dequantised_base(model)
    torch.testing.assert_close(logits(model, tokens()), logits(reference, tokens()), rtol=1e-5, atol=1e-5)


def test_dora_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="DoRA is not supported"):
        prepare_model(tiny_model("llama"), use_dora=True, verbose=False)
    model = prepare_model(tiny_model("llama"), r=4, verbose=False)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora=True \(DoRA\) is not supported"):
        load_adapter(model, tmp_path)


@pytest.mark.parametrize("handed_as", ["optimizers", "optimizer_cls_and_kwargs"])
def test_trainer_with_paged_adamw_saves_the_peft_adapter(handed_as, tmp_path):
    """The README's recipe: Trainer(optimizers=(PagedAdamW32bit(...), None)), or
    optimizer_cls_and_kwargs=(PagedAdamW32bit, {...}), on a prepared model; trainer.save_model
    writes the PEFT adapter, which PEFT loads."""
    from qlora.optim import PagedAdamW32bit

    model = tiny_model("llama")
    if handed_as == "optimizer_cls_and_kwargs":  # and the tutorial's 4-bit loading, through the bridge
        pytest.importorskip("bitsandbytes")
        model.save_pretrained(tmp_path / "src")
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=config,
                                                                  device_map="cpu")
    model = prepare_model(model, r=4, dropout=0.0, compute_dtype=torch.float32, verbose=False)
    ids = tokens(batch=4, seq=16)
    data = [{"input_ids": row, "labels": row} for row in ids]
    kwargs = {"lr": 1e-2, "weight_decay": 0.0}
    if handed_as == "optimizers":
        handed = {"optimizers": (PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], **kwargs),
                                 None)}
    else:
        handed = {"optimizer_cls_and_kwargs": (PagedAdamW32bit, kwargs)}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                                          max_steps=4, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, **handed)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(inner) is PagedAdamW32bit
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    trainer.save_model(str(tmp_path / "out"))
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (tmp_path / "out" / "model.safetensors").exists()
    peft_model = peft.PeftModel.from_pretrained(dequantised_base(model), str(tmp_path / "out")).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model.eval(), ids), rtol=1e-4, atol=1e-4)


def test_merge_back_to_nf4_reports_the_requantisation_error():
    model = prepare_model(tiny_model("llama"), r=4, dropout=0.0, compute_dtype=torch.float32, verbose=False)
    randomise_adapters(model)
    ids = tokens()
    trained = logits(model, ids)
    lossless = logits(_merged_copy(model), ids)
    reports = {}
    assert model.merge_and_unload(nf4=True, report=reports) is model  # PEFT's method on the model
    assert len(reports) == 14 and all(r["rms_error"] > 0 and r["delta_rms"] > 0 for r in reports.values())
    layers = [m for m in model.modules() if isinstance(m, QuantLoRALinear)]
    assert len(layers) == 14 and all(m.r == 0 and not m.merged for m in layers)
    assert not any(p.requires_grad for p in model.parameters())
    # Requantising loses what 4 bits lose: near the trained model, not equal to it.
    torch.testing.assert_close(lossless, trained, rtol=1e-4, atol=1e-4)
    error = float((logits(model, ids) - trained).norm() / trained.norm())
    assert 0 < error < 0.5, error


def _merged_copy(model):
    twin = copy.deepcopy(model)
    merge_and_unload(twin)
    return twin


def test_merged_bitsandbytes_model_is_a_plain_model_again(tmp_path):
    """prepare_model marks a bitsandbytes-loaded model as adapted for transformers (Trainer refuses a
    4-bit model otherwise); merge_and_unload must take the mark away, or transformers' save_pretrained
    would look for PEFT adapters that are gone."""
    model = bnb_loaded_llama(tmp_path, "nf4")
    model = prepare_model(model, r=4, dropout=0.0, compute_dtype=torch.float32, verbose=False)
    assert model._hf_peft_config_loaded
    merge_and_unload(model)
    assert not model._hf_peft_config_loaded
    assert "save_pretrained" not in model.__dict__ and "merge_and_unload" not in model.__dict__


def test_tied_embeddings_are_written_once_in_the_nf4_checkpoint(tmp_path):
    """A tied lm_head shares embed_tokens' storage: safetensors refuses shared tensors, so the base
    checkpoint stores the weight once (transformers re-ties it on load)."""
    from safetensors.torch import load_file
    from qlora.fsdp import save_nf4_checkpoint

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = prepare_model(model, r=4, dropout=0.0, compute_dtype=torch.float32, verbose=False)
    save_nf4_checkpoint(model, tmp_path / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in saved
    assert torch.equal(saved["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach())
