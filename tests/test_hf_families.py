"""The issue-10 matrix: tiny random-init models of every common family, in float32 and bfloat16,
the way users bring them: `qlora quantize` -> load with qlora and with transformers + bitsandbytes
-> logits within the error transformers + bitsandbytes reach on the same model -> prepare_model
(also from a bitsandbytes-loaded model, reusing its bytes) -> a few training steps lower the loss
-> generate (KV cache) matches the dequantised reference -> save_pretrained, load into PEFT, merge."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from hf_families import FAMILIES, dequantised_base, logits, one_thread, tiny_config, tiny_model, tokens, train  # noqa: E402,F401
from qlora.convert import quantize_checkpoint  # noqa: E402
from qlora.layer import QuantLoRALinear  # noqa: E402
from qlora.merge import merge_and_unload  # noqa: E402
from qlora.model import load_quantized, prepare_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rel_error(got, want):
    return float((got - want).norm() / want.norm())


def bnb_config(dtype):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def dequantised_reference(model):
    """The model with every adapted layer made plain in full precision: dequantised W + scale B A."""
    twin = copy.deepcopy(model)
    merge_and_unload(twin)
    return twin


def greedy_without_cache(model, prompt, n):
    ids = prompt
    for _ in range(n):
        next_id = logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantize_load_prepare_train_generate_save_merge(family, dtype_name, tmp_path, monkeypatch):
    dtype = DTYPES[dtype_name]
    original = tiny_model(family, dtype)
    src, dst = tmp_path / "src", tmp_path / "nf4"
    original.save_pretrained(src)
    quantize_checkpoint(src, dst, compute_dtype=dtype_name.replace("fp32", "float32").replace("bf16", "bfloat16"),
                        progress=False)
    ids = tokens()
    want = logits(original, ids)

    # The error transformers + bitsandbytes reach quantising the same model in this run.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config(dtype),
                                                               device_map="cpu", dtype=dtype)
    bnb_error = rel_error(logits(theirs, ids), want)
    # qlora's checkpoint loaded by transformers + bitsandbytes...
    hf_loaded = transformers.AutoModelForCausalLM.from_pretrained(dst, device_map="cpu", dtype=dtype)
    # (prepare_model on it, before any forward, reuses its bytes: nothing is (re)quantised)
    bridged = copy.deepcopy(hf_loaded)
    bnb_bytes = {n: m.weight.data.clone() for n, m in bridged.named_modules() if hasattr(m.weight if hasattr(
        m, "weight") else None, "quant_state")}
    monkeypatch.setattr("qlora.model.quantize_nf4", lambda *a, **k: pytest.fail("requantised a bnb layer"))
    prepare_model(bridged, r=4, dropout=0.0, compute_dtype=dtype, verbose=False)
    monkeypatch.undo()
    assert bnb_bytes and all(torch.equal(bridged.get_submodule(n).weight, b) for n, b in bnb_bytes.items())
    hf_error = rel_error(logits(hf_loaded, ids), want)
    # ... and by qlora into a model built on the meta device.
    with torch.device("meta"):
        ours = transformers.AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    load_quantized(ours, dst, compute_dtype=dtype)
    ours.eval()
    loaded = logits(ours, ids)
    our_error = rel_error(loaded, want)
    slack = 0.02 if dtype == torch.bfloat16 else 0.002
    assert 0 < bnb_error < 0.5, bnb_error
    assert hf_error <= 1.25 * bnb_error + slack, (hf_error, bnb_error)
    assert our_error <= 1.25 * bnb_error + slack, (our_error, bnb_error)
    for name, buffer in theirs.named_buffers():  # computed buffers (embed_scale, inv_freq) as from_pretrained's
        if not hasattr(buffer, "quant_state"):
            assert ours.get_buffer(name).dtype == buffer.dtype and torch.equal(ours.get_buffer(name), buffer), name

    # The bridged model holds the same bytes as the one qlora loaded: the same logits. (bitsandbytes'
    # own CPU forward rounds absmax to bfloat16, so it is not the reference here.)
    n_linears = sum(isinstance(m, QuantLoRALinear) for m in bridged.modules())
    assert n_linears == sum(isinstance(m, QuantLoRALinear) for m in ours.modules()) == len(bnb_bytes)
    torch.testing.assert_close(logits(bridged, ids), loaded, rtol=1e-5, atol=1e-5)
    # After a forward, bitsandbytes' CPU backend has repacked its layers (absmax rounded to bfloat16);
    # the bridge unpacks them.
    prepare_model(hf_loaded, r=4, dropout=0.0, compute_dtype=dtype, verbose=False)
    assert rel_error(logits(hf_loaded, ids), loaded) < max(slack, 0.01)

    # Training the qlora-loaded model lowers the loss.
    prepare_model(ours, r=8, alpha=16, dropout=0.0, compute_dtype=dtype, verbose=False)
    losses = train(ours, tokens(seed=3, batch=2, seq=24), steps=6, lr=2e-2)
    ours.eval()
    assert losses[-1] < losses[0] - 0.05, losses

    # generate (KV cache) == greedy decoding of the dequantised, merged reference without cache.
    prompt = ids[:1, :5]
    generated = ours.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True,
                              pad_token_id=0, attention_mask=torch.ones_like(prompt))
    reference = dequantised_reference(ours).eval()
    torch.testing.assert_close(generated, greedy_without_cache(reference, prompt, 6), rtol=0, atol=0)

    # save_pretrained writes the PEFT adapter; PEFT loads it on the dequantised base: same logits.
    trained = logits(ours, ids)
    ours.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    peft_model = peft.PeftModel.from_pretrained(dequantised_base(ours), str(tmp_path / "adapter")).eval()
    assert rel_error(logits(peft_model, ids), trained) < slack + 1e-5
    # And the whole-model merge keeps the trained function.
    merge_and_unload(ours)
    assert not any(isinstance(m, QuantLoRALinear) for m in ours.modules())
    assert rel_error(logits(ours, ids), trained) < slack + 1e-5
