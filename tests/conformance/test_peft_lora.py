"""QuantLoRALinear and the model helpers against PEFT's own LoRA properties.

Each test names the PEFT test (in PEFT's repository, tests/) whose property it checks. The
peer here is PEFT's LoRA on a plain nn.Linear holding our dequantised NF4 weight, so the only
difference allowed is the one NF4 makes: merging requantises (qlora reports the loss).
"""
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from qlora.layer import QuantLoRALinear  # noqa: E402
from qlora.model import load_adapter, prepare_model, save_adapter  # noqa: E402

IN, OUT, R, ALPHA = 64, 48, 8, 16


class Wrapper(nn.Module):
    def __init__(self, linear: nn.Module):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def trained_pair(seed=0):
    """Our layer and PEFT's LoRA on the same dequantised weight with the same non-zero B."""
    torch.manual_seed(seed)
    ours = QuantLoRALinear.from_linear(nn.Linear(IN, OUT), r=R, alpha=ALPHA, compute_dtype=torch.float32)
    nn.init.normal_(ours.lora_B.weight, std=0.05)  # as after training: B != 0
    base = nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight.copy_(ours.nf4_weight.dequantize(torch.float32))
        base.bias.copy_(ours.bias)
    theirs = peft.get_peft_model(Wrapper(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"]))
    lora = theirs.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(ours.lora_A.weight)
        lora.lora_B["default"].weight.copy_(ours.lora_B.weight)
    return ours, theirs.eval(), lora


def test_merge_keeps_the_adapted_output():
    """PEFT tests/testing_common.py _test_merge_layers: after merge the output is the adapted one
    (here within the requantisation error merge() reports), and merge+unmerge restores the base."""
    ours, theirs, lora = trained_pair()
    x = torch.randn(5, IN)
    with torch.no_grad():
        adapted, adapted_peft = ours(x), theirs(x)
        torch.testing.assert_close(adapted, adapted_peft, rtol=1e-5, atol=1e-5)
        before = ours.weight.clone()
        report = ours.merge()
        lora.merge()
        merged, merged_peft = ours(x), theirs(x)
    torch.testing.assert_close(merged_peft, adapted_peft, rtol=1e-5, atol=1e-5)  # PEFT's merge is exact
    # Ours requantises: each output moves by at most max_abs_error per weight times |x|.
    bound = report["max_abs_error"] * x.abs().sum(1, keepdim=True)
    assert ((merged - adapted).abs() <= bound + 1e-6).all()
    assert not torch.equal(merged, adapted)  # it did requantise
    ours.unmerge()
    lora.unmerge()
    assert torch.equal(ours.weight, before)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_merge_is_idempotent_and_warns_like_peft():
    """PEFT tests/testing_common.py _test_merge_layers_is_idempotent: merging twice warns "All adapters
    are already merged, nothing to do" and changes nothing; a second unmerge warns likewise."""
    ours, theirs, lora = trained_pair()
    x = torch.randn(3, IN)
    first = ours.merge()
    lora.merge()
    merged_bytes, out = ours.weight.clone(), ours(x)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do") as ours_warning:
        assert ours.merge() == first
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do") as peft_warning:
        lora.merge()
    assert str(ours_warning[0].message) == str(peft_warning[0].message)
    assert torch.equal(ours.weight, merged_bytes) and torch.equal(ours(x), out)
    ours.unmerge()
    lora.unmerge()
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do.") as ours_warning:
        ours.unmerge()
    with pytest.warns(UserWarning) as peft_warning:
        lora.unmerge()
    assert str(ours_warning[0].message) == str(peft_warning[0].message)


def test_disable_adapter_with_merging():
    """PEFT tests/test_custom_models.py test_disable_adapters_with_merging: on a merged model the
    disabled output is the base output, and after the block the adapted output comes back."""
    ours, theirs, lora = trained_pair()
    x = torch.randn(4, IN)
    with torch.no_grad():
        with theirs.disable_adapter():
            base_peft = theirs(x)
        report = ours.merge()
        lora.merge()
        merged = ours(x)
        with ours.disable_adapter():
            disabled = ours(x)
        with theirs.disable_adapter():
            disabled_peft = theirs(x)
        after, after_peft = ours(x), theirs(x)
    torch.testing.assert_close(disabled, base_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(disabled_peft, base_peft, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, merged)  # our merged bytes are back (PEFT stays unmerged: README)
    # The adapted output both ways, up to what our requantisation moved (merge()'s report).
    assert ((after - after_peft).abs() <= report["max_abs_error"] * x.abs().sum(1, keepdim=True) + 1e-5).all()
    assert ours.merged and not lora.merged


def test_adapter_init_under_a_seed_is_peft_s():
    """PEFT tests/test_initialization.py TestLoraInitialization.test_lora_linear_init_default
    (A Kaiming-uniform, B zeros), made exact: under the same seed, prepare_model draws the same
    A and B as get_peft_model, layer by layer, on a tiny Llama."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    twin = transformers.LlamaForCausalLM(config)
    twin.load_state_dict(model.state_dict())
    torch.manual_seed(7)
    ours = prepare_model(model, r=R, alpha=ALPHA, dropout=0.0, compute_dtype=torch.float32, verbose=False)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(twin, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLoRALinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        lora = theirs.base_model.model.get_submodule(name)
        assert torch.equal(layer.lora_A.weight, lora.lora_A["default"].weight), name
        assert torch.equal(layer.lora_B.weight, lora.lora_B["default"].weight), name
        assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("direction", ["qlora_to_peft", "peft_to_qlora"])
def test_save_and_load_both_ways(tmp_path, direction):
    """PEFT tests/testing_common.py _test_save_pretrained (save, load, same state and outputs), across
    the two libraries: an adapter saved by one loads in the other with the same weights."""
    ours, theirs, lora = trained_pair()
    model = Wrapper(ours)
    x = torch.randn(3, IN)
    if direction == "qlora_to_peft":
        save_adapter(model, tmp_path)
        base = theirs.base_model.model.proj.base_layer
        loaded = peft.PeftModel.from_pretrained(Wrapper(nn.Linear(IN, OUT)), str(tmp_path)).eval()
        with torch.no_grad():
            loaded.base_model.model.proj.base_layer.load_state_dict(base.state_dict())
        target = loaded.base_model.model.proj
        assert torch.equal(target.lora_A["default"].weight, ours.lora_A.weight)
        assert torch.equal(target.lora_B["default"].weight, ours.lora_B.weight)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-5)
    else:
        with torch.no_grad():
            lora.lora_B["default"].weight.mul_(-2.0)  # PEFT's adapter differs from ours before the load
        theirs.save_pretrained(str(tmp_path))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no silent key mismatch
            load_adapter(model, tmp_path)
        assert torch.equal(ours.lora_B.weight, lora.lora_B["default"].weight)
        assert torch.equal(ours.lora_A.weight, lora.lora_A["default"].weight)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
