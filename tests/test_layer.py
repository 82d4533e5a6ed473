"""QuantLoRALinear against a float64 reference, PEFT's LoRA and bitsandbytes' Linear4bit."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlora.layer import QuantLoRALinear
from qlora.nf4 import quantize_nf4

IN, OUT, R = 96, 80, 8
BNB_KEYS = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4", "bias"}


def make_layer(r=R, alpha=16, bias=True, use_rslora=False, dropout=0.0, compute_dtype=torch.float32, seed=0):
    """A layer from a seeded nn.Linear with a non-zero B (a fresh B = 0 would hide adapter bugs)."""
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    layer = QuantLoRALinear.from_linear(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                        compute_dtype=compute_dtype)
    if r:
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    if bias:
        layer.bias.requires_grad_(True)  # frozen by default; enabled here to check its gradient
    return layer


def reference(layer, x, scale, mask=None):
    """float64: x W^T + b + scale * (mask * x) A^T B^T, W the dequantised NF4 weight."""
    w = layer.nf4_weight.dequantize(torch.float32).double()
    x = x.double()
    out = x @ w.T
    if layer.bias is not None:
        out = out + layer.bias.double()
    if layer.r:
        dropped = x if mask is None else x * mask
        out = out + scale * (dropped @ layer.lora_A.weight.double().T) @ layer.lora_B.weight.double().T
    return out


def grads(out, upstream, *tensors):
    return torch.autograd.grad(out, tensors, upstream)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_backward_match_float64_reference(bias, use_rslora):
    layer = make_layer(bias=bias, use_rslora=use_rslora)
    scale = 16 / math.sqrt(R) if use_rslora else 16 / R
    assert layer.scaling == pytest.approx(scale)
    x = torch.randn(3, 5, IN, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A.weight.detach().double().requires_grad_(True)
    b64 = layer.lora_B.weight.detach().double().requires_grad_(True)
    bias64 = layer.bias.detach().double().requires_grad_(True) if bias else None
    w64 = layer.nf4_weight.dequantize(torch.float32).double()
    ref = x64 @ w64.T + scale * (x64 @ a64.T) @ b64.T + (bias64 if bias else 0)
    out = layer(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    upstream = torch.randn_like(out)
    params = [x, layer.lora_A.weight, layer.lora_B.weight] + ([layer.bias] if bias else [])
    params64 = [x64, a64, b64] + ([bias64] if bias else [])
    for got, want in zip(grads(out, upstream, *params), grads(ref, upstream.double(), *params64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_bfloat16_compute_close_to_reference_and_keeps_input_dtype():
    layer = make_layer(compute_dtype=torch.bfloat16)
    x = torch.randn(4, IN)
    out = layer(x)
    assert out.dtype == torch.float32  # cast back to x's dtype, as Linear4bit does
    ref = reference(layer, x, layer.scaling)
    assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max()
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_scaling_rules():
    assert QuantLoRALinear(8, 8, r=16, alpha=32).scaling == 2.0
    assert QuantLoRALinear(8, 8, r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_fresh_adapter_leaves_base_output_unchanged_and_is_initialised_like_peft():
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    layer = QuantLoRALinear.from_linear(linear, r=R, compute_dtype=torch.float32)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(IN)  # kaiming_uniform(a=sqrt 5) bound: sqrt(6 / ((1 + 5) * fan_in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    x = torch.randn(6, IN)
    expected = F.linear(x, layer.nf4_weight.dequantize(torch.float32), linear.bias)
    torch.testing.assert_close(layer(x), expected)
    assert not any(t.requires_grad for t in (layer.weight, layer.bias))
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}


def test_dropout_applies_to_adapter_input_only_in_training():
    layer = make_layer(dropout=0.5)
    x = torch.randn(16, IN)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), reference(layer, x, layer.scaling), rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    mask = F.dropout(torch.ones_like(x), p=0.5, training=True)  # same RNG draw: the same mask
    assert 0.3 < (mask == 0).float().mean() < 0.7
    torch.testing.assert_close(out.double(), reference(layer, x, layer.scaling, mask.double()), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.lora_B.weight.zero_()
    torch.testing.assert_close(layer(x), layer.eval()(x))  # the base path is never dropped


def peft_twin(layer, use_rslora):
    """PEFT's LoRA on an nn.Linear holding the same dequantised weight and the same A, B."""
    peft = pytest.importorskip("peft")

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(IN, OUT)

        def forward(self, x):
            return self.proj(x)

    base = Wrapper()
    with torch.no_grad():
        base.proj.weight.copy_(layer.nf4_weight.dequantize(torch.float32))
        base.proj.bias.copy_(layer.bias)
    config = peft.LoraConfig(r=layer.r, lora_alpha=layer.alpha, target_modules=["proj"], lora_dropout=0.0,
                             use_rslora=use_rslora)
    model = peft.get_peft_model(base, config)
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.lora_A.weight)
        lora.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return model, lora.lora_A["default"].weight, lora.lora_B["default"].weight


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora_outputs_and_gradients(use_rslora):
    layer = make_layer(use_rslora=use_rslora)
    model, peft_a, peft_b = peft_twin(layer, use_rslora)
    x = torch.randn(2, 7, IN, requires_grad=True)
    x_peft = x.detach().clone().requires_grad_(True)
    out, out_peft = layer(x), model(x_peft)
    torch.testing.assert_close(out, out_peft, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    ours = grads(out, upstream, x, layer.lora_A.weight, layer.lora_B.weight)
    theirs = grads(out_peft, upstream, x_peft, peft_a, peft_b)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_dequantised_weight_is_saved_for_backward():
    layer = make_layer(r=0)
    saved = []
    x = torch.randn(4, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert not any(t.is_floating_point() and t.numel() >= IN * OUT for t in saved), \
        [(t.dtype, tuple(t.shape)) for t in saved]
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, layer.nf4_weight.dequantize(torch.float32).sum(0).expand_as(x))


def test_state_dict_has_bitsandbytes_keys_and_round_trips():
    layer = make_layer()
    state = layer.state_dict()
    assert set(state) == BNB_KEYS | {"lora_A.weight", "lora_B.weight"}
    assert state["weight"].dtype == torch.uint8 and tuple(state["weight"].shape) == (IN * OUT // 2, 1)
    fresh = QuantLoRALinear(IN, OUT, r=R, alpha=16, compute_dtype=torch.float32)
    assert not torch.equal(fresh.weight, layer.weight)
    fresh.load_state_dict(state)
    for name in ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset"):
        assert torch.equal(getattr(fresh, name), getattr(layer, name)), name
    x = torch.randn(3, IN)
    torch.testing.assert_close(fresh(x), layer(x))


def test_load_state_dict_rejects_a_different_shape():
    state = make_layer(r=0).state_dict()
    other = QuantLoRALinear(IN, OUT + 1, r=0)
    with pytest.raises(RuntimeError, match=r"shape \[80, 96\].*\[81, 96\]"):
        other.load_state_dict(state)


def test_a_broken_nested_checkpoint_names_the_module():
    model = nn.Sequential(nn.Identity(), make_layer(r=0))
    state = model.state_dict()
    del state["1.weight.absmax"]
    with pytest.raises(RuntimeError, match=r"1\.weight: not an NF4 weight, missing 1\.weight\.absmax"):
        model.load_state_dict(state)


def test_reads_bitsandbytes_linear4bit_state_dict():
    bnb = pytest.importorskip("bitsandbytes")
    # in_features a multiple of the blocksize: bitsandbytes 0.50.2's CPU dequantiser disagrees with
    # its CUDA one (and with the original weight) when rows straddle blocks, e.g. in_features=96.
    n_in, n_out = 128, 64
    torch.manual_seed(0)
    linear = nn.Linear(n_in, n_out)
    q = bnb.nn.Linear4bit(n_in, n_out, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    q.bias = nn.Parameter(linear.bias.data.clone())
    q = q.to("cpu")  # quantises
    layer = QuantLoRALinear(n_in, n_out, r=0, compute_dtype=torch.float32)
    layer.load_state_dict(q.state_dict())
    x = torch.randn(5, n_in)
    torch.testing.assert_close(layer(x), q(x), rtol=1e-5, atol=1e-5)
    assert set(q.state_dict()) == set(layer.state_dict()) == BNB_KEYS


def test_to_dtype_moves_but_never_casts_the_4bit_buffers():
    layer = make_layer()
    before = {n: b.clone() for n, b in layer.named_buffers()}
    layer.to(torch.bfloat16)
    for name, buffer in layer.named_buffers():
        assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name]), name
    assert layer.lora_A.weight.dtype == torch.bfloat16


def test_merge_reports_error_and_unmerge_restores_bytes():
    layer = make_layer()
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(8, IN)
    adapted = layer(x)
    report = layer.merge()
    assert layer.merged and not torch.equal(layer.weight, original["weight"])
    w_old = QuantLoRALinear(IN, OUT, r=0)
    w_old.load_state_dict({k: v for k, v in original.items() if not k.startswith("lora")})
    target = w_old.nf4_weight.dequantize(torch.float32) + layer.delta_weight()
    error = layer.nf4_weight.dequantize(torch.float32) - target
    assert report["max_abs_error"] == pytest.approx(float(error.abs().max()), rel=1e-6)
    assert report["rms_error"] == pytest.approx(float(error.pow(2).mean().sqrt()), rel=1e-5)
    assert report["delta_rms"] > 0
    # Merged: the adapter is not applied a second time, the base carries it.
    merged_out = layer(x)
    torch.testing.assert_close(merged_out, F.linear(x, layer.nf4_weight.dequantize(torch.float32), layer.bias))
    assert (merged_out - adapted).abs().max() < 3 * report["max_abs_error"] * x.abs().sum(1).max()
    merged_bytes = layer.weight.clone()
    with pytest.warns(UserWarning, match="already merged, nothing to do"):
        assert layer.merge() == report  # PEFT: a second merge warns and changes nothing
    assert torch.equal(layer.weight, merged_bytes)
    layer.unmerge()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, original[key]), key
    torch.testing.assert_close(layer(x), adapted)
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
    assert torch.equal(layer.weight, original["weight"])


def test_merged_linear_matches_adapted_layer_even_when_merged():
    layer = make_layer()
    x = torch.randn(8, IN)
    linear = layer.merged_linear(torch.float32)
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.float32
    torch.testing.assert_close(linear(x), layer(x), rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer.merged_linear()(x), linear(x))
    assert layer.merged_linear(torch.bfloat16).weight.dtype == torch.bfloat16


def test_disable_adapter_runs_the_base_alone():
    layer = make_layer()
    x = torch.randn(4, IN)
    adapted = layer(x)
    with layer.disable_adapter():
        base = layer(x)
    torch.testing.assert_close(base, F.linear(x, layer.nf4_weight.dequantize(torch.float32), layer.bias))
    assert not torch.allclose(base, adapted)
    torch.testing.assert_close(layer(x), adapted)


def test_r_zero_is_a_plain_4bit_linear():
    layer = make_layer(r=0)
    assert layer.lora_A is None and layer.lora_B is None
    assert set(layer.state_dict()) == BNB_KEYS
    x = torch.randn(4, IN)
    torch.testing.assert_close(layer(x), F.linear(x, layer.nf4_weight.dequantize(torch.float32), layer.bias))
    with pytest.raises(RuntimeError, match="r=0"):
        layer.merge()


def test_bad_inputs_name_the_tensor_and_shape():
    layer = make_layer()
    with pytest.raises(TypeError, match=r"x: dtype torch.int64 of shape \[2, 96\]"):
        layer(torch.ones(2, IN, dtype=torch.long))
    with pytest.raises(TypeError, match=r"x: dtype torch.float64"):
        layer(torch.ones(2, IN, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x: shape \[2, 95\].*last dimension must be 96"):
        layer(torch.ones(2, IN - 1))
    with pytest.raises(ValueError, match=r"weight: expected a 2-D"):
        QuantLoRALinear.from_nf4(quantize_nf4(torch.randn(64)))
    with pytest.raises(ValueError, match="dropout"):
        QuantLoRALinear(8, 8, dropout=1.0)
    with pytest.raises(TypeError, match="compute_dtype"):
        QuantLoRALinear(8, 8, compute_dtype=torch.float64)


def test_torch_compile_fullgraph_forward_and_backward():
    # aot_eager: traces the whole graph (fullgraph) and its autograd without needing a C++ compiler
    # for inductor, which is slow on the CPU CI machines.
    torch.manual_seed(0)
    model = nn.Sequential(make_layer(seed=1), nn.GELU(), QuantLoRALinear(OUT, 32, r=4, compute_dtype=torch.float32))
    nn.init.normal_(model[2].lora_B.weight)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, IN, requires_grad=True)
    params = [x] + [p for p in model.parameters() if p.requires_grad]
    eager_out = model(x)
    compiled_out = compiled(x)
    torch.testing.assert_close(compiled_out, eager_out)
    upstream = torch.randn_like(eager_out)
    for got, want in zip(grads(compiled_out, upstream, *params), grads(eager_out, upstream, *params)):
        torch.testing.assert_close(got, want)


def test_disable_adapter_on_a_merged_layer_runs_the_original_base_then_merges_back():
    layer = make_layer()
    x = torch.randn(4, IN)
    base = F.linear(x, layer.nf4_weight.dequantize(torch.float32), layer.bias)
    report = layer.merge()
    merged_bytes, merged_out = layer.weight.clone(), layer(x)
    with layer.disable_adapter():
        assert not layer.merged
        torch.testing.assert_close(layer(x), base)  # the original bytes, no adapter
    assert layer.merged and torch.equal(layer.weight, merged_bytes)
    torch.testing.assert_close(layer(x), merged_out)
    layer.unmerge()  # still restores the original bytes afterwards
    torch.testing.assert_close(layer.merge(), report)


# ---- the meta device ------------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [True, False])
def test_meta_layer_has_the_real_layout_and_loads_by_assignment(double_quant):
    source = QuantLoRALinear(IN, OUT, r=R, compute_dtype=torch.float32, double_quant=double_quant)
    nn.init.normal_(source.lora_B.weight)
    layer = QuantLoRALinear(IN, OUT, r=R, compute_dtype=torch.float32, double_quant=double_quant, device="meta")
    with torch.device("meta"):  # how accelerate's init_empty_weights builds a model
        in_context = QuantLoRALinear(IN, OUT, r=R, compute_dtype=torch.float32, double_quant=double_quant)
    real = source.state_dict()
    blob = "weight.quant_state.bitsandbytes__nf4"  # a JSON blob whose length depends on the values
    for meta in (layer, in_context):
        state = meta.state_dict()
        assert all(t.is_meta for t in state.values())
        assert set(state) == set(real)
        assert {k: (t.shape, t.dtype) for k, t in state.items() if k != blob} == \
            {k: (t.shape, t.dtype) for k, t in real.items() if k != blob}
    layer.load_state_dict(real, assign=True)
    assert not any(t.is_meta for t in list(layer.parameters()) + list(layer.buffers()))
    x = torch.randn(3, IN)
    assert torch.equal(layer(x), source(x))


def test_meta_layer_to_empty_then_load_or_reset_parameters():
    source = make_layer()
    x = torch.randn(3, IN)
    layer = QuantLoRALinear(IN, OUT, r=R, alpha=16, compute_dtype=torch.float32, device="meta").to_empty(device="cpu")
    layer.load_state_dict(source.state_dict())
    assert torch.equal(layer(x), source(x))
    fresh = QuantLoRALinear(IN, OUT, r=R, compute_dtype=torch.float32, device="meta").to_empty(device="cpu")
    with torch.no_grad():  # what to_empty may leave behind: poison, so anything not re-initialised shows
        for t in list(fresh.parameters()) + list(fresh.buffers()):
            t.fill_(float("nan") if t.is_floating_point() else 0xAB)
    fresh.reset_parameters()
    bound = 1 / math.sqrt(IN)  # nn.Linear's (and PEFT's A's) kaiming_uniform(a=sqrt 5) bound
    w = fresh.nf4_weight.dequantize(torch.float32)
    assert torch.isfinite(w).all() and w.abs().max() <= bound and w.std() > 0.4 * bound
    assert fresh.bias.abs().max() <= bound and fresh.bias.std() > 0.3 * bound
    assert 0.9 * bound < fresh.lora_A.weight.abs().max() <= bound
    assert torch.count_nonzero(fresh.lora_B.weight) == 0
    torch.testing.assert_close(fresh(x), F.linear(x, w, fresh.bias))


def test_reset_parameters_keeps_the_quant_type_and_layout():
    fp4 = QuantLoRALinear.from_nf4(quantize_nf4(torch.randn(OUT, IN), 128, False, quant_type="fp4"), r=R)
    fp4.reset_parameters()
    assert (fp4.quant_type, fp4.blocksize, fp4.double_quant) == ("fp4", 128, False)
    assert "weight.quant_state.bitsandbytes__fp4" in fp4.state_dict()


def test_quantize_nf4_on_meta_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^w: shape \[4, 64\] is on the meta device") as err:
        quantize_nf4(torch.empty(4, 64, device="meta"), name="w")
    assert "\n" not in str(err.value)
