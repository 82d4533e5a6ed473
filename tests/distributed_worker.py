"""One rank of tests/test_distributed.py, started by torchrun on gloo (CPU): python -m torch.distributed.run
--standalone --nproc-per-node 2 tests/distributed_worker.py WORK_DIR. Reads WORK_DIR/job.json, writes
WORK_DIR/rank<k>.json with what it saw; the test compares that with a single process.

One process group does every check, so the two ranks start only once."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from optim_clip_checks import clip_checks
from qlora.cli import main
from qlora.distributed import Distributed
from qlora.finetune import finetune, load_model
from qlora.fsdp import full_nf4_weight, nf4_bytes, shard_model
from qlora.model import prepare_model, quantised_layers, save_adapter


def run_finetune(job: dict, out: Path, **kwargs) -> list[float]:
    losses = []
    finetune(model=job["model"], data=job["data"], out=out, step_callback=lambda step, loss: losses.append(loss),
             **job["settings"], **kwargs)
    return losses


def build(job: dict, work: Path, targets="all-linear"):
    net = load_model(Path(job["model"]), torch.device("cpu"), torch.bfloat16, work)
    torch.manual_seed(0)
    return prepare_model(net, target_modules=targets, r=job["settings"]["r"], dropout=0.0, verbose=False)


def save_whole_adapters(job: dict, work: Path, rank: int, world: int) -> None:
    """LoRA on the embedding and on lm_head (LoRAEmbedding, LoRALinear; the vocabulary, 259 rows, splits
    unevenly) under FSDP2: what Distributed.whole() gives save_adapter, against an unsharded model's."""
    targets = ["q_proj", "embed_tokens", "lm_head"]
    unsharded = build(job, work / f"unsharded{rank}", targets)
    fsdp = Distributed(rank=rank, world_size=world, mode="fsdp")
    sharded = fsdp.wrap(build(job, work / f"fsdp-adapters{rank}", targets))
    optimizer = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad])
    with fsdp.whole(sharded, optimizer) as (model, _):  # a collective: every rank enters it
        if rank == 0:
            save_adapter(model, work / "embedding-adapter-fsdp")
            save_adapter(unsharded, work / "embedding-adapter-unsharded")


def check(work: Path) -> None:
    job = json.loads((work / "job.json").read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seen: dict = {"world_size": world}

    seen["ddp_losses"] = run_finetune(job, work / "ddp")
    seen["fsdp_losses"] = run_finetune(job, work / "fsdp", fsdp=True, save_nf4=True)
    # A checkpoint saved by one process at step 2, resumed here on two ranks, through the CLI.
    options = [f"--{key.replace('_', '-')}={value}" for key, value in job["settings"].items() if key != "progress"]
    assert main(["finetune", f"--model={job['model']}", f"--data={job['data']}", f"--out={work / 'resumed'}",
                 *options, "--no-progress", "--resume", "--fsdp"]) == 0

    save_whole_adapters(job, work, rank, world)
    whole = build(job, work / f"whole{rank}")
    sharded = shard_model(build(job, work / f"sharded{rank}"))
    held, total = nf4_bytes(sharded)
    seen["nf4_bytes_held"], seen["nf4_bytes_whole"] = held, total
    seen["nf4_bytes_unsharded"] = nf4_bytes(whole)
    # Every rank's own part of the NF4 codes and scales: 1/world of each tensor, in FSDP's chunks.
    seen["local_rows"] = {name: [layer.weight.to_local().shape[0], layer.weight.shape[0]]
                          for name, layer in quantised_layers(sharded).items()}
    whole_layers = quantised_layers(whole)
    identical = []
    for name, layer in quantised_layers(sharded).items():
        gathered = full_nf4_weight(layer)
        reference = whole_layers[name].nf4_weight
        identical.append(name if (torch.equal(gathered.packed, reference.packed)
                                  and torch.equal(gathered.dequantize().view(torch.int16),
                                                  reference.dequantize().view(torch.int16))) else "")
    seen["gathered_identical"] = identical

    # DDP leaves the frozen base alone: a byte only this rank has survives setup and a step, while the
    # LoRA gradients come out all-reduced (equal on every rank).
    probe = build(job, work / f"probe{rank}")
    layer = next(iter(quantised_layers(probe).values()))
    marker = 0x50 + rank
    layer.weight[0, 0] = marker  # packed codes, uint8 [n, 1]
    ddp = Distributed(rank=rank, world_size=world, mode="ddp").wrap(probe)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(rank))
    ddp(ids, labels=ids).loss.backward()
    seen["ddp_kept_own_nf4_byte"] = int(layer.weight[0, 0]) == marker
    seen["ddp_lora_grad"] = layer.lora_B.weight.grad.double().sum().item()
    seen["clip"] = clip_checks()
    (work / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    check(Path(sys.argv[1]))
