"""Clipping with DTensor gradients, checked by each of two gloo ranks inside tests/distributed_worker.py's
process group (no torchrun launch of its own). Every rank builds the same whole gradients, shards them
on several meshes and reports the clip factors it computed beside the whole norms' (float64, from the
whole tensors); tests/test_distributed.py compares them."""
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from qlora.optim import PagedAdamW32bit
from qlora.optim_clip import clip_factor

MAX_NORM = 0.5
SHAPES = [(6, 5), (9,), (4, 3)]  # 9 rows split 5 + 4 over two ranks: uneven shards


def whole_grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def expected(tensors) -> float:
    norm = torch.linalg.vector_norm(torch.stack([t.double().norm() for t in tensors])).item()
    return min(1.0, MAX_NORM / (norm + 1e-6))


def factor(grads) -> float:
    return clip_factor(grads, MAX_NORM).item()


def refused(grads) -> str:
    try:
        clip_factor(grads, MAX_NORM, lambda i: f"parameter {i} of param group 0")
    except ValueError as err:
        return str(err)
    return ""


def clip_checks() -> dict:
    """What this rank saw (two ranks)."""
    seen: dict = {}
    line = init_device_mesh("cpu", (2,), mesh_dim_names=("shard",))
    hsdp = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    full = init_device_mesh("cpu", (2, 1), mesh_dim_names=("shard", "tp"))

    a, b, c = whole_grads(0)
    # FSDP2 on a line: a whole tensor first, a sharded one, a replicated one.
    seen["line"] = [factor([a, distribute_tensor(b, line, [Shard(0)]), distribute_tensor(c, line, [Replicate()])]),
                    expected([a, b, c])]
    # HSDP: sharded along the mesh's second dimension, replicated along the first.
    seen["hsdp"] = [factor([distribute_tensor(t, hsdp, [Replicate(), Shard(0)]) for t in (a, b, c)]),
                    expected([a, b, c])]
    # Sharded along both dimensions of a mesh that is the whole world, one tensor replicated on it.
    seen["full"] = [factor([distribute_tensor(a, full, [Shard(0), Shard(1)]), distribute_tensor(b, full, [Shard(0), Replicate()]),
                            distribute_tensor(c, full, [Replicate(), Replicate()])]), expected([a, b, c])]
    partial = DTensor.from_local(a / 2, line, [Partial()])  # as a gradient before its reduction
    seen["partial"] = refused([distribute_tensor(b, line, [Shard(0)]), partial])
    seen["two_meshes"] = refused([distribute_tensor(b, line, [Shard(0)]), distribute_tensor(c, hsdp, [Replicate(), Shard(0)])])

    # One optimizer step, a whole parameter in the first group and sharded ones in the second: the update
    # of each shard equals torch's AdamW on whole tensors after clip_grad_norm_.
    params = whole_grads(1)
    ours = [torch.nn.Parameter(params[0].clone())] + [
        torch.nn.Parameter(distribute_tensor(p, line, [Shard(0)])) for p in params[1:]]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    grads = whole_grads(2)
    for p, q, g in zip(ours, theirs, grads):
        p.grad = distribute_tensor(g, line, [Shard(0)]) if p is not ours[0] else g.clone()
        q.grad = g.clone()
    # eps comparable to the clipped gradients: Adam's first step is sign(g) whatever the scale, this one is not.
    opt = PagedAdamW32bit([{"params": ours[:1]}, {"params": ours[1:]}], lr=0.1, eps=0.1, max_grad_norm=MAX_NORM)
    ref = torch.optim.AdamW([{"params": theirs[:1]}, {"params": theirs[1:]}], lr=0.1, eps=0.1)
    opt.step()
    torch.nn.utils.clip_grad_norm_(theirs, MAX_NORM)
    ref.step()
    seen["step_error"] = max((p.full_tensor() if p is not ours[0] else p).detach().sub(q.detach()).abs().max().item()
                             for p, q in zip(ours, theirs))
    seen["step_moved"] = min(q.detach().sub(p0).abs().max().item() for q, p0 in zip(theirs, params))
    return seen
