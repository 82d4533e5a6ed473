"""Where a training step's memory lives: the per-rank share when several GPUs train one model (DDP or
FSDP2), and the optimizer states PagedAdamW32bit keeps on the device under its budget.

Several ranks (each with its own batch of `shape.batch` sequences, so activations are per rank as on one GPU):

    DDP   every rank holds the whole model, adapters, gradients and optimizer states, plus the reducer's
          buckets: a flat copy of every gradient (torch's default, gradient_as_bucket_view=False), counted
          as workspace.
    FSDP2 (LoRA modes) each layer's frozen weights (NF4 codes, norms), quantisation constants, LoRA weights,
          gradients and optimizer states are sharded: a rank holds ceil(bytes / N) of each frozen tensor and
          ceil(rows / N) rows of each trainable one (FSDP2 shards dim 0). On top of its shards a rank holds,
          at the peak, two layers all-gathered (the one computing and the one prefetched): their codes,
          norms, constants and LoRA weights, and one layer's full LoRA gradients (the reduce-scatter input).
          The root group (embeddings, lm_head, final norm) stays gathered from forward to backward (FSDP2
          does not reshard the root after forward), so it is counted whole.

Paging (qlora-paged on a GPU) follows PagedStates in qlora/optim.py, in pages of PAGE_BYTES: with a capacity
of C pages, a state space of n pages stays resident when n <= C; otherwise C - s pages stay resident and s
streaming slots (3 when C > 3, else 2) are on the device too, the other pages in pinned host memory. An
integer budget gives C = budget // PAGE_BYTES. "auto" (the optimizer's default) leaves room for the
step's peak, by the optimizer's own rule (qlora.paged_budget.auto_state_bytes): C = (gpu_memory - the peak
besides the states - reserve) // PAGE_BYTES, reserve = max(2 pages, 5 % of gpu_memory), the peak being at
least what is allocated at the step (weights, constants, adapters, gradients, workspace). So the step
fits unless even the two streaming slots do not: `fits` says whether it does, and `largest_budget` the
largest budget with which the step fits.
"""
from __future__ import annotations

from dataclasses import dataclass

from qlora.memory_predict import (
    PAGE_BYTES,
    Shape,
    linear_shapes,
    nf4_bytes,
    optimizer_pages,
    predict,
    trainable_shapes,
)
from qlora.paged_budget import auto_reserve, auto_state_bytes
from qlora.paged_states import STREAM_SLOTS

DEFAULT_GPU_MEMORY = 80 * 2**30  # an 80 GB H100, where there is no GPU to ask
# Allocated at the optimizer step (activations freed), when PagedAdamW32bit's "auto" decides.
HELD_AT_STEP = ("weights", "quant_constants", "adapters", "gradients", "workspace")


@dataclass
class Placement:
    world_size: int = 1
    fsdp: bool = False
    gpu_budget: int | str = "auto"  # bytes of device memory the optimizer states may hold, or "auto"
    gpu_memory: int = DEFAULT_GPU_MEMORY  # bytes the allocator can use on one device


def _shard(n: int, world_size: int) -> int:
    return -(-n // world_size)


def sharded_trainable(config, mode: str, shape: Shape, world_size: int) -> list[int]:
    """Element counts of one rank's shard of each trainable tensor (rank 0: ceil(rows / N) rows)."""
    return [_shard(rows, world_size) * cols for rows, cols in trainable_shapes(config, mode, shape.r)]


def fsdp_rank_bytes(config, mode: str, shape: Shape, world_size: int) -> dict[str, int]:
    """One FSDP2 rank's peak bytes by component, every optimizer page resident (see the module docstring)."""
    if mode not in ("bf16-lora", "qlora", "qlora-paged"):
        raise ValueError(f"FSDP is modelled for the LoRA modes (bf16-lora, qlora, qlora-paged), not {mode}")
    N, L, D = world_size, config.num_hidden_layers, config.hidden_size
    out = predict(config, mode, shape)  # activations and workspace are per rank as on one device
    numels = [i * o for _, i, o in linear_shapes(config)]
    if mode == "bf16-lora":
        codes, constants = [2 * n for n in numels], [0 for _ in numels]
    else:
        codes, constants = [nf4_bytes(n)[0] for n in numels], [nf4_bytes(n)[1] for n in numels]
    norms = [4 * D, 4 * D]  # float32, as prepare_model leaves them
    layer_frozen = codes + norms
    root = 2 * config.vocab_size * D * (1 if config.tie_word_embeddings else 2) + 4 * D
    out["weights"] = L * sum(_shard(b, N) for b in layer_frozen) + 2 * sum(layer_frozen) + root
    out["quant_constants"] = L * sum(_shard(b, N) for b in constants) + 2 * sum(constants)
    layer_lora = shape.adapter_bytes * shape.r * sum(i + o for _, i, o in linear_shapes(config))
    shards = sharded_trainable(config, mode, shape, N)
    out["adapters"] = shape.adapter_bytes * sum(shards) + 2 * layer_lora
    out["gradients"] = shape.adapter_bytes * sum(shards) + layer_lora
    out["optimizer_states"] = optimizer_pages(shards) * PAGE_BYTES
    return out


def rank_bytes(config, mode: str, shape: Shape, world_size: int = 1, fsdp: bool = False) -> dict[str, int]:
    """Peak bytes of one rank (one device when world_size is 1 and not FSDP), every state page resident."""
    if fsdp:
        return fsdp_rank_bytes(config, mode, shape, world_size)
    out = predict(config, mode, shape)
    if world_size > 1:
        out["workspace"] += out["gradients"]  # DDP's buckets
    return out


def paged_pages(n_pages: int, capacity: int) -> tuple[int, int]:
    """(pages on the device, pages in host memory) of n_pages of states with a capacity of `capacity` pages."""
    if n_pages <= capacity:
        return n_pages, 0
    slots = STREAM_SLOTS if capacity > STREAM_SLOTS else 2
    resident = max(capacity - slots, 0)
    return resident + slots, n_pages - resident


def capacity_pages(gpu_budget: int | str, gpu_memory: int, peak_bytes: int, held_bytes: int) -> int:
    """Pages the optimizer states may hold: the budget's, or under "auto" what a step's peak
    (peak_bytes besides the states) leaves; held_bytes are allocated at the step besides the states."""
    if gpu_budget != "auto":
        return gpu_budget // PAGE_BYTES
    room = auto_state_bytes(gpu_memory, peak_bytes, held_bytes, 0, auto_reserve(gpu_memory, PAGE_BYTES))
    return room // PAGE_BYTES


def place(config, mode: str, shape: Shape, placement: Placement = Placement()) -> dict:
    """One rank's prediction: {"predicted": bytes by component on the device, "host_bytes": pinned host
    memory of paged states, "state_pages": (on the device, on the host), "fits": whether the peak fits
    gpu_memory, "largest_budget": the largest gpu_budget with which it fits (qlora-paged; None if none)}."""
    device = rank_bytes(config, mode, shape, placement.world_size, placement.fsdp)
    if placement.fsdp:
        n_pages = optimizer_pages(sharded_trainable(config, mode, shape, placement.world_size))
    else:
        n_pages = device["optimizer_states"] // PAGE_BYTES
    state_pages, largest_budget = (n_pages, 0), None
    if mode == "qlora-paged" and shape.device == "cuda":
        held = sum(device[c] for c in HELD_AT_STEP)
        peak = sum(device.values()) - device["optimizer_states"]
        state_pages = paged_pages(n_pages, capacity_pages(placement.gpu_budget, placement.gpu_memory, peak, held))
        device["optimizer_states"] = state_pages[0] * PAGE_BYTES
        room = placement.gpu_memory - (sum(device.values()) - device["optimizer_states"])
        # Below two pages the optimizer cannot stream; above all pages a larger budget changes nothing.
        if room >= 2 * PAGE_BYTES:
            largest_budget = min(room // PAGE_BYTES, n_pages) * PAGE_BYTES
    total = sum(device.values())
    return {"predicted": device, "predicted_total_bytes": total, "host_bytes": state_pages[1] * PAGE_BYTES,
            "state_pages": state_pages, "fits": total <= placement.gpu_memory, "largest_budget": largest_budget}
