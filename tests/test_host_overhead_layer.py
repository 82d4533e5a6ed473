"""QuantLoRALinear's per-forward host work: without autograd, fp32 adapters are cast to the compute
dtype once per change, not every forward."""
import torch

from qlora.layer import QuantLoRALinear


def _layer():
    torch.manual_seed(0)
    layer = QuantLoRALinear(64, 32, r=4, alpha=8, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)  # B starts at zero; make the adapter count
    assert layer.lora_A.weight.dtype == torch.float32
    return layer


def test_generation_reuses_the_adapter_cast_until_it_changes():
    layer = _layer()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
        a_cast = layer._adapter_in_compute_dtype()[0]
        assert layer._adapter_in_compute_dtype()[0] is a_cast  # kept between forwards
        assert torch.equal(layer(x), want)
        layer.lora_B.weight.mul_(2)  # an in-place update (an optimizer step) invalidates it
        assert layer._adapter_in_compute_dtype()[0] is not a_cast
        changed = layer(x)
    with torch.inference_mode():
        assert torch.equal(layer(x), changed)
    with torch.no_grad():
        assert torch.equal(layer(x), changed)  # an inference-mode copy is not reused outside it


def test_training_casts_inside_the_graph():
    layer = _layer()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    assert "_adapter_cast" not in layer.__dict__


def test_optimizer_kernel_step_invalidates_the_cached_cast(monkeypatch):
    """PagedAdamW32bit's Triton kernel writes parameters through raw pointers; the step must bump
    their version counters, or generation after more training would use the old adapters."""
    from qlora.optim import PagedAdamW32bit

    monkeypatch.setenv("QLORA_BACKEND", "triton")  # the kernel path, interpreted on the CPU
    layer = _layer()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        before = layer(x)  # caches the bf16 cast
    opt = PagedAdamW32bit([layer.lora_A.weight, layer.lora_B.weight], lr=1e-1, weight_decay=0.0)
    layer(x).float().square().sum().backward()
    opt.step()
    with torch.no_grad():
        after = layer(x)
        want = layer._adapter_in_compute_dtype()[1]
    assert not torch.equal(after, before)
    assert torch.equal(want, layer.lora_B.weight.to(torch.bfloat16))
