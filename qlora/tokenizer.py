"""Byte-level tokenizer of the embedded model: ids 0-255 are the UTF-8 bytes, then bos, eos and pad."""
from __future__ import annotations

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    """Needs no vocabulary file: any text round-trips exactly, and no byte is ever unknown."""

    bos_token_id, eos_token_id, pad_token_id, vocab_size = BOS, EOS, PAD, VOCAB_SIZE

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids) -> str:
        # Special tokens carry no text; invalid UTF-8 (a sequence cut mid-character) is replaced, not raised.
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")
