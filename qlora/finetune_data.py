"""Training data for `qlora finetune`: text or chat records -> token ids and labels -> batches.

Plain text ({"text": ...} lines or a .txt file) is packed into one token stream and trained on every
token, in random windows. Chat records ({"messages": [{"role", "content"}, ...]}) are rendered with the
tokenizer's chat template; only the assistant's turns (their content and the template's end-of-turn
tokens) carry loss, every other label is IGNORE. Each conversation is one row, cut at --seq and padded
on the right: causal attention never looks ahead, so right padding needs no attention mask.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.errors import UserError

HELD_OUT_FRACTION = 0.2
IGNORE = -100  # the label of a position that carries no loss (PyTorch's and transformers' ignore_index)


# ---- reading -------------------------------------------------------------------------------------

def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: \"messages\" must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: messages[{index}] must be an object with string \"role\" and \"content\"")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no \"assistant\" message, so nothing to learn")
    return messages


def read_records(path: Path) -> list[str] | list[list[dict]]:
    """A .txt file is one document; a .jsonl file holds one record per line, either all {"text": str}
    (documents) or all {"messages": [...]} (conversations)."""
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise UserError(f"{path}: data file is empty")
    if path.suffix != ".jsonl":
        return [raw]
    records, kinds = [], set()
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        if isinstance(record, dict) and "messages" in record:
            kinds.add("messages")
            records.append(_check_messages(record["messages"], where))
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            kinds.add("text")
            if record["text"].strip():
                records.append(record["text"])
        else:
            raise UserError(f"{where}: expected an object with a string \"text\" field or a \"messages\" list")
        if len(kinds) > 1:
            raise UserError(f"{where}: mixes \"text\" and \"messages\" records; use one kind per file")
    if not records:
        raise UserError(f"{path}: no non-empty \"text\" field in any line")
    return records


def split_held_out(docs: list) -> tuple[list, list]:
    """Hold out the last fifth: whole records when there are several, else the trailing paragraphs
    of the single text (cut at a blank line, or a newline, near the 80% mark)."""
    if len(docs) >= 5 or (docs and not isinstance(docs[0], str)):
        if len(docs) < 2:
            raise UserError("chat data needs at least 2 conversations (the last fifth is held out)")
        cut = len(docs) - max(1, round(len(docs) * HELD_OUT_FRACTION))
        return docs[:cut], docs[cut:]
    text = "\n\n".join(docs)
    mark = int(len(text) * (1 - HELD_OUT_FRACTION))
    cut = text.rfind("\n\n", 0, mark)
    if cut < len(text) // 2:
        cut = text.rfind("\n", 0, mark)
    if cut < len(text) // 2:
        cut = mark
    return [text[:cut]], [text[cut:].lstrip("\n")]


# ---- tokenising ----------------------------------------------------------------------------------

def encode(tokenizer, text: str) -> list[int]:
    """A document's ids, starting with bos (where the tokenizer adds it) and ending with eos."""
    from qlora.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text, bos=True, eos=True)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises its own kinds (and templates raise_exception()); one line suffices
        raise UserError(f"the tokenizer's chat template failed ({type(err).__name__}: {err})") from None


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation through the chat template: labels are the ids on each
    assistant turn (what the template adds after the generation prompt) and IGNORE elsewhere.

    Each part is tokenised on its own, as at inference, where the prompt (ending with the generation
    prompt) is tokenised and the answer generated after it."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat data needs a tokenizer with a chat_template (tokenizer_config.json has none)")
    ids: list[int] = []
    labels: list[int] = []
    done = ""

    def add(text: str, trained: bool) -> None:
        part = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(part)
        labels.extend(part if trained else [IGNORE] * len(part))

    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        full = _render(tokenizer, messages[:index + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("the tokenizer's chat template rewrites earlier turns, so the assistant's tokens "
                            "cannot be told apart; use {\"text\": ...} records instead")
        add(prompt[len(done):], trained=False)
        add(full[len(prompt):], trained=True)
        done = full
    rest = _render(tokenizer, messages, add_generation_prompt=False)
    add(rest[len(done):] if rest.startswith(done) else "", trained=False)
    return ids, labels


@dataclass
class TokenData:
    """Token ids with their labels (IGNORE where no loss). starts is None for a packed text stream
    (windows may start anywhere); else the start of every example, then the end of the last."""

    ids: torch.Tensor
    labels: torch.Tensor
    starts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, seq: int) -> list[tuple[int, int]]:
        """(start, end) of each example cut at seq tokens."""
        return [(s, min(e, s + seq)) for s, e in zip(self.starts[:-1], self.starts[1:])]


def tokenize(docs: list, tokenizer, seq: int | None = None, where: str = "chat data") -> TokenData:
    """Documents as one token stream, each starting with bos and ending with eos (packed training);
    conversations as one example each, those with no assistant token within seq left out.
    where: what an error message names first (the data file and the tokenizer's model)."""
    if not docs or isinstance(docs[0], str):
        ids = [i for doc in docs for i in encode(tokenizer, doc)]
        stream = torch.tensor(ids, dtype=torch.long)
        return TokenData(stream, stream)
    ids, labels, starts = [], [], [0]
    for index, messages in enumerate(docs):
        try:
            example_ids, example_labels = encode_chat(tokenizer, messages)
        except UserError as err:
            raise UserError(f"{where}, conversation {index + 1}: {err}") from None
        if seq is not None and all(label == IGNORE for label in example_labels[1:seq]):
            continue  # its answer starts beyond seq: it would teach nothing
        ids += example_ids
        labels += example_labels
        starts.append(len(ids))
    return TokenData(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), starts)


# ---- batches and evaluation ----------------------------------------------------------------------

def batch_at(data: TokenData, step: int, batch: int, seq: int, seed: int,
             pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) for a step, a pure function of (seed, step): a resumed run sees the same batches.
    Random windows of a packed stream; random examples otherwise, padded on the right."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if data.starts is None:
        starts = torch.randint(0, len(data) - seq + 1, (batch,), generator=generator)
        ids = torch.stack([data.ids[s:s + seq] for s in starts.tolist()])
        return ids, ids
    rows = data.rows(seq)
    chosen = [rows[i] for i in torch.randint(0, len(rows), (batch,), generator=generator).tolist()]
    width = max(e - s for s, e in chosen)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    for row, (s, e) in enumerate(chosen):
        ids[row, :e - s], labels[row, :e - s] = data.ids[s:e], data.labels[s:e]
    return ids, labels


def eval_windows(data: TokenData, seq: int):
    """(inputs, targets) pairs covering the data once: consecutive windows of a packed stream (each
    window's last target included), or every example cut at seq tokens."""
    if data.starts is None:
        for start in range(0, len(data) - 1, seq):
            window = data.ids[start:start + seq + 1]
            if len(window) < 2:
                break
            yield window[:-1], window[1:]
    else:
        for s, e in data.rows(seq):
            yield data.ids[s:e - 1], data.labels[s + 1:e]


@torch.no_grad()
def held_out_loss(model, data: TokenData, seq: int, device) -> float:
    """Token-weighted mean next-token loss over the positions that carry a label."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in eval_windows(data, seq):
        logits = model(inputs[None].to(device)).logits
        targets = targets.to(device)
        loss = torch.nn.functional.cross_entropy(logits[0].float(), targets, reduction="sum", ignore_index=IGNORE)
        total += loss.item()
        count += int((targets != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)
