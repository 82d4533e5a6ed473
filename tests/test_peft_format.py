"""qlora/peft_format.py: load_adapter checks the whole file (adapters, trained biases, modules_to_save,
the config's numbers) before it changes the model, so a bad file leaves the model exactly as it was."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from hf_families import one_thread, tiny_model  # noqa: E402,F401
from qlora.layer import QuantLoRALinear  # noqa: E402
from qlora.model import load_adapter, prepare_model, save_adapter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
PREFIX = "base_model.model."
BIAS = PREFIX + "model.layers.1.self_attn.v_proj.base_layer.bias"
SAVED_MODULE = PREFIX + "lm_head.weight"


def adapted_model(seed: int):
    """Every kind of trained tensor: linear and embedding LoRA, lora_only biases, lm_head saved whole."""
    model = prepare_model(tiny_model("qwen2"), target_modules=["q_proj", "v_proj", "embed_tokens"], r=4,
                          dropout=0.0, bias="lora_only", modules_to_save=["lm_head"], compute_dtype=torch.float32,
                          verbose=False)
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(adapted_model(5), directory)
    return directory


def fresh_model():
    """Quantised q/v projections without adapters, a plain embedding: load_adapter would add to all of them."""
    return prepare_model(tiny_model("qwen2"), target_modules=["q_proj", "v_proj"], r=0, compute_dtype=torch.float32,
                         verbose=False)


def snapshot(model) -> dict:
    return {"modules": [(n, type(m).__name__, getattr(m, "r", None)) for n, m in model.named_modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def assert_unchanged(before: dict, model) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def corrupt(source, target, tensors=None, config=None):
    from safetensors.torch import load_file, save_file

    target.mkdir()
    state = load_file(source / "adapter_model.safetensors")
    save_file({**state, **(tensors or {})}, str(target / "adapter_model.safetensors"))
    settings = json.loads((source / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**settings, **(config or {})}))
    return target


def test_the_intact_file_loads_everything(adapter_dir):
    from safetensors.torch import load_file

    model = fresh_model()
    loaded = load_adapter(model, adapter_dir)
    assert "model.embed_tokens" in loaded and isinstance(model.model.layers[1].self_attn.v_proj, QuantLoRALinear)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    torch.testing.assert_close(model.model.layers[1].self_attn.v_proj.bias, saved[BIAS], rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight, saved[SAVED_MODULE], rtol=0, atol=0)


@pytest.mark.parametrize("case, words", [
    # A bias of one element would broadcast into the whole bias without a check.
    ("bias [1]", "tensor model.layers.1.self_attn.v_proj.base_layer.bias has shape [1], the model's is [32]"),
    ("bias NaN", "tensor model.layers.1.self_attn.v_proj.base_layer.bias of shape [32] holds NaN/Inf"),
    ("lm_head shape", "tensor lm_head.weight has shape [256, 63], the model's is [256, 64]"),
    ("lm_head int", "tensor lm_head.weight of shape [256, 64] holds NaN/Inf or non-float values (torch.int32)"),
    ("dropout 1.5", "lora_dropout is 1.5; expected a finite number in [0, 1)"),
    ("alpha text", "lora_alpha is 'sixteen'; expected a finite number"),
    ("alpha -inf", "lora_alpha is -inf; expected a finite number"),  # json reads -Infinity
])
def test_a_bad_file_leaves_the_model_untouched(adapter_dir, tmp_path, case, words):
    from safetensors.torch import load_file

    saved = load_file(adapter_dir / "adapter_model.safetensors")
    bias, head = saved[BIAS], saved[SAVED_MODULE]
    edits = {"bias [1]": ({BIAS: bias[:1].clone()}, None),
             "bias NaN": ({BIAS: torch.full_like(bias, float("nan"))}, None),
             "lm_head shape": ({SAVED_MODULE: head[:, :-1].clone()}, None),
             "lm_head int": ({SAVED_MODULE: head.to(torch.int32)}, None),
             "dropout 1.5": (None, {"lora_dropout": 1.5}),
             "alpha text": (None, {"lora_alpha": "sixteen"}),
             "alpha -inf": (None, {"lora_alpha": float("-inf")})}
    bad = corrupt(adapter_dir, tmp_path / "bad", *edits[case])
    model = fresh_model()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        load_adapter(model, bad)
    message = str(err.value)
    assert words in message and str(bad) in message and "\n" not in message
    assert_unchanged(before, model)


@pytest.mark.parametrize("merged_layer", ["model.embed_tokens", "model.layers.1.self_attn.v_proj"])
def test_a_merged_layer_is_refused(adapter_dir, merged_layer):
    # Loading into a merged layer would leave the old delta in its weight (the new factors unused) and a
    # later unmerge() would subtract the new delta from it: the base weight lost for good.
    model = adapted_model(7)
    model.get_submodule(merged_layer).merge()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"the model's {merged_layer} is merged; unmerge"):
        load_adapter(model, adapter_dir)
    assert_unchanged(before, model)
