"""FP4 checkpoints move both ways between qlora and transformers + bitsandbytes (on the CPU), and
transformers' bnb_4bit_quant_storage=bfloat16 checkpoints (FSDP's) load in qlora."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora.checkpoint import load_quantized_state_dict
from qlora.nf4 import NF4Weight

transformers = pytest.importorskip("transformers")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
from test_interop_transformers import bnb_dequantize, linear4bit_modules  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A one-layer random-init Llama in bf16 (7 linears of 64..128): quantises in a blink."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("llama") / "tiny"
    model.save_pretrained(path)
    return path


def test_transformers_fp4_checkpoint_with_bf16_storage_loads_in_qlora(tiny_llama, tmp_path):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                             bnb_4bit_quant_storage=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config,
                                                              device_map="cpu")
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16  # the codes, as bf16 storage
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_storage"] \
        == "bfloat16"
    loaded = load_quantized_state_dict(tmp_path)
    modules = linear4bit_modules(model)
    assert len(modules) == 7
    for name, module in modules.items():
        weight = loaded[f"{name}.weight"]
        assert isinstance(weight, NF4Weight) and weight.quant_type == "fp4" and weight.double_quant
        assert torch.equal(weight.dequantize().view(torch.int16), bnb_dequantize(module).view(torch.int16)), name


def test_qlora_fp4_checkpoint_loads_in_transformers(tiny_llama, tmp_path):
    from qlora.cli import main

    dst = tmp_path / "fp4"
    assert main(["quantize", str(tiny_llama), str(dst), "--quant-type", "fp4", "--no-progress"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, device_map="cpu")
    ours = load_quantized_state_dict(dst)
    modules = linear4bit_modules(model)
    assert len(modules) == 7
    for name, module in modules.items():
        assert module.weight.quant_state.quant_type == "fp4"
        assert torch.equal(bnb_dequantize(module), ours[f"{name}.weight"].dequantize()), name

