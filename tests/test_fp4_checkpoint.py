"""FP4 and bnb_4bit_quant_storage checkpoints: the fp4 keys, the CLI's --quant-type, and packed codes
that bitsandbytes stored as bfloat16 / float16 / float32 (what FSDP users write)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora.checkpoint import CheckpointError, load_quantized_state_dict
from qlora.checkpoint_info import describe_checkpoint, format_table
from qlora.cli import main
from qlora.nf4 import NF4Weight, quantize_4bit

from test_convert import small_model

bnb_functional = pytest.importorskip("bitsandbytes.functional")

PREFIX = "model.layers.0.self_attn.q_proj"


def bnb_checkpoint(path, quant_type, storage, shape=(48, 128)):
    """A one-linear checkpoint as bitsandbytes writes it (QuantState.as_dict(packed=True) beside the
    packed codes), quantised by bitsandbytes itself with quant_storage=storage. (Rows are a multiple of
    the blocksize: bitsandbytes' native CPU dequantiser mis-decodes other shapes.)"""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type,
                                                 quant_storage=storage)
    tensors = {f"{PREFIX}.weight": packed, **{f"{PREFIX}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    save_file(tensors, path)
    return packed, state


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_quant_storage_checkpoints_are_read_as_their_bytes(tmp_path, quant_type, storage):
    packed, state = bnb_checkpoint(tmp_path / "q.safetensors", quant_type, storage)
    assert packed.dtype == storage  # bitsandbytes wrote the codes as that dtype, [(n+1)//2 / itemsize, 1]
    weight = load_quantized_state_dict(tmp_path / "q.safetensors")[f"{PREFIX}.weight"]
    assert isinstance(weight, NF4Weight) and weight.quant_type == quant_type
    assert weight.packed.dtype == torch.uint8 and weight.packed.shape == (48 * 128 // 2, 1)
    expected = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(weight.dequantize().view(torch.int16), expected.view(torch.int16))
    row = next(r for r in describe_checkpoint(tmp_path / "q.safetensors") if r.name == f"{PREFIX}.weight")
    assert row.shape == (48, 128) and row.format.startswith(quant_type)  # inspect reads it too


def test_inspect_refuses_a_quant_state_whose_type_contradicts_its_key(tmp_path):
    tensors = quantize_4bit(torch.randn(32, 64), "nf4").state_dict(PREFIX)
    key = f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key].tolist()))
    state["quant_type"] = "int8"
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, tmp_path / "q.safetensors")
    with pytest.raises(CheckpointError, match="'int8' under a nf4 key"):
        describe_checkpoint(tmp_path / "q.safetensors")


def test_quant_storage_with_missing_bytes_is_refused_by_name(tmp_path):
    bnb_checkpoint(tmp_path / "q.safetensors", "fp4", torch.float32)
    tensors = load_file(tmp_path / "q.safetensors")
    tensors[f"{PREFIX}.weight"] = tensors[f"{PREFIX}.weight"][:-1].clone()
    save_file(tensors, tmp_path / "q.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_quantized_state_dict(tmp_path / "q.safetensors")
    message = str(err.value)
    assert "q.safetensors" in message and f"{PREFIX}.weight" in message
    assert "torch.float32" in message and "3068 bytes" in message and "needs 3072" in message


def test_fp4_checkpoint_loads_and_inspects_as_fp4(tmp_path):
    w = torch.randn(64, 96)
    save_file(quantize_4bit(w, "fp4").state_dict(PREFIX), tmp_path / "q.safetensors")
    loaded = load_quantized_state_dict(tmp_path / "q.safetensors")[f"{PREFIX}.weight"]
    assert loaded.quant_type == "fp4" and torch.equal(loaded.dequantize(), quantize_4bit(w, "fp4").dequantize())
    rows = describe_checkpoint(tmp_path / "q.safetensors")
    assert [(row.name, row.format) for row in rows] == [(f"{PREFIX}.weight", "fp4-dq")]
    assert "FP4: 1 tensors" in format_table(rows)


def test_cli_quant_type_fp4_writes_fp4_checkpoints(tmp_path, capsys):
    src = small_model(tmp_path / "m")
    dst = tmp_path / "fp4"
    assert main(["quantize", str(src), str(dst), "--quant-type", "fp4", "--no-progress"]) == 0
    assert "2 quantised to FP4" in capsys.readouterr().out
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == "fp4" and config["bnb_4bit_quant_storage"] == "uint8"
    stored = load_file(dst / "model.safetensors")
    assert sum(key.endswith("quant_state.bitsandbytes__fp4") for key in stored) == 2
    assert not any(key.endswith("__nf4") for key in stored)
    original = load_file(src / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    loaded = load_quantized_state_dict(dst)["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(loaded.packed, quantize_4bit(original, "fp4").packed)
    assert main(["inspect", str(dst)]) == 0
    assert "fp4-dq b64" in capsys.readouterr().out


def test_finetune_accepts_fp4_checkpoints_and_names_other_types(tmp_path):
    from qlora.errors import UserError
    from qlora.finetune_model import is_quantised

    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    assert is_quantised(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {**quant, "bnb_4bit_quant_type": "int4"}}))
    with pytest.raises(UserError, match="bnb_4bit_quant_type='int4'"):
        is_quantised(tmp_path)
