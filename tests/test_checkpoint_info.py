"""`qlora inspect`: per-tensor shapes, formats, bytes, bits per parameter, and --against errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora.checkpoint_info import add_reconstruction_errors, describe_checkpoint
from qlora.cli import main
from qlora.convert import DEFAULT_MODEL, quantize_checkpoint


def test_rows_of_a_quantised_checkpoint(nf4_checkpoint):
    stored = load_file(nf4_checkpoint / "model.safetensors")
    original = load_file(DEFAULT_MODEL / "model.safetensors")
    rows = {row.name: row for row in describe_checkpoint(nf4_checkpoint)}
    assert set(rows) == set(original)  # one row per weight, its companion tensors folded in
    for name, row in rows.items():
        if "_proj" in name:
            out_features, in_features = original[name].shape
            numel = out_features * in_features
            n_blocks = numel // 64
            blob = stored[f"{name}.quant_state.bitsandbytes__nf4"]
            # codes + uint8 scales + float32 nested scales + NF4 table + dynamic map + JSON
            expected_bytes = numel // 2 + n_blocks + 4 * math.ceil(n_blocks / 256) + 16 * 4 + 256 * 4 + blob.numel()
            assert (row.format, row.blocksize, row.shape) == ("nf4-dq", 64, (out_features, in_features))
            assert row.nbytes == expected_bytes
            assert row.bits_per_param == pytest.approx(8 * expected_bytes / numel)
        else:
            assert row.format == "bf16" and row.shape == tuple(original[name].shape)
            assert row.nbytes == original[name].numel() * 2 and row.bits_per_param == 16


def test_relative_errors_match_bitsandbytes_dequantisation(nf4_checkpoint):
    from bitsandbytes.functional import QuantState, dequantize_4bit

    stored = load_file(nf4_checkpoint / "model.safetensors")
    original = load_file(DEFAULT_MODEL / "model.safetensors")
    rows = describe_checkpoint(nf4_checkpoint)
    add_reconstruction_errors(nf4_checkpoint, rows, DEFAULT_MODEL)
    checked = 0
    for row in rows:
        if row.format == "nf4-dq":
            prefix = row.name[: -len(".weight")]
            parts = {k[len(row.name) + 1:]: v for k, v in stored.items() if k.startswith(row.name + ".")}
            state = QuantState.from_dict(parts, device=torch.device("cpu"))
            state.dtype = torch.float32  # inspect measures the float32 reconstruction, before rounding to bf16
            w = dequantize_4bit(stored[row.name], state)
            assert w.dtype == torch.float32
            ref = original[f"{prefix}.weight"].float()
            expected = float(torch.linalg.vector_norm(w - ref) / torch.linalg.vector_norm(ref))
            assert row.rel_error == pytest.approx(expected, rel=1e-5)
            checked += 1
        else:
            assert row.rel_error == 0.0  # copied unchanged
    assert checked == 28


def test_cli_table(nf4_checkpoint, capsys):
    assert main(["inspect", str(nf4_checkpoint), "--against", str(DEFAULT_MODEL)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "shape", "format", "bytes", "bits/param", "rel.", "error"]
    down = next(line for line in out if line.startswith("model.layers.1.mlp.down_proj.weight"))
    cells = down.split()
    assert cells[1:4] == ["256x704", "nf4-dq", "b64"]
    assert float(cells[-2]) == pytest.approx(8 * int(cells[4].replace(",", "")) / (256 * 704), abs=1e-3)
    norm = next(line for line in out if line.startswith("model.norm.weight"))
    assert norm.split()[1:5] == ["256", "bf16", "512", "16.000"] and norm.split()[-1] == "0.0000"
    total = next(line for line in out if line.startswith("total:"))
    original_params = sum(t.numel() for t in load_file(DEFAULT_MODEL / "model.safetensors").values())
    assert f"{original_params:,} parameters" in total and "39 tensors" in total
    assert any(line.startswith("NF4: 28 tensors") and "mean rel. error" in line for line in out)


def test_cli_plain_checkpoint(capsys):
    assert main(["inspect", str(DEFAULT_MODEL)]) == 0
    out = capsys.readouterr().out
    assert "rel. error" not in out and "nf4" not in out
    assert "16.000 bits/param" in out.splitlines()[-1]


def test_no_double_quant_format_and_size(tmp_path):
    w = torch.randn(96, 128).to(torch.float16)
    save_file({"lin.weight": w, "embed_tokens.weight": torch.randn(4, 8)}, tmp_path / "m.safetensors")
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "out", blocksize=128, double_quant=False, progress=False)
    rows = {row.name: row for row in describe_checkpoint(tmp_path / "out")}
    lin = rows["lin.weight"]
    blob_len = load_file(tmp_path / "out" / "model.safetensors")["lin.weight.quant_state.bitsandbytes__nf4"].numel()
    assert (lin.format, lin.blocksize, lin.shape) == ("nf4", 128, (96, 128))
    assert lin.nbytes == 96 * 128 // 2 + 4 * (96 * 128 // 128) + 64 + blob_len
    assert rows["embed_tokens.weight"].format == "fp32"
    state = json.loads(bytes(load_file(tmp_path / "out" / "model.safetensors")["lin.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert state["dtype"] == "float16" and "nested_blocksize" not in state


def test_cli_errors_are_one_line(tmp_path, nf4_checkpoint, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlora inspect: error:") and "missing" in err and "\n" not in err

    other = tmp_path / "other.safetensors"
    save_file({"model.norm.weight": torch.ones(7, dtype=torch.bfloat16)}, other)
    assert main(["inspect", str(nf4_checkpoint), "--against", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.norm.weight" in err and "[7]" in err and "[256]" in err and "\n" not in err
