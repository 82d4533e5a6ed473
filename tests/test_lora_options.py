"""qlora/lora_options.py: the LoRA settings' ranges, one line in the same words from `qlora finetune` and
`qlora bench-memory`, and from prepare_model (PEFT's ranges where PEFT accepts something)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora.cli import main
from qlora.model import prepare_model

BAD = [  # (option, value, the words both commands print)
    ("--r", "0", "--r 0: must be a whole number, at least 1"),
    ("--r", "-3", "--r -3: must be a whole number, at least 1"),
    ("--dropout", "1", "--dropout 1.0: must be at least 0 and below 1"),
    ("--dropout", "-0.5", "--dropout -0.5: must be at least 0 and below 1"),
    ("--dropout", "nan", "--dropout nan: must be at least 0 and below 1"),
]
FINETUNE_ONLY = [  # bench-memory has no --alpha: its prediction does not depend on it
    ("--alpha", "0", "--alpha 0.0: must be a finite number above 0"),
    ("--alpha", "-16", "--alpha -16.0: must be a finite number above 0"),
    ("--alpha", "nan", "--alpha nan: must be a finite number above 0"),
]


def error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("option, value, words", BAD + FINETUNE_ONLY)
def test_finetune_refuses_each_bad_setting_in_one_line(capsys, tmp_path, option, value, words):
    err = error_line(capsys, ["finetune", "--no-progress", "--out", str(tmp_path / "out"), option, value])
    assert err == f"qlora finetune: error: {words}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, words", BAD)
def test_bench_memory_uses_the_same_words(capsys, option, value, words):
    err = error_line(capsys, ["bench-memory", "--preset", "tiny", "--seq", "64", option, value])
    assert err == f"qlora bench-memory: error: {words}"


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


@pytest.mark.parametrize("settings, words", [
    (dict(r=-1), "r=-1: must be a whole number, at least 0"),
    (dict(r=2.5), "r=2.5: must be a whole number"),
    (dict(alpha=float("nan")), "alpha=nan: must be a finite number"),
    (dict(alpha="16"), "alpha='16': must be a finite number"),
    (dict(dropout=1.0), "dropout=1.0: must be at least 0 and below 1"),
    (dict(dropout=-0.1), "dropout=-0.1: must be at least 0 and below 1"),
])
def test_prepare_model_refuses_what_peft_refuses_or_cannot_train(settings, words):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
        prepare_model(model, **{"r": 4, "alpha": 8, "dropout": 0.0, "skip": (), "verbose": False, **settings})
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2]))  # refused before any layer changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_prepare_model_keeps_peft_s_range_for_alpha():
    """PEFT accepts any finite lora_alpha: a negative one flips the update, 0 switches it off."""
    x = torch.randn(3, 64)
    for alpha, scaling in ((-8, -2.0), (0, 0.0)):
        model = prepare_model(small_model(), r=4, alpha=alpha, dropout=0.0, skip=(), compute_dtype=torch.float32,
                              verbose=False)
        assert model[0].scaling == scaling
        model(x)
