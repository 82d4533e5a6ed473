"""Two ranks on gloo (CPU), started by torchrun in the test: DDP and FSDP2 follow the single-process
trajectory with the same global batch, each rank holds half the NF4 bytes, gathered weights are the
stored bytes, and what a sharded run saves (adapter, NF4 checkpoint) equals a single process's."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from qlora.finetune import finetune

WORLD = 2
# float32 compute: the comparison is of the parallel arithmetic, not of bf16 rounding.
SETTINGS = dict(steps=3, batch=1, seq=32, r=4, dropout=0.0, compute_dtype="float32", progress=False, save_every=2)
WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without distributed / gloo")


def this_checkout_first(env) -> dict:
    """The environment for a subprocess that imports this checkout's qlora."""
    root = str(Path(__file__).resolve().parents[1])
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, nf4_checkpoint):
    """The single-process reference (global batch 2) and one two-rank torchrun doing every check."""
    work = tmp_path_factory.mktemp("distributed")
    text = (Path(__file__).resolve().parents[1] / "qlora" / "data" / "finetune.txt").read_text()
    (work / "data.txt").write_text(text[:700])  # short: the held-out evaluation is cheap
    job = {"model": str(nf4_checkpoint), "data": str(work / "data.txt"), "settings": SETTINGS}
    (work / "job.json").write_text(json.dumps(job))

    single = dict(SETTINGS, batch=SETTINGS["batch"] * WORLD)
    losses = []
    record = lambda step, loss: losses.append(loss)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets each rank: on a busy machine many threads are much slower
    try:
        finetune(model=nf4_checkpoint, data=work / "data.txt", out=work / "single", step_callback=record,
                 **dict(single, steps=2))
        shutil.copytree(work / "single", work / "resumed")  # step 2, resumed by two FSDP ranks
        finetune(model=nf4_checkpoint, data=work / "data.txt", out=work / "single", resume=True,
                 step_callback=record, save_nf4=True, **single)
    finally:
        torch.set_num_threads(threads)

    env = this_checkout_first(os.environ)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               str(WORKER), str(work)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((work / f"rank{k}.json").read_text()) for k in range(WORLD)]
    return work, losses, ranks


def test_ddp_and_fsdp_follow_the_single_process_trajectory(runs):
    _, single, ranks = runs
    assert len(single) == SETTINGS["steps"] and single[0] > single[-1]  # it trains
    for seen in ranks:
        assert seen["world_size"] == WORLD
        for key in ("ddp_losses", "fsdp_losses"):
            assert seen[key] == pytest.approx(single, rel=5e-6, abs=0), key  # 2e-7 here; no clip all-reduce: 9e-5
    # resumed at step 2 with another world size (by the CLI): the last step of the same trajectory
    report = json.loads((runs[0] / "resumed" / "report.json").read_text())
    assert (report["first_step"], report["last_train_loss"]) == (2, pytest.approx(single[2], abs=1e-4))


@pytest.mark.parametrize("run", ["ddp", "fsdp", "resumed"])
def test_saved_adapter_equals_the_single_process_one(runs, run):
    work, _, _ = runs
    expected = load_file(work / "single" / "adapter_model.safetensors")
    saved = load_file(work / run / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and len(saved) == 2 * 7 * 4
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    assert json.loads((work / run / "adapter_config.json").read_text())["r"] == SETTINGS["r"]
    report = json.loads((work / run / "report.json").read_text())
    assert (report["world_size"], report["parallel"]) == (WORLD, "ddp" if run == "ddp" else "fsdp")
    assert report["batch"] == SETTINGS["batch"] and report["train_tokens"] > 0


def test_whole_gathers_embedding_and_lm_head_adapters_too(runs):
    work, _, _ = runs
    expected = load_file(work / "embedding-adapter-unsharded" / "adapter_model.safetensors")
    saved = load_file(work / "embedding-adapter-fsdp" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and len(saved) == 2 * (4 + 2)  # q_proj x 4 layers, embed_tokens, lm_head
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in saved
    assert "base_model.model.lm_head.lora_A.weight" in saved
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key


def test_each_rank_holds_half_of_the_nf4_bytes(runs):
    _, _, ranks = runs
    whole = ranks[0]["nf4_bytes_whole"]
    assert all(seen["nf4_bytes_unsharded"] == [whole, whole] for seen in ranks)
    assert sum(seen["nf4_bytes_held"] for seen in ranks) == whole
    for seen in ranks:
        # FSDP2 pads to equal chunks: a rank holds half of each tensor, rounded up
        assert whole / WORLD - 64 <= seen["nf4_bytes_held"] <= whole / WORLD + 64
        for name, (local, total) in seen["local_rows"].items():
            assert local in (total // WORLD, -(-total // WORLD)), name
    # the tiny Llama: 4 layers x (4 x 256x256 + 3 x 704x256) weights at 4.127 bits, to the byte
    params = 4 * (4 * 256 * 256 + 3 * 704 * 256)
    assert whole == params // 2 + params // 64 + 4 * 4 * (4 * (256 * 256 // 64 // 256) + 3 * -(-704 * 256 // 64 // 256))


def test_ddp_reduces_lora_gradients_and_never_touches_the_nf4_buffers(runs):
    _, _, ranks = runs
    assert all(seen["ddp_kept_own_nf4_byte"] for seen in ranks)
    grads = [seen["ddp_lora_grad"] for seen in ranks]
    assert grads[0] != 0 and grads == [grads[0]] * WORLD


def test_gathered_weights_dequantise_bit_identically(runs):
    _, _, ranks = runs
    for seen in ranks:
        assert len(seen["gathered_identical"]) == 28 and all(seen["gathered_identical"])


def test_sharded_nf4_checkpoint_is_the_single_process_one(runs, nf4_checkpoint):
    work, _, _ = runs
    sharded, single = work / "fsdp" / "nf4", work / "single" / "nf4"
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    for file in single.iterdir():
        assert (sharded / file.name).read_bytes() == file.read_bytes(), file.name
    # and it holds the bitsandbytes bytes the run started from (norms: float32 for training, same values)
    source, saved = load_file(nf4_checkpoint / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert saved.keys() == source.keys()
    for key, tensor in source.items():
        assert torch.equal(saved[key].to(tensor.dtype), tensor), key
        assert saved[key].dtype == tensor.dtype or key.endswith("norm.weight"), key
    config = json.loads((sharded / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_fsdp_outside_torchrun_is_one_clear_line(tmp_path):
    """python -m qlora (what torchrun -m qlora runs) without torchrun's environment."""
    env = this_checkout_first({k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")})
    done = subprocess.run([sys.executable, "-m", "qlora", "finetune", "--fsdp", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "qlora finetune: error: --fsdp: not started by torchrun (no WORLD_SIZE, RANK, LOCAL_RANK in the "
        "environment); run: torchrun --nproc-per-node N -m qlora finetune --fsdp ..."]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mesh", ["line", "hsdp", "full"])
def test_clipping_dtensor_gradients_by_the_whole_norm(runs, mesh):
    """tests/optim_clip_checks.py: a whole tensor beside shards on a line, HSDP's (replicate, shard) mesh,
    both dimensions of a 2 x 1 mesh: one all-reduce gives the factor of the whole tensors' norm."""
    for seen in runs[2]:
        got, want = seen["clip"][mesh]
        assert want < 0.5 and got == pytest.approx(want, rel=1e-6)


def test_clipping_refuses_partial_and_mixed_meshes_in_one_line(runs):
    for seen in runs[2]:
        partial, meshes = seen["clip"]["partial"], seen["clip"]["two_meshes"]
        assert partial.startswith("max_grad_norm: parameter 1 of param group 0 has a gradient with placements "
                                  "(Partial(sum),)")
        assert meshes.startswith("max_grad_norm: parameter 1 of param group 0 has its gradient on mesh")
        assert "\n" not in partial + meshes


def test_a_clipped_step_with_whole_and_sharded_parameters_is_torchs(runs):
    for seen in runs[2]:
        assert seen["clip"]["step_moved"] > 1e-3 and seen["clip"]["step_error"] < 1e-6
