"""qlora generate: greedy decoding with the KV cache equals a no-cache dequantised reference (qlora's
Llama and transformers models, with and without an adapter); the cache itself; sampling; the CLI."""
import copy

import pytest
import torch
import torch.nn.functional as F

from qlora.cli import main
from qlora.generate import TextStream, generate, generate_ids, load, next_token
from qlora.layer import QuantLoRALinear
from qlora.llama import KVCache, LlamaConfig, build_model
from qlora.model import prepare_model, save_adapter
from qlora.tokenizer import ByteTokenizer


class _DequantisedLinear(torch.nn.Module):
    """W dequantised (plus the adapter's scale * B @ A) in float32, applied as QuantLoRALinear applies it."""

    def __init__(self, layer: QuantLoRALinear):
        super().__init__()
        weight = layer.nf4_weight.dequantize(torch.float32)
        if layer.adapter_active:
            weight = weight + layer.delta_weight(torch.float32)
        self.weight = weight
        self.bias = None if layer.bias is None else layer.bias.detach().float()

    def forward(self, x):
        return F.linear(x.float(), self.weight, self.bias).to(x.dtype)


def dequantised_copy(model):
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, QuantLoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, _DequantisedLinear(module))
    return reference


@torch.no_grad()
def greedy_reference(model, prompt_ids, new_tokens):
    """Greedy decoding the plain way: the whole sequence through the model at every step."""
    ids = torch.tensor([prompt_ids])
    for _ in range(new_tokens):
        ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids[0, len(prompt_ids):].tolist()


def _random_adapter(model, directory, seed=0):
    prepare_model(model, r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, QuantLoRALinear):
            layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.3
    save_adapter(model, directory)


def test_kv_cache_in_chunks_gives_the_full_forward_logits():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = build_model(config, device="cpu", dtype=torch.float32).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)  # nn.Linear's init, but the embedding and norms too: not all ones
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache()
        parts = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 5), (5, 9), (9, 10), (10, 11))]
    assert len(cache) == 11
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        model(torch.zeros(1, 60, dtype=torch.long), past_key_values=cache)


def test_embedded_llama_greedy_with_cache_equals_the_dequantised_reference(nf4_checkpoint):
    tokenizer = ByteTokenizer()
    prompt = "import os\ndef "
    prompt_ids = tokenizer.encode(prompt, bos=True)
    net, _, _ = load(nf4_checkpoint, device="cpu", compute_dtype="bfloat16")  # the bf16 checkpoint, bf16 compute
    pieces, rows = [], []
    hooks = [m.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[:-1].numel()))
             for m in net.modules() if isinstance(m, QuantLoRALinear)]
    result = generate(prompt, model=net, tokenizer=tokenizer, max_new_tokens=8, stream=pieces.append)
    for hook in hooks:
        hook.remove()
    # The prompt once, then each new token alone: M = 1 rows, nf4_linear's GEMV path on a GPU.
    assert rows == [len(prompt_ids)] * len(hooks) + [1] * (7 * len(hooks))
    expected = greedy_reference(dequantised_copy(net), prompt_ids, 8)
    assert result.token_ids == expected
    assert "".join(pieces) == result.text == tokenizer.decode(expected) and result.tokens_per_second > 0


@pytest.mark.parametrize("model_type", ["qwen2"])
def test_transformers_model_greedy_with_cache_equals_the_dequantised_reference(tmp_path, model_type):
    pytest.importorskip("transformers")
    from test_finetune_hf import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / model_type, model_type, seed=1)
    net, tokenizer, context = load(model_dir, device="cpu", compute_dtype="float32")
    assert context == 128
    prompt = "hello how are you"
    prompt_ids = tokenizer(prompt)["input_ids"]
    cached = list(generate_ids(net, prompt_ids, 12))
    assert cached == greedy_reference(dequantised_copy(net), prompt_ids, 12)
    assert len(set(cached)) > 1  # not a degenerate repetition of one token

    # With an adapter, loaded from its directory as the CLI does.
    _random_adapter(net, tmp_path / "adapter")
    adapted = generate(prompt, model=model_dir, adapter=tmp_path / "adapter", max_new_tokens=12,
                       compute_dtype="float32", device="cpu")
    assert adapted.token_ids == greedy_reference(dequantised_copy(net), prompt_ids, 12) != cached


def test_sampling_keeps_the_top_p_nucleus_and_follows_the_seed():
    logits = torch.tensor([0.5, 0.3, 0.2, 1e-9]).log()
    assert next_token(logits) == 0
    nucleus = [next_token(logits, 1.0, 0.6, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(nucleus) == {0, 1}  # 0.5 < 0.6, so the second token is needed; the third never is
    everything = [next_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(everything) == {0, 1, 2}
    assert abs(everything.count(0) / 200 - 0.5) < 0.12
    generator_a, generator_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [next_token(logits, 0.7, 0.9, generator_a) for _ in range(20)] == \
           [next_token(logits, 0.7, 0.9, generator_b) for _ in range(20)]


def test_text_stream_holds_back_half_characters():
    stream = TextStream(ByteTokenizer())
    assert [stream.push(b) for b in "aé".encode()] == ["a", "", "é"]


def test_cli_generates_from_the_embedded_model_and_refuses_bad_input(capsys, tmp_path):
    assert main(["generate", "--prompt", "def ", "--max-new-tokens", "6", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and len(out) > len("def \n")
    assert "6 tokens" in err and "tokens/s" in err
    for argv, message in ((["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                          (["--model", str(tmp_path / "nope")], "model directory not found"),
                          (["--top-p", "0"], "--top-p in (0, 1]"),
                          (["--adapter", str(tmp_path)], "no adapter_config.json there")):
        assert main(["generate", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


def test_chat_prompt_goes_through_the_template_and_the_byte_tokenizer_refuses_it():
    pytest.importorskip("transformers")
    from qlora.errors import UserError
    from qlora.generate import encode_prompt
    from test_finetune_hf import word_tokenizer

    tokenizer = word_tokenizer()
    assert encode_prompt(tokenizer, "hello", chat=True) == tokenizer.convert_tokens_to_ids(
        ["<user>", "hello", "<end>", "<assistant>"])
    assert encode_prompt(tokenizer, "hello how") == tokenizer.convert_tokens_to_ids(["hello", "how"])
    with pytest.raises(UserError, match="no chat template"):
        encode_prompt(ByteTokenizer(), "hello", chat=True)
