"""The LoRA settings' ranges, in one wording for prepare_model, `qlora finetune` and `qlora bench-memory`.

PEFT refuses a rank below 1 and nn.Dropout a probability outside [0, 1]; at 1 the adapters would see
only zeros, so dropout must be below 1 (QuantLoRALinear's rule). PEFT accepts any lora_alpha, and so
does prepare_model (a negative alpha flips the update's sign, 0 switches the adapter off); prepare_model
also takes r=0, which quantises the targets without adapters (what load_adapter then fills). From the
command line, where a run is meant to train something, the rank must be at least 1 and alpha above 0.
NaN or infinite values are refused everywhere: they would train to NaN.
"""
from __future__ import annotations

import math
import numbers

from qlora.errors import UserError

RANK_RULE = "must be a whole number, at least {least}"
ALPHA_RULE = "must be a finite number"
DROPOUT_RULE = "must be at least 0 and below 1"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_lora_settings(r=None, alpha=None, dropout=None, *, cli: bool = False) -> None:
    """Raise for the first setting out of range (None: not checked): ValueError naming `r=...` for the
    Python API, or with cli=True a UserError naming `--r ...`, with the command line's stricter ranges."""
    def fail(name: str, value, rule: str):
        raise (UserError(f"--{name} {value}: {rule}") if cli else ValueError(f"{name}={value!r}: {rule}"))

    least = 1 if cli else 0
    if r is not None and (not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < least):
        fail("r", r, RANK_RULE.format(least=least) + ("" if cli else " (0: quantise without adapters)"))
    if alpha is not None and not (_is_number(alpha) and math.isfinite(alpha) and (alpha > 0 or not cli)):
        fail("alpha", alpha, ALPHA_RULE + (" above 0" if cli else ""))
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):  # also refuses NaN
        fail("dropout", dropout, DROPOUT_RULE)
