"""prepare_model / load_quantized / save_adapter / load_adapter on a tiny transformers Llama."""
import copy
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import hf_families  # noqa: E402
from hf_families import one_thread  # noqa: E402,F401  (tiny matrices: one thread is faster)
from qlora.layer import QuantLoRALinear  # noqa: E402
from qlora.model import enable_checkpointing, load_adapter, load_quantized, prepare_model, save_adapter  # noqa: E402

# name -> (in, out) of the seven linears of each decoder layer, for hidden 64 and intermediate 128.
LINEARS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
           "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
           "mlp.down_proj": (128, 64)}
LAYERS = 2


def tiny_config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=64, tie_word_embeddings=False)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config()).eval()


def tokens(seed=1, batch=2, seq=16):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def prepared(r=8, alpha=16, dropout=0.0, compute_dtype=torch.float32, **kwargs):
    """The tiny Llama with adapters whose B is random, so adapters change the output."""
    model = prepare_model(tiny_llama(), r=r, alpha=alpha, dropout=dropout, compute_dtype=compute_dtype,
                          verbose=False, **kwargs)
    torch.manual_seed(2)
    for layer in model.modules():
        if isinstance(layer, QuantLoRALinear) and layer.r:
            nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model


def dequantised_base(model):
    """A fresh tiny Llama whose target linears hold the prepared model's dequantised NF4 weights."""
    base = tiny_llama()
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLoRALinear):
            with torch.no_grad():
                base.get_submodule(name).weight.copy_(layer.nf4_weight.dequantize(torch.float32))
    return base


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_prepare_model_quantises_all_linear_but_lm_head_and_trains_only_adapters(capsys):
    model = prepare_model(tiny_llama(), r=8, alpha=16)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
    assert names == {f"model.layers.{i}.{n}" for i in range(LAYERS) for n in LINEARS}
    assert type(model.lm_head) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}.weight" for n in names for p in ("lora_A", "lora_B")}
    expected_trainable = LAYERS * sum(8 * (i + o) for i, o in LINEARS.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_trainable
    total = sum(p.numel() for p in tiny_llama().parameters()) + expected_trainable
    assert f"trainable params: {expected_trainable:,} || all params: {total:,}" in capsys.readouterr().out
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    layer = model.model.layers[0].mlp.down_proj
    assert (layer.r, layer.alpha, layer.compute_dtype) == (8, 16, torch.bfloat16)


def test_prepare_model_target_list_and_unmatched_names():
    model = prepare_model(tiny_llama(), target_modules=["q_proj", "v_proj"], verbose=False)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
    assert names == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] matched no nn.Linear.*'down_proj'"):
        prepare_model(tiny_llama(), target_modules=["q_proj", "qkv_proj"], verbose=False)
    # lm_head (in skip) named as a target: adapted, as PEFT does, and left unquantised.
    model = prepare_model(tiny_llama(), target_modules=["lm_head"], verbose=False)
    assert type(model.lm_head.base_layer) is nn.Linear and model.lm_head.r == 64


def test_prepared_model_equals_dequantised_base_until_trained():
    model = prepare_model(tiny_llama(), r=8, compute_dtype=torch.float32, verbose=False)  # B = 0
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(dequantised_base(model), ids), rtol=1e-4, atol=1e-4)


def train(model, steps=20, lr=1e-2):
    return hf_families.train(model, tokens(seed=3, batch=4, seq=32), steps, lr)


def test_tiny_llama_trains_20_steps_and_loss_falls():
    model = prepare_model(tiny_llama(), r=8, alpha=16, dropout=0.05, verbose=False)  # bf16 compute, the default
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen_bytes = model.model.layers[0].self_attn.q_proj.weight.clone()
    losses = train(model)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.9 * losses[0], losses  # measured: 4.87 -> 4.06
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, frozen_bytes)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    def adapter_grads(checkpointing):
        model = prepared()
        if checkpointing:
            enable_checkpointing(model, use_reentrant)
        calls = []
        model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *args: calls.append(1))
        model.train()
        ids = tokens()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    (plain, plain_calls), (checkpointed, checkpointed_calls) = adapter_grads(False), adapter_grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # checkpointing really recomputed the layer
    assert plain.keys() == checkpointed.keys() and len(plain) == 4 * len(LINEARS)
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


def test_save_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    model = prepared(r=8, alpha=32, use_rslora=True)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"], config["bias"]) == \
        ("LORA", 8, 32, True, "none")
    assert config["task_type"] == "CAUSAL_LM"
    assert len(config["target_modules"]) == LAYERS * len(LINEARS)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * LAYERS * len(LINEARS)

    peft_model = peft.PeftModel.from_pretrained(dequantised_base(model), str(tmp_path)).eval()
    ids = tokens()
    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(dequantised_base(model), ids), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=1e-4, atol=1e-4)


def test_peft_saved_adapter_loads_with_the_same_logits(tmp_path):
    model = prepared(r=8, alpha=16)
    config = peft.LoraConfig(r=8, lora_alpha=24, target_modules="all-linear", init_lora_weights=False,
                             lora_dropout=0.0)
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(dequantised_base(model), config).eval()
    peft_model.save_pretrained(str(tmp_path))
    loaded = load_adapter(model, tmp_path)
    assert len(loaded) == LAYERS * len(LINEARS)
    assert model.model.layers[0].self_attn.q_proj.alpha == 24  # alpha comes from the saved config
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-4, atol=1e-4)


def test_load_adapter_of_another_shape_is_a_clear_error(tmp_path):
    save_adapter(prepared(r=8), tmp_path)
    model = prepared(r=4)
    before = model.model.layers[0].self_attn.q_proj.lora_A.weight.clone()
    with pytest.raises(ValueError, match=r"lora_A \[8, \d+\] .*needs lora_A \[4, \d+\]"):
        load_adapter(model, tmp_path)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A.weight, before)  # nothing half-loaded


def test_merge_then_unmerge_on_a_model_restores_bytes_and_logits():
    model = prepared()
    ids = tokens()
    before_logits = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [m for m in model.modules() if isinstance(m, QuantLoRALinear)]
    for layer in layers:
        layer.merge()
    assert not torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           before["model.layers.0.mlp.up_proj.weight"])
    for layer in layers:
        layer.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, ids), before_logits)


def quantised_checkpoint(tmp_path):
    """A qlora checkpoint: the state dict of the tiny Llama with 4-bit linears and no adapters."""
    from safetensors.torch import save_file
    model = prepare_model(tiny_llama(), r=0, compute_dtype=torch.float32, verbose=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    return model


def test_load_quantized_fills_a_meta_model_without_full_precision_weights(tmp_path, monkeypatch):
    reference = quantised_checkpoint(tmp_path)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(tiny_config())

    def no_dequantise(*args, **kwargs):
        raise AssertionError("load_quantized dequantised or quantised a weight")
    monkeypatch.setattr("qlora.nf4.NF4Weight.dequantize", no_dequantise)
    monkeypatch.setattr("qlora.layer.quantize_nf4", no_dequantise)
    load_quantized(model, tmp_path, compute_dtype=torch.float32)
    monkeypatch.undo()

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
    assert len(layers) == LAYERS * len(LINEARS)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for name, layer in layers.items():
        assert torch.equal(layer.weight, reference.get_submodule(name).weight)
    ids = tokens()
    torch.testing.assert_close(logits(model.eval(), ids), logits(reference, ids))
    # Then adapters on top, as for a model quantised in place.
    prepare_model(model, r=4, verbose=False)
    assert model.model.layers[1].mlp.up_proj.r == 4


def test_load_quantized_reads_a_bitsandbytes_quantised_checkpoint(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import save_file
    base = tiny_llama()
    for i in range(LAYERS):
        for name in LINEARS:
            linear = base.model.layers[i].get_submodule(name)
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(base.model.layers[i].get_submodule(parent), child, q.to("cpu"))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(tiny_config())
    load_quantized(model, tmp_path / "model.safetensors", compute_dtype=torch.float32)
    ids = tokens()
    # hidden 64 / intermediate 128 are multiples of the blocksize, where bitsandbytes' CPU path is exact.
    torch.testing.assert_close(logits(model.eval(), ids), logits(base, ids), rtol=1e-4, atol=1e-4)


def test_load_quantized_missing_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file
    quantised_checkpoint(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="no tensor for model.norm.weight"):
        load_quantized(model, tmp_path)


def test_copy_of_prepared_model_is_independent():
    model = prepared()
    twin = copy.deepcopy(model)
    ids = tokens()
    torch.testing.assert_close(logits(twin, ids), logits(model, ids))


class PlainLM(nn.Module):
    """Not a transformers model: an embedding, two MLP blocks run under reentrant checkpointing, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)) for _ in range(2))
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 128)
        self.checkpointing = False

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            if self.checkpointing:
                h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)
            else:
                h = h + block(h)
        return self.lm_head(self.norm(h))


def test_any_torch_model_trains_adapters_under_reentrant_checkpointing():
    def adapter_grads(checkpointing):
        torch.manual_seed(0)
        model = prepare_model(PlainLM().bfloat16(), r=4, dropout=0.0, compute_dtype=torch.float32, verbose=False)
        for layer in model.modules():
            if isinstance(layer, QuantLoRALinear):
                nn.init.normal_(layer.lora_B.weight, std=0.05)
        model.checkpointing = checkpointing
        model(tokens()).float().logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model

    plain, model = adapter_grads(False)
    assert type(model.lm_head) is nn.Linear and model.norm.weight.dtype == torch.float32
    assert model.embed.weight.dtype == torch.bfloat16 and not model.embed.weight.requires_grad
    # Without the embedding hook, reentrant checkpointing of frozen-input blocks yields no gradients.
    checkpointed, _ = adapter_grads(True)
    assert len(plain) == 8 and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


def test_prepare_model_with_bfloat16_adapters_trains_in_bfloat16():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    model = prepare_model(base, r=8, alpha=16, dropout=0.0, skip=(), adapter_dtype=torch.bfloat16, verbose=False)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert len(adapters) == 4 and all(p.dtype == torch.bfloat16 for p in adapters)
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(5, 64)
    out = model(x)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0 for p in adapters)

    def reference(layer, h):  # float64: dequantised base + scale * B A, from the bf16 adapter values
        w = layer.nf4_weight.dequantize(torch.float32).double()
        a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
        return h @ (w + (16 / 8) * b @ a).T + layer.bias.double()

    expected = reference(model[2], torch.relu(reference(model[0], x.double())))
    assert (out.double() - expected).norm() / expected.norm() < 2e-2  # bf16 compute


class ComputedBuffer(nn.Module):
    """A linear plus a non-persistent buffer its _init_weights forgets to compute."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.register_buffer("inv_freq", torch.arange(8.0), persistent=False)

    def _init_weights(self, module):
        pass


def test_load_quantized_fails_loudly_on_a_buffer_nothing_computes(tmp_path):
    from safetensors.torch import save_file
    source = ComputedBuffer()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = ComputedBuffer()
    with pytest.raises(ValueError, match=r"_init_weights did not compute the buffers inv_freq"):
        load_quantized(model, tmp_path)
    del ComputedBuffer._init_weights  # without an _init_weights nothing can compute it either
    try:
        with torch.device("meta"):
            model = ComputedBuffer()
        with pytest.raises(ValueError, match=r"still on the meta device after loading: inv_freq"):
            load_quantized(model, tmp_path)
    finally:
        ComputedBuffer._init_weights = lambda self, module: None
