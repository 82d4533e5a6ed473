"""qlora finetune on transformers models as users bring them: tiny random-init qwen2, phi3 and gpt2
saved with save_pretrained, with a byte-level BPE tokenizer trained offline that has a chat template
(what AutoTokenizer rebuilds as Qwen2Tokenizer for qwen2 keeps working)."""
import json

import pytest
import torch

from qlora.finetune import finetune
from qlora.finetune_model import describe_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the cat sat on mat a dog ran to park hello how are you i am fine thanks what is your name my bob".split()
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<user>", "<assistant>", "<system>", "<end>"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
QA = [("hello", "hello how are you"), ("how are you", "i am fine thanks"), ("what is your name", "my name is bob")]
# Phi3's default pad_token_id (32000) lies outside a tiny vocabulary.
IDS = dict(vocab_size=320, bos_token_id=2, eos_token_id=3, pad_token_id=1)
CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=128, **IDS),
    "phi3": lambda: transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128, **IDS),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **IDS),
}


def _wrap(model):
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    return tokenizer


def word_tokenizer():
    """One token per space-separated word: a hand-built expectation is easy to write."""
    vocab = {word: i for i, word in enumerate(SPECIALS + WORDS)}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return _wrap(model)


def bpe_tokenizer():
    """Byte-level BPE (as GPT-2, Llama 3 and Qwen2 use) with 300 tokens, trained on WORDS."""
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return _wrap(model)


def tiny_model_dir(directory, model_type: str, dtype=torch.float32, seed: int = 0):
    """A random-init model of the family and the tiny tokenizer, saved as transformers saves them."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[model_type]()).to(dtype)
    model.save_pretrained(directory)
    bpe_tokenizer().save_pretrained(directory)
    return directory


def write_chat(path, conversations: int = 10):
    with open(path, "w") as f:
        for i in range(conversations):
            question, answer = QA[i % len(QA)]
            messages = [{"role": "system", "content": "the cat"}, {"role": "user", "content": question},
                        {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_text(path):
    path.write_text("\n".join("the cat sat on the mat" if i % 2 else "a dog ran to the park" for i in range(60)))
    return path


@pytest.mark.parametrize("model_type, dtype, compute_dtype, data_kind", [
    ("qwen2", torch.float32, "bfloat16", "chat"),
    ("phi3", torch.float32, "float32", "text"),
    pytest.param("qwen2", torch.bfloat16, "bfloat16", "chat"),
    pytest.param("gpt2", torch.float32, "float32", "chat"),
])
def test_finetune_of_transformers_models_lowers_held_out_loss(tmp_path, model_type, dtype, compute_dtype, data_kind):
    model_dir = tiny_model_dir(tmp_path / model_type, model_type, dtype)
    assert not describe_model(model_dir).native  # built by transformers, not qlora's Llama
    data = write_chat(tmp_path / "chat.jsonl") if data_kind == "chat" else write_text(tmp_path / "notes.txt")
    report = finetune(model=model_dir, data=data, out=tmp_path / "out", steps=6, r=8, lr=1e-2, seq=32, batch=4,
                      compute_dtype=compute_dtype, progress=False)
    # Random init: about ln(320) = 5.8 before; both data sets are learnable.
    assert report["held_out_loss_after"] < report["held_out_loss_before"] - 0.3, report
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["target_modules"]


def test_chat_data_with_a_tokenizer_without_chat_template_is_one_line(tmp_path, capsys):
    from qlora.cli import main

    model_dir = tiny_model_dir(tmp_path / "qwen2", "qwen2")
    tokenizer = bpe_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    data = write_chat(tmp_path / "chat.jsonl")
    capsys.readouterr()  # transformers' own progress lines so far
    assert main(["finetune", "--no-progress", "--model", str(model_dir), "--data", str(data),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat data needs a tokenizer with a chat_template" in err[0], err
