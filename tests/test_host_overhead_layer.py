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
