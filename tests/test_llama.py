"""qlora.llama against transformers' LlamaForCausalLM, loaded from the same state dict."""
import json

import pytest
import torch

from qlora.llama import ConfigError, LlamaConfig, build_model, causal_lm_loss, from_pretrained, load_config
from qlora.tokenizer import BOS, EOS, ByteTokenizer

transformers = pytest.importorskip("transformers")

TINY = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False)


def hf_and_ours(dtype=torch.float32, **overrides):
    raw = {**TINY, **overrides}
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**raw)).to(dtype).eval()
    with torch.no_grad():  # norms are all ones at init: perturb them so their weights are tested too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = build_model(LlamaConfig.from_dict(hf.config.to_dict()), device="cpu", dtype=dtype).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and not missing
    return hf, ours


@pytest.mark.parametrize("overrides", [
    {},  # GQA (4 query heads on 2 KV heads)
    {"num_key_value_heads": 4, "tie_word_embeddings": True},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, "rope_theta": 500000.0},
])
def test_logits_match_transformers_float32(overrides):
    hf, ours = hf_and_ours(**overrides)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_logits_and_loss_match_transformers_bfloat16():
    hf, ours = hf_and_ours(dtype=torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (1, 33), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        expected = hf(input_ids=ids, labels=labels)
        got = ours(ids, labels=labels)
    # Same operations in the same order: bf16 logits agree to within a couple of ulps.
    torch.testing.assert_close(got.logits.float(), expected.logits.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.loss, expected.loss.float(), rtol=1e-3, atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = hf_and_ours()
    ours.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = ckpt
        ours(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_loss_is_shifted_cross_entropy():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[1, 2, -100, 4]])
    # position 0 predicts 2, position 1 is ignored (label -100), position 2 predicts 4
    expected = -(torch.log_softmax(logits[0, 0], -1)[2] + torch.log_softmax(logits[0, 2], -1)[4]) / 2
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)


def test_from_pretrained_reads_a_transformers_directory(tmp_path):
    hf, _ = hf_and_ours()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_non_llama_configs_are_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ConfigError, match="'gpt2' is not a Llama-family model"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path / "nowhere")


def test_context_length_is_enforced():
    _, ours = hf_and_ours()
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))


def test_a_padding_mask_is_refused_not_ignored():
    _, ours = hf_and_ours()
    ids = torch.ones(2, 8, dtype=torch.long)
    ours(ids, attention_mask=torch.ones(2, 8, dtype=torch.long))  # all ones: nothing to mask
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    with pytest.raises(ValueError, match=r"attention_mask of shape \[2, 8\] masks out tokens"):
        ours(ids, attention_mask=mask)


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "déjà vu — 日本語 \x00 end"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and max(ids[1:-1]) < 256
    assert tok.decode(ids) == text
