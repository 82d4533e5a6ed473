"""Data parallelism for fine-tuning: torchrun's environment, DDP or FSDP2, and rank-0 checkpoints.

Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK in the environment) each process trains on its own
slice of every step's global batch: rank k takes rows [k * batch, (k + 1) * batch) of the batch a
single process would draw with batch * world_size rows, so a run on N ranks follows the same
trajectory as one process with N times the batch.

DDP: only the LoRA parameters are registered with DistributedDataParallel; the frozen base (NF4
buffers, embeddings, norms) is ignored, so it is never broadcast or all-reduced (every rank loads it
from the same checkpoint). FSDP2: see qlora.fsdp. Checkpoints are world-size free: the adapter and
the optimizer moments are gathered whole and written by rank 0 alone, and a resume slices them
again for whatever world size it runs with.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qlora.fsdp import full_tensor, local_tensor, save_nf4_checkpoint, shard_model
from qlora.targets import quantised_layers

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # per-element optimizer states, sharded like the parameter


@dataclass
class Distributed:
    """Where this process stands: rank, world size, and how the model is spread (None, "ddp", "fsdp")."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode is not None

    def device(self, requested: str | None) -> torch.device:
        """cuda:LOCAL_RANK under torchrun on GPUs (one GPU per process), else the requested device."""
        device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.active and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # ---- data --------------------------------------------------------------------------------

    def rows(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a step's global batch."""
        per_rank = global_batch.shape[0] // self.world_size
        return global_batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (each rank's loss is over equally many tokens)."""
        if not self.active:
            return value.item()
        total = value.detach().float().clone().reshape(1)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ---- the model ---------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP or FSDP2 around a prepared model (adapters loaded); the optimizer is built after this."""
        if self.mode == "fsdp":
            return shard_model(model)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
            frozen += [name for name, _ in model.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
            device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids)  # buffers: all ignored above
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The model itself, without DDP's wrapper (FSDP2 wraps in place)."""
        return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model

    @contextlib.contextmanager
    def whole(self, model: nn.Module, optimizer):
        """(model, optimizer view) to save from: every trainable parameter as a whole tensor and state_dict()
        with whole moments. A collective under FSDP: every rank must enter it."""
        model = self.unwrap(model)
        if self.mode != "fsdp":
            yield model, optimizer
            return
        saved = []
        # Every trainable parameter, whatever holds it: QuantLoRALinear's, LoRALinear's and LoRAEmbedding's
        # adapters, trained biases and modules_to_save (what save_adapter writes). In module order, the same
        # on every rank, as the collectives need.
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    saved.append((module, name, p))
        swapped = []
        try:
            for module, name, p in saved:  # a gather that fails (out of memory) leaves no module swapped
                module._parameters[name] = nn.Parameter(full_tensor(p.detach()), requires_grad=False)
                swapped.append((module, name, p))
            yield model, _WholeOptimizerState(optimizer)
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p

    def load_optimizer_state(self, optimizer, state_dict: dict) -> None:
        """Load whole moments (as saved from whole()) into an optimizer over sharded or whole parameters."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved = [i for group in state_dict["param_groups"] for i in group["params"]]
        by_index = dict(zip(saved, params))
        state = {}
        for index, entry in state_dict["state"].items():
            p = by_index.get(index)  # None: an index no group lists, which load_state_dict names
            state[index] = {name: _this_shard(value, p) if name in MOMENTS and p is not None else value
                            for name, value in entry.items()}
        optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


class _WholeOptimizerState:
    """An optimizer's state_dict() with every moment of a sharded parameter gathered whole: gathered
    here, on every rank (a collective), so that rank 0 alone may then call state_dict()."""

    def __init__(self, optimizer):
        from torch.distributed.tensor import DTensor

        self.whole = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, entry in self.whole["state"].items():
            p = params[index]
            if not isinstance(p, DTensor):
                continue
            for name in MOMENTS:
                if name not in entry:
                    continue
                shard = entry[name].to(local_tensor(p).device)
                entry[name] = DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape,
                                                 stride=p.stride()).full_tensor().cpu()

    def state_dict(self) -> dict:
        return self.whole


def _this_shard(whole: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole tensor laid out like the (possibly sharded) parameter p."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return whole
    whole = whole.reshape(p.shape)
    mesh = p.device_mesh
    (placement,) = p.placements  # FSDP2 on a 1-D mesh: Shard(0)
    chunks = torch.chunk(whole, mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    local = chunks[rank] if rank < len(chunks) else whole.new_empty((0, *whole.shape[1:]))
    if tuple(local.shape) != tuple(local_tensor(p).shape):
        raise ValueError(f"optimizer state of shape {list(whole.shape)}: shard {list(local.shape)} does not fit "
                         f"the parameter's local shard {list(local_tensor(p).shape)}")
    return local.clone()


def save_base_model(model: nn.Module, directory: Path, source_dir: Path, compute_dtype: str, write: bool) -> None:
    """DIRECTORY: the frozen 4-bit base as a model directory (model.safetensors in the bitsandbytes layout,
    config.json with its quantization_config, the source's tokenizer files) that `--model` and transformers
    + bitsandbytes load. The same bytes from a sharded or a single process; sharded, every rank must call
    it (the weights are gathered whole) and only those with write=True write."""
    from qlora.convert import _copy_other_files, quantization_config
    from qlora.safe_output import replace_dir

    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    if write:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    try:
        save_nf4_checkpoint(model, partial / "model.safetensors", write=write)
        if not write:
            return
        _copy_other_files(source_dir, partial)
        config = json.loads((source_dir / "config.json").read_text())
        double_quant = all(layer.double_quant for layer in quantised_layers(model).values())
        config.setdefault("quantization_config", quantization_config(double_quant, compute_dtype, ["lm_head"]))
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        replace_dir(partial, directory, force=True)
    finally:
        if write:
            shutil.rmtree(partial, ignore_errors=True)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def from_environment(fsdp: bool = False, device: str | None = None) -> Distributed:
    """Join torchrun's process group (gloo on the CPU, nccl on GPUs) if the environment names one.

    Without torchrun this is a single process (and fsdp=True is an error: there is nothing to shard
    over). A group someone else initialised is used as is and left open."""
    from qlora.errors import UserError

    if not dist.is_available():
        if fsdp:
            raise UserError("--fsdp: this torch build has no torch.distributed")
        return Distributed()
    owns = False
    if not dist.is_initialized():
        if not all(name in os.environ for name in TORCHRUN_VARIABLES):
            if fsdp:
                raise UserError("--fsdp: not started by torchrun (no WORLD_SIZE, RANK, LOCAL_RANK in the "
                                "environment); run: torchrun --nproc-per-node N -m qlora finetune --fsdp ...")
            return Distributed()
        wants_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if wants_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if wants_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        owns = True
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                       mode="fsdp" if fsdp else "ddp", owns_group=owns)
