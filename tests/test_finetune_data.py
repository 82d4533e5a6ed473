"""finetune's data: chat records through the template with loss on the assistant's tokens only,
packed text unchanged, padded chat batches, the held-out loss over labelled positions, bad records."""
import json

import pytest
import torch

from qlora.errors import UserError
from qlora.finetune_data import (IGNORE, TokenData, batch_at, encode_chat, held_out_loss, read_records,
                                 split_held_out, tokenize)
from qlora.tokenizer import BOS, EOS, ByteTokenizer

pytest.importorskip("transformers")
from test_finetune_hf import word_tokenizer  # noqa: E402

CONVERSATION = [
    {"role": "system", "content": "the cat"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello how are you"},
    {"role": "user", "content": "what is your name"},
    {"role": "assistant", "content": "my name is bob"},
    {"role": "user", "content": "thanks"},
]


def test_chat_labels_are_the_assistant_turns_only():
    tokenizer = word_tokenizer()
    ids, labels = encode_chat(tokenizer, CONVERSATION)
    # Written out by hand from the template: each assistant turn is trained with its <end>, nothing else is.
    words = ("<system> the cat <end> <user> hello <end> <assistant> hello how are you <end> "
             "<user> what is your name <end> <assistant> my name is bob <end> <user> thanks <end>").split()
    trained = [False] * 8 + [True] * 5 + [False] * 7 + [True] * 5 + [False] * 3
    assert ids == tokenizer.convert_tokens_to_ids(words)
    assert labels == [i if t else IGNORE for i, t in zip(ids, trained)]
    # The same ids as the whole conversation tokenised at once (what apply_chat_template gives).
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]


def test_chat_batches_pad_on_the_right_and_are_a_function_of_the_step():
    tokenizer = word_tokenizer()
    short = CONVERSATION[:3]
    data = tokenize([short, CONVERSATION], tokenizer, seq=100)
    assert data.starts == [0, 13, 13 + 28]
    ids, labels = batch_at(data, step=0, batch=6, seq=100, seed=0, pad_id=tokenizer.pad_token_id)
    again = batch_at(data, step=0, batch=6, seq=100, seed=0, pad_id=tokenizer.pad_token_id)
    assert torch.equal(ids, again[0]) and torch.equal(labels, again[1])
    assert ids.shape == (6, 28)  # both conversations are drawn among 6 rows (seed 0)
    for row_ids, row_labels in zip(ids, labels):
        n = 13 if row_ids[13] == tokenizer.pad_token_id else 28
        example = slice(0, 13) if n == 13 else slice(13, 41)
        assert torch.equal(row_ids[:n], data.ids[example]) and torch.equal(row_labels[:n], data.labels[example])
        assert (row_ids[n:] == tokenizer.pad_token_id).all() and (row_labels[n:] == IGNORE).all()
    # Cut at seq 8, the long one has no answer token left (its first is the 9th): it is left out.
    cut = tokenize([CONVERSATION, [{"role": "user", "content": "hello"}, *short[2:]]], tokenizer, seq=8)
    assert cut.starts == [0, 9]
    assert torch.equal(batch_at(cut, step=3, batch=2, seq=8, seed=1)[0], cut.ids[None, :8].expand(2, 8))


def test_text_is_packed_and_trained_on_every_token():
    data = tokenize(["ab", "c"], ByteTokenizer())
    assert data.ids.tolist() == [BOS, 97, 98, EOS, BOS, 99, EOS] and data.starts is None
    ids, labels = batch_at(data, step=5, batch=3, seq=4, seed=2)
    assert ids is labels and ids.shape == (3, 4)
    assert all(any(torch.equal(row, data.ids[s:s + 4]) for s in range(4)) for row in ids)


class _Bigram(torch.nn.Module):
    """logits[t] = table[ids[t]]: a model whose loss is easy to compute by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids):
        return type("Out", (), {"logits": self.table[ids]})


def test_held_out_loss_counts_only_labelled_positions():
    ids = torch.tensor([5, 1, 2, 3, 4, 6, 0, 7])
    labels = torch.tensor([IGNORE, IGNORE, 2, 3, IGNORE, IGNORE, 0, 7])
    data = TokenData(ids, labels, starts=[0, 4, 8])
    model = _Bigram(8)
    log_probs = torch.log_softmax(model.table.detach().double(), -1)
    # Targets: position 2 (from 1), 3 (from 2) in the first example; 6 (from 6), 7 (from 0) in the second.
    expected = -(log_probs[1, 2] + log_probs[2, 3] + log_probs[6, 0] + log_probs[0, 7]) / 4
    assert held_out_loss(model, data, seq=4, device="cpu") == pytest.approx(float(expected), rel=1e-5)


def test_records_text_or_messages_and_one_line_errors(tmp_path):
    good = tmp_path / "chat.jsonl"
    good.write_text("\n".join(json.dumps({"messages": CONVERSATION}) for _ in range(3)) + "\n")
    records = read_records(good)
    assert records == [CONVERSATION] * 3
    assert split_held_out(records) == ([CONVERSATION] * 2, [CONVERSATION])
    with pytest.raises(UserError, match="at least 2 conversations"):
        split_held_out(records[:1])
    cases = {
        '{"text": "a"}\n{"messages": [{"role": "assistant", "content": "b"}]}': r"bad\.jsonl:2: mixes",
        '{"messages": [{"role": "user", "content": "b"}]}': r"bad\.jsonl:1: no \"assistant\" message",
        '{"messages": [{"role": "user"}]}': r"bad\.jsonl:1: messages\[0\] must be an object",
        '{"messages": []}': r"bad\.jsonl:1: \"messages\" must be a non-empty list",
    }
    bad = tmp_path / "bad.jsonl"
    for content, message in cases.items():
        bad.write_text(content + "\n")
        with pytest.raises(UserError, match=message):
            read_records(bad)
    with pytest.raises(UserError, match=r"chat\.jsonl with x, conversation 1: chat data needs a tokenizer"):
        tokenize(records, ByteTokenizer(), seq=64, where="chat.jsonl with x")
