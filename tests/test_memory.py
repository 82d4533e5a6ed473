"""qlora bench-memory: predictions against hand-computed values, and a measured CPU step against predictions."""
import json

import pytest
import torch

from qlora.cli import main
from qlora.llama import LlamaConfig
from qlora.kernels import large_m
from qlora.memory import Shape, measure, predict, preset_config
from qlora.memory_predict import dequant_scratch_bytes

MiB = 2**20
# D 64, I 160, 2 layers, 4 heads of 16 (Q 64) on 2 KV heads (K 32), vocab 100.
SMALL = LlamaConfig.from_dict(dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=64))


def test_qlora_prediction_by_hand():
    got = predict(SMALL, "qlora", Shape(seq=32, batch=2, grad_ckpt=True, r=8, dropout=0.05, device="cuda"))
    # Linears per layer (in x out): q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x160, down 160x64.
    # weights: NF4 codes at half a byte (4096+2048+2048+4096+3*10240 = 43008 per layer -> 21504 bytes),
    # embed_tokens and lm_head in bf16 (2 * 100*64*2), five norms of 64 in float32.
    assert got["weights"] == 2 * 21504 + 2 * 100 * 64 * 2 + 5 * 64 * 4
    # per linear: one uint8 code per 64-block, one float32 per 256 blocks (one here), tables 64 + 1024 + 4 bytes.
    blocks_per_layer = 64 + 32 + 32 + 64 + 3 * 160
    assert got["quant_constants"] == 2 * (blocks_per_layer + 7 * 4 + 7 * 1092)
    # LoRA r=8: A [8, in] + B [out, 8] for each linear; float32.
    adapter_params = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 160))
    assert adapter_params == 17920
    assert got["adapters"] == got["gradients"] == 4 * 17920
    # 28 tensors, each rounded up to 2048 elements: 57344 elements, one 16 MiB page of both moments.
    assert got["optimizer_states"] == 16 * MiB
    # activations, T = 64 tokens, T' = 62: the largest moment is the recomputed layer's backward.
    per_token = (2 * (4 * 64 + 4)                     # two float32 norms + rsqrt
                 + 3 * (3 * 64 + 64 + 2 * 64 + 160)   # bool dropout mask + bf16 dropped input, per linear input
                 + 7 * 2 * 8                          # x A^T per linear
                 + 4 * 64 + 4 * 64 + 4 * 4            # q, expanded k and v, output (bf16), logsumexp
                 + 6 * 160)                           # gate, silu(gate), up
    layer = per_token * 64 + 2 * 17920 // 2           # + the bf16 copies of A and B
    checkpoint_inputs = 2 * 2 * 64 * 64
    in_flight = (8 * 64 + 2 * 160) * 64
    loss_moment = checkpoint_inputs + (4 * 64 + 4) * 64 + 12 * 100 * 62
    assert checkpoint_inputs + layer + in_flight > loss_moment
    assert got["activations"] == checkpoint_inputs + layer + in_flight + 2 * 2 * 32 * 16  # + rotary tables
    # cuBLAS, and the dequantise scratch: down_proj's in_features 160 is not a multiple of the 64-block, so its
    # bf16 W [64, 160] is dequantised into the device's scratch buffer at any M (the others stay fused at M 64).
    assert got["workspace"] == 32 * MiB + 2 * 64 * 160


def test_other_modes_by_hand():
    shape = Shape(seq=32, batch=2, grad_ckpt=True, r=8, device="cuda")
    full = predict(SMALL, "bf16-full", shape)
    params = 2 * 43008 + 2 * 100 * 64 + 5 * 64
    assert full["weights"] == full["gradients"] == 2 * params
    assert full["adapters"] == full["quant_constants"] == 0
    lora = predict(SMALL, "bf16-lora", shape)
    assert lora["weights"] == 2 * (2 * 43008 + 2 * 100 * 64) + 4 * 5 * 64
    # Every page resident (qlora.memory_placement applies qlora-paged's budget): the 7B adapters' 160M
    # float32 values, 8 bytes of states each, in 16 MiB pages.
    seven_b = preset_config("llama-7b")
    paged = predict(seven_b, "qlora-paged", Shape(device="cuda"))
    resident = predict(seven_b, "qlora", Shape(device="cuda"))
    assert resident["optimizer_states"] == 16 * MiB * -(-(8 * 159_907_840) // (16 * MiB))
    assert paged == resident


def test_without_checkpointing_every_layer_keeps_its_activations():
    on = predict(SMALL, "qlora", Shape(seq=32, batch=2, grad_ckpt=True, r=8, device="cuda"))
    off = predict(SMALL, "qlora", Shape(seq=32, batch=2, grad_ckpt=False, r=8, device="cuda"))
    saved = 2 * (3752 * 64 + 17920)  # both layers' activations (per token as in the hand computation above)
    final_norm_moment = saved + (4 * 64 + 4) * 64 + 38 * 64 * 64  # float32 norm backward temporaries
    layer_moment = saved + (8 * 64 + 2 * 160) * 64
    assert final_norm_moment > layer_moment
    assert off["activations"] == final_norm_moment + 2 * 2 * 32 * 16
    assert off["activations"] > on["activations"]


def test_dequant_scratch_counts_the_largest_unfused_layer_either_direction(monkeypatch):
    config = preset_config("llama-65b")
    big = 22016 * 8192  # gate/up [22016, 8192] and down [8192, 22016], the largest linears
    # A cost model that keeps the forward fused up to 384 tokens and the input gradient up to 228 (the
    # qlora/kernels/large_m.py model before its tiles overlapped decode and MMA).
    limits = {"forward": 384, "grad_input": 228}
    monkeypatch.setattr(large_m, "prefer_fused", lambda M, N, K, direction="forward": M <= limits[direction])
    assert dequant_scratch_bytes(config, Shape(seq=200)) == 0
    assert dequant_scratch_bytes(config, Shape(seq=150, batch=2)) == 2 * big == 360_710_144  # backward only
    at_2048 = predict(config, "qlora", Shape(seq=2048, device="cuda"))
    assert at_2048["workspace"] == 32 * MiB + 360_710_144
    assert predict(config, "qlora", Shape(seq=200, device="cuda"))["workspace"] == 32 * MiB
    # Only the NF4 modes dequantise, only on CUDA (the CPU reference's dequantised W is transient).
    assert predict(config, "bf16-lora", Shape(seq=2048, device="cuda"))["workspace"] == 32 * MiB
    assert predict(config, "qlora", Shape(seq=2048, device="cpu"))["workspace"] == 0


@pytest.mark.parametrize("mode,grad_ckpt", [("qlora", True), ("qlora", False), ("bf16-lora", True)])
def test_measured_cpu_step_matches_prediction(mode, grad_ckpt):
    torch.manual_seed(0)
    config = LlamaConfig.from_dict(dict(model_type="llama", hidden_size=128, intermediate_size=352,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=300, max_position_embeddings=256))
    shape = Shape(seq=96, batch=2, grad_ckpt=grad_ckpt, r=16, device="cpu")
    predicted = predict(config, mode, shape)
    result = measure(config, mode, shape, "cpu")
    assert torch.isfinite(torch.tensor(result["loss"]))
    # What the model and optimizer hold is counted exactly...
    for component in ("weights", "quant_constants", "adapters", "gradients", "optimizer_states"):
        assert result["static"][component] == predicted[component], component
    # ...and what the step adds (activations and temporaries) is within 10% of the analytic model.
    step = predicted["activations"] + predicted["workspace"]
    assert abs(result["step_extra_bytes"] - step) <= 0.10 * step, (result["step_extra_bytes"], step)
    assert result["peak_bytes"] >= sum(predicted.values()) - 0.10 * step
    # The whole peak, too, within the 10 % (optimizer states held once, not twice).
    total = sum(predicted.values())
    assert abs(result["peak_bytes"] - total) <= 0.10 * total, (result["peak_bytes"], total)


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert main(["bench-memory", "--preset", "llama-65b", "--grad-ckpt", "--device", "cuda",
                 "--modes", "qlora,qlora-paged", "--gpu-budget", "32MiB", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| qlora-paged |" in printed and "optimizer_states" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["qlora", "qlora-paged"]
    assert rows[1]["host_bytes"] > 6e9 and rows[1]["predicted_total_bytes"] < rows[0]["predicted_total_bytes"]
    assert main(["bench-memory", "--preset", "tiny", "--modes", "qlora,nonsense"]) == 2
    assert "unknown ['nonsense']" in capsys.readouterr().err
    assert main(["bench-memory", "--preset", "tiny", "--measure", "--device", "cpu"]) == 2  # seq 2048 > 512
    assert "--seq 2048 is longer than the model's context (512 tokens)" in capsys.readouterr().err


def test_png_chart_or_a_clear_message(tmp_path, capsys, monkeypatch):
    png = tmp_path / "mem.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        assert main(["bench-memory", "--preset", "tiny", "--seq", "256", "--png", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    assert main(["bench-memory", "--preset", "tiny", "--seq", "256", "--png", str(tmp_path / "b.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
