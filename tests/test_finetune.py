"""qlora finetune: the embedded default learns, its adapter loads in PEFT, resume is exact, bad input is refused."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.cli import UserError, main
from qlora.finetune import DEFAULT_MODEL, TRAINER_STATE, finetune, load_model, load_trainer_state, split_held_out

SMALL = dict(r=8, seq=64, batch=2, progress=False)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default recipe (r 64, alpha 16, dropout 0.05, lr 2e-4, clip 0.3), shortened."""
    out = tmp_path_factory.mktemp("ft") / "adapter"
    report = finetune(out=out, steps=20, seq=128, batch=4, progress=False)
    return out, report


def test_default_finetune_lowers_held_out_loss(default_run):
    out, report = default_run
    assert report["held_out_loss_after"] < report["held_out_loss_before"] - 0.03, report  # 2.244 -> 2.186 here
    assert (report["r"], report["alpha"], report["dropout"], report["lr"], report["max_grad_norm"]) == (64, 16, 0.05, 2e-4, 0.3)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["held_out_loss_after"] == report["held_out_loss_after"]
    assert on_disk["train_seconds"] > 0 and on_disk["peak_memory_bytes"] > 0


def test_adapter_loads_in_peft_and_gives_our_logits(default_run):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from qlora.model import load_adapter, prepare_model
    from qlora.nf4 import quantize_nf4

    out, _ = default_run
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 64 and config["lora_alpha"] == 16
    assert len(config["target_modules"]) == 4 * 7  # every linear of the 4 layers, lm_head left out

    # PEFT on the dequantised base (the weights the adapter was trained against), in float32.
    hf = transformers.LlamaForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(quantize_nf4(module.weight.to(torch.bfloat16)).dequantize(torch.float32))
    ids = torch.tensor([list(b"The gardener sows beans in May, and the soil is warm.")])
    with torch.no_grad():
        base_logits = hf(input_ids=ids).logits
        peft_logits = peft.PeftModel.from_pretrained(hf, str(out)).eval()(input_ids=ids).logits

    with tempfile.TemporaryDirectory() as work:
        ours = load_model(DEFAULT_MODEL, torch.device("cpu"), torch.bfloat16, Path(work))
    prepare_model(ours, r=64, alpha=16, dropout=0.0, verbose=False)
    load_adapter(ours, out)
    with torch.no_grad():
        our_logits = ours.eval()(ids).logits.float()
    adapter_effect = (peft_logits - base_logits).abs().max()
    assert adapter_effect > 0.05  # the trained adapter changes the outputs...
    # ...and ours (bf16 compute) agrees with PEFT's float32 far more closely than that
    assert (our_logits - peft_logits).abs().max() < adapter_effect / 2
    assert (our_logits - peft_logits).abs().mean() < 0.05


def test_interrupted_run_keeps_its_checkpoint_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    finetune(out=straight, steps=4, save_every=2, **SMALL)

    interrupted = tmp_path / "interrupted"

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(out=interrupted, steps=4, save_every=2, step_callback=interrupt, **SMALL)
    state = load_trainer_state(interrupted / TRAINER_STATE)
    assert state["step"] == 2 and not (interrupted / ".saving").exists()
    assert set(load_file(interrupted / "adapter_model.safetensors")) == set(load_file(straight / "adapter_model.safetensors"))

    report = finetune(out=interrupted, steps=4, save_every=2, resume=True, **SMALL)
    assert report["first_step"] == 2
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(interrupted / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    assert load_trainer_state(interrupted / TRAINER_STATE)["step"] == 4


def test_jsonl_data_is_read_by_text_field(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Note {i}: water the beans before noon."}) for i in range(10)))
    report = finetune(data=data, out=tmp_path / "out", steps=1, **SMALL)
    assert report["train_tokens"] == 2 * 64
    assert split_held_out([f"doc {i}" for i in range(10)]) == ([f"doc {i}" for i in range(8)], ["doc 8", "doc 9"])


def _cli_error(capsys, *argv) -> str:
    assert main(["finetune", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_inputs_give_one_clear_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "data file not found" in _cli_error(capsys, "--data", str(tmp_path / "missing.txt"), "--out", out)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "data file is empty" in _cli_error(capsys, "--data", str(empty), "--out", out)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    assert "bad.jsonl:2" in _cli_error(capsys, "--data", str(bad_jsonl), "--out", out)

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-model", "n_layer": 2}))
    assert "transformers cannot read its config" in _cli_error(capsys, "--model", str(unknown), "--out", out)
    assert "model directory not found" in _cli_error(capsys, "--model", str(tmp_path / "nope"), "--out", out)
    message = _cli_error(capsys, "--seq", "513", "--out", out)
    assert "--seq 513 is longer than the model's context (512 tokens" in message

    assert "nothing to resume" in _cli_error(capsys, "--resume", "--out", out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / TRAINER_STATE).write_bytes(b"not safetensors at all")
    assert "not a qlora trainer state" in _cli_error(capsys, "--resume", "--out", str(foreign))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    assert "already exists" in _cli_error(capsys, "--out", out)
    with pytest.raises(UserError, match="--steps"):
        finetune(out=tmp_path / "o2", steps=0)
