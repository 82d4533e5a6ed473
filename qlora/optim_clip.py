"""Gradient clipping by the whole norm when gradients are DTensor shards (FSDP2, HSDP).

Each rank sums the squares of its local pieces; one all-reduce over the mesh the DTensors live on
adds them up (one per reduced dimension when they are several and the mesh is only part of the
world). All DTensor gradients must live on one mesh: FSDP2 with tensor parallelism puts TP-sharded
parameters on the (dp, tp) mesh and the others on the dp mesh, which is refused in one line (not
supported yet). A mesh dimension is reduced over when some gradient is sharded along it (Shard);
a gradient replicated along a reduced dimension (Replicate) is counted there once, by dividing its
squares by the number of copies. Plain tensors beside the DTensors are whole and alike on every rank
(DDP, or parameters FSDP leaves unsharded), so each rank adds them once, after the reduction.
Partial placements (unreduced sums) cannot be squared piecewise and are refused, as are gradients
on different meshes; each in one line naming the parameter.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from qlora.kernels.adamw import grad_clip_factor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: no parameter is sharded
    DTensor = ()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor, else t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _square_sum(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares in float32 on device (one _foreach_norm per device and dtype)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for group in by_kind.values():
        norms = torch._foreach_norm(group, 2.0, dtype=torch.float32)
        total += torch.stack(norms).to(device).square().sum()
    return total


def _reduced_dims(grads: Sequence, name: Callable[[int], str]):
    """(the mesh, the mesh dimensions some gradient is sharded along) of the DTensor gradients."""
    mesh, dims = None, set()
    for i, g in enumerate(grads):
        if not isinstance(g, DTensor):
            continue
        if mesh is None:
            mesh = g.device_mesh
        elif g.device_mesh != mesh:
            raise ValueError(f"max_grad_norm: {name(i)} has its gradient on mesh {g.device_mesh}, another on "
                             f"{mesh}; clipping by the whole norm needs all sharded gradients on one mesh")
        for d, placement in enumerate(g.placements):
            if placement.is_partial():
                raise ValueError(f"max_grad_norm: {name(i)} has a gradient with placements {tuple(g.placements)} "
                                 "on its mesh; clipping needs Shard or Replicate (reduce the Partial sums first)")
            if placement.is_shard():
                dims.add(d)
    return mesh, sorted(dims)


def _all_reduce(total: torch.Tensor, mesh, dims: list[int]) -> None:
    import torch.distributed as dist

    if not dims:
        return
    if len(dims) == 1:
        dist.all_reduce(total, group=mesh.get_group(dims[0]))
    elif len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        dist.all_reduce(total)  # the mesh is every rank: the default group
    else:  # several dimensions of a mesh that is part of the world: one sum per dimension
        for d in dims:
            dist.all_reduce(total, group=mesh.get_group(d))


def clip_factor(grads: Sequence[torch.Tensor], max_norm: float,
                name: Callable[[int], str] = lambda i: f"gradient {i}") -> torch.Tensor:
    """min(1, max_norm / (whole L2 norm + 1e-6)) as a float32 [1] tensor on the first gradient's
    device, the factor torch.nn.utils.clip_grad_norm_ applies; grads may be DTensors (module docstring).
    name(i) says which parameter gradient i belongs to, for the error lines."""
    if not any(isinstance(g, DTensor) for g in grads):
        return grad_clip_factor(grads, max_norm)
    mesh, dims = _reduced_dims(grads, name)
    device = local(grads[0]).device
    by_copies: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            copies = math.prod(mesh.size(d) for d in dims if not g.placements[d].is_shard())
            by_copies.setdefault(copies, []).append(g.to_local())
    total = sum(_square_sum(pieces, device) / copies for copies, pieces in by_copies.items())
    _all_reduce(total, mesh, dims)
    whole = [g for g in grads if not isinstance(g, DTensor)]
    if whole:
        total = total + _square_sum(whole, device)
    return torch.clamp(max_norm / (total.sqrt() + 1e-6), max=1.0).reshape(1)
