"""Reliability: nothing deleted before the inputs are checked, nothing read from outside the paths
given, nothing half written, one clear line for every bad input (issue 12). Signals, which need a
process of their own, are in test_reliability_signals.py.

| case                                                       | expected behaviour                                    |
|------------------------------------------------------------|-------------------------------------------------------|
| finetune --out is / contains / lies inside model or data   | one line, before anything is touched; inputs intact   |
| finetune --force, then bad data                            | one line; the old --out untouched                     |
| finetune --force, during the run / interrupted             | old --out intact until the new one is complete / kept,|
|                                                            |   its partial folder removed                          |
| finetune --force, completed                                | old --out replaced, no partial folder left            |
| index weight_map value ../x, absolute, int, null           | one line naming the index; nothing read, no DST       |
| adapter and resume files                                   | read by fixed names only; the saved model path is     |
|                                                            |   compared with --model, never opened (no test: no    |
|                                                            |   path is taken from them)                            |
| a partial folder of a dead writer / of a live one          | removed with a message / kept                         |
|   / of another host (shared file system) / of another DST  | kept / kept                                           |
| quantize: DST appears while quantising, no --force         | one line at the rename; the other DST intact          |
| no-replace rename onto an empty folder; without renameat2  | refused (os.rename would replace it); same fallback   |
| tokenizer_config auto_map, "y" on stdin                    | one line; the model's code never runs                 |
| finetune --dropout 2/-0.1, --max-grad-norm -1,             | one line each                                         |
|   --weight-decay -0.1, --alpha nan/inf, --device bogus/mps |                                                       |
| finetune --out that is a file                              | one line                                              |
| finetune on corrupt weights                                | one line naming the file                              |
| resume state: corrupt metadata / unknown state index       | one line naming the state                             |
| PagedAdamW32bit.load_state_dict with an unknown index      | ValueError naming the index                           |
| config.json a list or null (quantize, finetune)            | one line naming config.json                           |
| an empty (0 x 64) linear weight                            | one line naming file, tensor, shape                   |
| quant_state JSON nested 200k deep (inspect, load)          | one line / ValueError, no RecursionError              |
| quant_state shape negative or not fitting the codes        | inspect: one line, exit 2                             |
| safetensors offsets overlapping, gapped, negative shape    | inspect: one line, exit 2                             |
| adapter_config.json malformed or not an object             | ValueError naming the file                            |
| adapter weights with NaN/Inf                               | ValueError naming the file and layer                  |
| quant_map / nested_quant_map with NaN/Inf                  | ValueError naming the tensor                          |
| dequantize(int8/bool/complex64), nf4_linear(int64 x)       | TypeError naming the dtype                            |
"""
from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora.convert as qc
import qlora.safe_output as so
from qlora.checkpoint import INDEX_FILE
from qlora.cli import main
from qlora.convert import DEFAULT_MODEL, quantize_checkpoint
from qlora.errors import UserError
from qlora.finetune import TRAINER_STATE, finetune
from qlora.layer import QuantLoRALinear
from qlora.model import load_adapter, save_adapter
from qlora.nf4 import QUANT_STATE_KEY, NF4Weight, nf4_linear, quantize_nf4
from qlora.optim import PagedAdamW32bit
from test_convert import make_sharded_copy, small_model

ft = importlib.import_module("qlora.finetune")  # `qlora.finetune` the attribute is the function

# A short text: a few training windows and a held-out part of one window keep each run to seconds.
TEXT = ("The quick brown fox jumps over the lazy dog. " * 6 + "\n\n") * 2
RUN = dict(steps=1, r=2, seq=32, batch=1, grad_ckpt=False, progress=False)


def one_line(capsys, command: str, *argv) -> str:
    code = main([command, *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"qlora {command}: error: "), (code, err)
    return err[0]


def finetune_error(capsys, *argv) -> str:
    return one_line(capsys, "finetune", "--no-progress", *argv)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> tuple[Path, list[bool], dict]:
    """A one-step `finetune --force` over an old output: (out, whether the old output was still there
    at each step, report). The resume tests copy the finished output."""
    out = tmp_path_factory.mktemp("trained") / "out"
    out.mkdir()
    (out / "old-marker").write_text("old")
    seen: list[bool] = []
    patch = pytest.MonkeyPatch()
    patch.setattr(ft, "held_out_loss", lambda *args: 1.0)  # the loss itself is not under test here
    try:
        report = finetune(data=data, out=out, force=True, **RUN,
                          step_callback=lambda step, loss: seen.append((out / "old-marker").exists()))
    finally:
        patch.undo()
    return out, seen, report


def model_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "model"))


# ---- 1. finetune --force ---------------------------------------------------------------------------

def test_out_that_is_contains_or_lies_inside_an_input_is_refused_before_anything_is_touched(tmp_path, capsys):
    model = model_copy(tmp_path)
    before = tree(model)
    assert "is the model directory" in finetune_error(capsys, "--model", model, "--out", model, "--force")
    assert "lies inside the model directory" in finetune_error(capsys, "--model", model, "--out", model / "a", "--force")
    assert "contains the model directory" in finetune_error(capsys, "--model", model, "--out", tmp_path, "--force")
    assert tree(model) == before

    folder = tmp_path / "folder"
    folder.mkdir()
    data = folder / "data.txt"
    data.write_text(TEXT)
    assert "contains the data file" in finetune_error(capsys, "--data", data, "--out", folder, "--force")
    assert data.read_text() == TEXT
    assert "is a file" in finetune_error(capsys, "--data", data, "--out", data, "--force")
    assert "is a file" in finetune_error(capsys, "--out", data)
    assert data.read_text() == TEXT


def old_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("the previous adapter")
    (out / "old-marker").write_text("old")
    return out


def test_force_with_bad_data_keeps_the_old_output(tmp_path, capsys):
    out = old_output(tmp_path)
    before = tree(out)
    bad = tmp_path / "empty.txt"
    bad.write_text(" \n")
    assert "data file is empty" in finetune_error(capsys, "--data", bad, "--out", out, "--force")
    assert "data file not found" in finetune_error(capsys, "--data", tmp_path / "nope.txt", "--out", out, "--force")
    assert tree(out) == before


def test_force_interrupted_keeps_the_old_output(tmp_path, monkeypatch, data):
    out = old_output(tmp_path)
    before = tree(out)

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "load_model", interrupt)  # once the partial output exists
    with pytest.raises(KeyboardInterrupt):
        finetune(data=data, out=out, force=True, **RUN)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_the_old_output_only_once_the_new_one_is_complete(trained):
    out, seen, report = trained
    assert seen == [True]  # the old output was still there while the new one trained
    assert not (out / "old-marker").exists() and (out / "adapter_model.safetensors").is_file()
    assert report["out"] == str(out) and json.loads((out / "report.json").read_text())["out"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no partial or old folder left


# ---- 2. paths taken from files ----------------------------------------------------------------------

@pytest.mark.parametrize("value", ["../outside.safetensors", "ABSOLUTE", 7, None, "sub/../../outside.safetensors"])
def test_index_values_must_name_files_inside_the_checkpoint(tmp_path, capsys, value):
    outside = small_model(tmp_path / "elsewhere")
    shutil.move(outside / "model.safetensors", tmp_path / "outside.safetensors")
    src = make_sharded_copy(DEFAULT_MODEL, tmp_path / "src")
    (src / "sub").mkdir()  # so that sub/../../ leads somewhere
    index = json.loads((src / INDEX_FILE).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = str(tmp_path / "outside.safetensors") if value == "ABSOLUTE" else value
    (src / INDEX_FILE).write_text(json.dumps(index))
    err = one_line(capsys, "quantize", src, tmp_path / "dst", "--no-progress")
    assert INDEX_FILE in err and name in err
    assert ("points outside" if isinstance(value, str) else "expected a file name") in err
    assert not (tmp_path / "dst").exists()


# ---- 3. partial folders of dead and live writers ----------------------------------------------------

def test_stale_partial_folders_are_removed_and_live_ones_kept(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = so.HOST_TAG
    stale = tmp_path / f".dst.{host}-{dead.pid}-12345-abc.partial"
    live = tmp_path / f".dst.{host}-{os.getpid()}-{so._process_start(os.getpid()) or 0}-xyz.partial"
    reused = tmp_path / f".dst.{host}-{os.getpid()}-1-reused.partial"  # our pid, another start: a dead writer
    elsewhere = tmp_path / f".dst.{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead.pid}-1-abc.partial"  # another host
    other = tmp_path / f".other.{host}-{dead.pid}-1-abc.partial"
    for folder in (stale, live, reused, elsewhere, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    quantize_checkpoint(small_model(tmp_path / "m"), tmp_path / "dst", progress=False)
    err = capsys.readouterr().err
    assert str(stale) in err and f"process {dead.pid}" in err
    assert not stale.exists() and live.exists() and elsewhere.exists() and other.exists()
    assert not reused.exists() or so._process_start(os.getpid()) is None


# ---- 4. two runs to one DST ---------------------------------------------------------------------------

def test_dst_made_by_another_run_meanwhile_is_an_error_at_the_rename(tmp_path, monkeypatch, capsys):
    src, dst = small_model(tmp_path / "m"), tmp_path / "out" / "dst"
    real = qc._write_checkpoint

    def other_run_finishes_first(*args, **kwargs):
        dst.mkdir(parents=True)
        (dst / "theirs").write_text("other run")
        return real(*args, **kwargs)

    monkeypatch.setattr(qc, "_write_checkpoint", other_run_finishes_first)
    err = one_line(capsys, "quantize", src, dst, "--no-progress")
    assert "already exists" in err and str(dst) in err
    assert tree(dst) == {"theirs": b"other run"} and sorted(p.name for p in dst.parent.iterdir()) == ["dst"]


@pytest.mark.parametrize("syscall", ["native", "fallback"])
def test_rename_no_replace_refuses_even_an_empty_folder(tmp_path, monkeypatch, syscall):
    if syscall == "fallback":
        monkeypatch.setattr(so, "_rename_syscall", lambda: None)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "new").write_text("new")
    dst.mkdir()  # os.rename would silently replace an empty folder
    with pytest.raises(FileExistsError, match="already exists"):
        so.rename_no_replace(src, dst)
    assert (src / "new").exists() and list(dst.iterdir()) == []
    dst.rmdir()
    so.rename_no_replace(src, dst)
    assert (dst / "new").read_text() == "new" and not src.exists()


@pytest.mark.parametrize("syscall", ["native", "fallback"])
def test_rename_no_replace_moves_a_file_too(tmp_path, monkeypatch, syscall):
    """--force moves an old DST aside with the same rename, and an old DST may be a file or a link."""
    if syscall == "fallback":
        monkeypatch.setattr(so, "_rename_syscall", lambda: None)
    src, dst = tmp_path / "src.txt", tmp_path / "dst.txt"
    src.write_text("old")
    so.rename_no_replace(src, dst)
    assert dst.read_text() == "old" and not src.exists()
    src.write_text("other")
    with pytest.raises(FileExistsError, match="already exists"):
        so.rename_no_replace(src, dst)
    assert dst.read_text() == "old" and src.read_text() == "other"


# ---- 5. untrusted code ------------------------------------------------------------------------------

def test_a_tokenizer_with_auto_map_never_runs_its_code(tmp_path, monkeypatch, capsys, data):
    model = model_copy(tmp_path)
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import PreTrainedTokenizer\n"
                                   "class EvilTokenizer(PreTrainedTokenizer):\n    pass\n")
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    err = finetune_error(capsys, "--model", model, "--data", data, "--out", tmp_path / "out")
    assert "tokenizer" in err and not marker.exists()


# ---- 6 and 7. one line for every bad input ---------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--dropout", "2"], "--dropout 2.0: must be at least 0 and below 1"),
    (["--dropout", "-0.1"], "--dropout -0.1: must be at least 0 and below 1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must not be negative"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
    (["--weight-decay", "-0.1"], "--weight-decay must not be negative"),
    (["--alpha", "nan"], "--alpha nan: must be a finite number above 0"),
    (["--alpha", "inf"], "--alpha inf: must be a finite number above 0"),
    (["--device", "bogus"], "--device 'bogus'"),
    (["--device", "mps"], "only cpu and cuda"),
])
def test_bad_numbers_and_devices_give_one_line(tmp_path, capsys, argv, message):
    assert message in finetune_error(capsys, *argv, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_weights_give_one_line(tmp_path, capsys, data):
    model = model_copy(tmp_path)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    err = finetune_error(capsys, "--model", model, "--data", data, "--out", tmp_path / "out")
    assert "model.safetensors" in err and "corrupt" in err


def _rewrite_state(file: Path, edit) -> None:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as reader:
        meta = json.loads(reader.metadata()["trainer_state"])
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    meta, tensors = edit(meta, tensors)
    save_file(tensors, str(file), metadata={"trainer_state": json.dumps(meta)})


def test_corrupt_resume_states_give_one_line(tmp_path, capsys, data, trained):
    args = ["--data", data, "--r", 2, "--seq", 32, "--batch", 1, "--steps", 3, "--resume"]
    out = Path(shutil.copytree(trained[0], tmp_path / "no-scalars"))
    _rewrite_state(out / TRAINER_STATE, lambda meta, t: ({k: v for k, v in meta.items() if k != "scalars"}, t))
    assert "corrupt qlora trainer state" in finetune_error(capsys, *args, "--out", out)

    out = Path(shutil.copytree(trained[0], tmp_path / "unknown-index"))
    def move_to_9999(meta, tensors):  # parameter 0's state, under an index no parameter has
        def moved(key):
            return key.replace("state.0.", "state.9999.") if key.startswith("state.0.") else key
        meta["scalars"] = {moved(k): v for k, v in meta["scalars"].items()}
        return meta, {moved(k): v for k, v in tensors.items()}

    _rewrite_state(out / TRAINER_STATE, move_to_9999)
    err = finetune_error(capsys, *args, "--out", out)
    assert "cannot resume" in err and "index 9999" in err


def test_optimizer_state_with_an_unknown_index_is_one_clear_error():
    p = torch.nn.Parameter(torch.randn(4))
    opt = PagedAdamW32bit([p])
    p.grad = torch.randn(4)
    opt.step()
    state = opt.state_dict()
    state["state"] = {7: state["state"][0]}
    with pytest.raises(ValueError, match="parameter index 7"):
        PagedAdamW32bit([p]).load_state_dict(state)


@pytest.mark.parametrize("content", ["[1, 2]", "null"])
def test_config_json_that_is_not_an_object_gives_one_line(tmp_path, capsys, content):
    src = small_model(tmp_path / "m")
    (src / "config.json").write_text(content)
    assert "config.json" in one_line(capsys, "quantize", src, tmp_path / "o", "--no-progress")
    model = model_copy(tmp_path)
    (model / "config.json").write_text(content)
    assert "config.json" in finetune_error(capsys, "--model", model, "--out", tmp_path / "out")


def test_empty_linear_weight_gives_one_line(tmp_path, capsys):
    src = small_model(tmp_path / "m", {"model.layers.0.mlp.up_proj.weight": torch.zeros(0, 64, dtype=torch.bfloat16)})
    err = one_line(capsys, "quantize", src, tmp_path / "o", "--no-progress")
    assert "model.layers.0.mlp.up_proj.weight" in err and "[0, 64]" in err and "--skip" in err


def _nf4_file(path: Path, quant_state: bytes | None = None, shape=None) -> Path:
    tensors = quantize_nf4(torch.randn(32, 64), double_quant=False).state_dict("layer")
    if shape is not None:
        quant_state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": shape}).encode()
    if quant_state is not None:
        tensors[f"layer.weight.{QUANT_STATE_KEY}"] = torch.frombuffer(bytearray(quant_state), dtype=torch.uint8)
    save_file(tensors, str(path))
    return path


def test_deeply_nested_quant_state_gives_one_line(tmp_path, capsys):
    deep = b"[" * 200_000 + b"]" * 200_000
    file = _nf4_file(tmp_path / "deep.safetensors", deep)
    assert "corrupt quant state" in one_line(capsys, "inspect", file)
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        NF4Weight.from_state_dict(load_file(file), "layer")


@pytest.mark.parametrize("shape", [[-32, 64], [64, 64]])
def test_inspect_refuses_a_quant_state_shape_that_does_not_fit(tmp_path, capsys, shape):
    file = _nf4_file(tmp_path / "bad.safetensors", shape=shape)
    assert "corrupt quant state" in one_line(capsys, "inspect", file)


def _raw_safetensors(path: Path, header: dict, data_bytes: int) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(range(256)) * (data_bytes // 256)
                     + b"\x01" * (data_bytes % 256))
    return path


@pytest.mark.parametrize("header, size, message", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, "overlaps tensor a"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}, 40, "gap"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [16, 0]}}, 16, "negative shape"),
    ({"a": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}, 16, "negative shape"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 32, "cover 16 of the 32"),
])
def test_inspect_refuses_offsets_that_do_not_tile_the_data(tmp_path, capsys, header, size, message):
    file = _raw_safetensors(tmp_path / "x.safetensors", header, size)
    err = one_line(capsys, "inspect", file)
    assert message in err and "x.safetensors" in err


def _adapter_dir(tmp_path: Path):
    model = torch.nn.Sequential(QuantLoRALinear.from_nf4(quantize_nf4(torch.randn(32, 64)), r=4,
                                                         compute_dtype=torch.float32))
    directory = save_adapter(model, tmp_path / "adapter")
    return model, Path(directory)


@pytest.mark.parametrize("content", ['{"peft_type": "LORA",', "[]"])
def test_malformed_adapter_config_names_the_file(tmp_path, content):
    model, directory = _adapter_dir(tmp_path)
    (directory / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(model, directory)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapter_holding_nan_or_inf_is_refused(tmp_path, bad):
    model, directory = _adapter_dir(tmp_path)
    weights = load_file(directory / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = bad
    save_file(weights, str(directory / "adapter_model.safetensors"))
    before = model[0].lora_B.weight.clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        load_adapter(model, directory)
    assert torch.equal(model[0].lora_B.weight, before)


@pytest.mark.parametrize("table", ["quant_map", "nested_quant_map"])
def test_code_tables_holding_nan_are_refused_on_load(table):
    tensors = quantize_nf4(torch.randn(32, 64)).state_dict("layer")
    tensors[f"layer.weight.{table}"][3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        NF4Weight.from_state_dict(tensors, "layer")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.int64])
def test_integer_bool_and_complex_dtypes_are_refused(dtype):
    w = quantize_nf4(torch.randn(32, 64))
    with pytest.raises(TypeError, match=str(dtype)):
        w.dequantize(dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        nf4_linear(torch.ones(2, 64, dtype=dtype), w)


def test_user_errors_from_libraries_are_printed_on_one_line(monkeypatch, capsys):
    def run(args):
        raise UserError("first line\nsecond line")

    monkeypatch.setattr(qc, "run", run)
    assert one_line(capsys, "quantize") == "qlora quantize: error: first line second line"
