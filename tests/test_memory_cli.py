"""`qlora bench-memory`: every bad input gets one clear line (exit 2), never a traceback.

| case | expected |
|---|---|
| config.json size field of the wrong type (string, float, bool, list) | names the file and the field |
| zero attention heads, negative hidden size | names the file and the field |
| tie_word_embeddings not a boolean, rope_scaling not an object, rms_norm_eps a string | names the file and the field |
| --json / --png a folder, or in a missing folder | names the option and the path; nothing computed |
| --measure --device cuda without CUDA, --device bogus | says so |
| --dropout nan or >= 1, --world-size 0 | names the option |
| --gpu-budget below two pages or not a size, --gpu-memory not a size | names the option |
| --fsdp with bf16-full, --measure with several ranks | says what is modelled |
"""
import json

import pytest
import torch

from qlora.cli import main

GOOD = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)


def one_line_error(capsys, argv) -> str:
    assert main(["bench-memory", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlora bench-memory: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("field,value,words", [
    ("hidden_size", "64", "hidden_size must be a positive integer, got '64'"),
    ("hidden_size", 64.0, "hidden_size must be a positive integer, got 64.0"),
    ("num_hidden_layers", True, "num_hidden_layers must be a positive integer, got True"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
    ("hidden_size", -64, "hidden_size must be a positive integer, got -64"),
    ("vocab_size", [100], "vocab_size must be a positive integer, got [100]"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
    ("rope_scaling", "linear", "rope_scaling must be an object, got 'linear'"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a positive number, got '1e-6'"),
])
def test_bad_config_fields(tmp_path, capsys, field, value, words):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**GOOD, field: value}))
    err = one_line_error(capsys, ["--config", str(tmp_path), "--seq", "32"])
    assert str(config) in err and words in err


def test_good_config_predicts(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(GOOD))
    assert main(["bench-memory", "--config", str(tmp_path), "--seq", "32", "--device", "cpu"]) == 0
    assert "| qlora |" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--json", "--png"])
def test_output_a_folder_or_in_a_missing_folder(tmp_path, capsys, option):
    err = one_line_error(capsys, ["--preset", "tiny", "--seq", "64", option, str(tmp_path)])
    assert f"{option} {tmp_path}: is a folder" in err
    missing = tmp_path / "nowhere" / "out.json"
    err = one_line_error(capsys, ["--preset", "tiny", "--seq", "64", option, str(missing)])
    assert f"the folder {missing.parent} does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_measure_on_cuda_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = one_line_error(capsys, ["--preset", "tiny", "--seq", "64", "--measure", "--device", "cuda"])
    assert "--measure --device cuda: torch sees no CUDA device here" in err
    assert "--device 'bogus': choose cuda or cpu" in one_line_error(capsys, ["--preset", "tiny", "--device", "bogus"])
    assert "--device 'meta': choose cuda or cpu" in one_line_error(capsys, ["--preset", "tiny", "--device", "meta"])


@pytest.mark.parametrize("argv,words", [
    (["--dropout", "nan"], "--dropout nan: must be at least 0 and below 1"),
    (["--dropout", "1"], "--dropout 1.0: must be at least 0 and below 1"),
    (["--world-size", "0"], "--world-size 0: must be at least 1"),
    (["--gpu-budget", "16MiB"], "--gpu-budget 16MiB: below two pages of 16 MiB"),
    (["--gpu-budget", "lots"], "--gpu-budget: 'lots' is not a size"),
    (["--gpu-memory", "44 parsecs"], "--gpu-memory: '44 parsecs' is not a size"),
    (["--gpu-memory", "0"], "--gpu-memory: must be more than 0 bytes"),
    (["--fsdp", "--world-size", "2", "--modes", "bf16-full"], "--fsdp: bf16-full is not modelled sharded"),
    (["--measure", "--world-size", "2", "--device", "cpu"], "per-rank memory (--world-size, --fsdp) is predicted only"),
])
def test_bad_options(capsys, argv, words):
    assert words in one_line_error(capsys, ["--preset", "tiny", "--seq", "64", *argv])


def test_sizes_with_units(capsys):
    assert main(["bench-memory", "--preset", "llama-65b", "--grad-ckpt", "--bf16-adapters", "--device", "cuda",
                 "--modes", "qlora-paged", "--gpu-budget", "32MiB", "--gpu-memory", "44GB"]) == 0
    out = capsys.readouterr().out
    assert "qlora-paged: peak 41.64 GB, fits in 44.00 GB" in out
    assert "382 (6.41 GB) in pinned host memory" in out


def test_fsdp_default_modes_and_title(capsys):
    assert main(["bench-memory", "--preset", "llama-70b", "--grad-ckpt", "--device", "cuda", "--world-size", "2",
                 "--fsdp", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 2 (FSDP2)" in out
    assert "| bf16-lora |" in out and "| qlora-paged |" in out and "| bf16-full |" not in out
