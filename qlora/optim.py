"""PagedAdamW32bit: torch.optim.AdamW's update with float32 states in explicitly paged memory.

Every parameter with state owns a range of one flat state space per device, aligned to the
kernel's CHUNK. The space is cut into fixed-size pages, each a float32 [rows, page_numel]
tensor (row 0 exp_avg, row 1 exp_avg_sq, row 2 max_exp_avg_sq once any group asks for
amsgrad) held either on the device ("resident") or in pinned host memory. A byte budget
caps the device memory the pages hold. When the states do not fit, step() streams the host
pages through a ring of device slots on a side stream, updates them there and writes them
back, while the resident pages are updated in one launch.
No CUDA managed memory anywhere: the driver never migrates anything behind our back.

On the CPU the same page table runs with CPU tensors on both sides and the torch reference
update, which is how the paging logic is tested without a GPU.
"""
from __future__ import annotations

import bisect
import math
import os
from itertools import chain

import torch

from qlora.kernels import backend
from qlora.kernels.adamw import (
    CHUNK,
    adamw_chunks_,
    adamw_scalars,
    adamw_update_reference,
    make_chunks,
    tensor_rows,
)
from qlora.optim_clip import clip_factor
from qlora.optim_clip import local as _local  # FSDP2's parameters and gradients: the optimizer pages each rank's shard
from qlora.optim_options import (
    adamw_defaults,
    adopt_implementation_flags,
    check_group,
    fill_missing_flags,
    group_flags,
)
from qlora.paged_states import DEFAULT_PAGE_SIZE, STATE_BYTES_PER_ELEMENT, PagedStates, to_device

AMSGRAD_ROWS = 3               # rows of a page once amsgrad needs max_exp_avg_sq
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Plan:
    """What one step needs for one set of parameters with gradients; rebuilt when that set changes."""

    def __init__(self, optimizer: "PagedAdamW32bit", work: list) -> None:
        self.group_index = torch.tensor([gi for _, _, gi in work], dtype=torch.int64)
        self.params = [p for p, _, _ in work]
        # The step counts of these parameters, one buffer: state["step"] are 0-dim views of it,
        # so a step increments them all with one op (a foreach over hundreds of CPU scalars
        # costs more than the whole GPU update).
        self.steps = torch.zeros(len(work), dtype=torch.float32)
        self.by_store: dict[torch.device, dict] = {}
        for index, (p, g, _) in enumerate(work):
            store, start = optimizer._ranges[p]
            entry = self.by_store.setdefault(store.device, {"store": store, "items": [], "pages": set()})
            entry["items"].append((index, start))
            entry["pages"].update(k for k, *_ in store.pieces(start, _local(p).numel()))
        for device, entry in self.by_store.items():
            store = entry["store"]
            entry["pages"] = sorted(entry["pages"])
            # The Triton kernel on CUDA (or on the CPU under QLORA_BACKEND=triton and the interpreter).
            entry["kernel"] = backend.use_triton(_local(work[entry["items"][0][0]][0]))
            if not entry["kernel"]:
                # (work index, element range in the parameter, page, offset in page) per piece
                segments: dict[int, list] = {}
                for index, start in entry["items"]:
                    p = _local(work[index][0])
                    for k, offset, at, length in store.pieces(start, p.numel()):
                        segments.setdefault(k, []).append((index, at, length, offset))
                entry["segments"] = segments
                continue
            # One launch group per (param dtype, grad dtype): pointer types are compile-time.
            combos: dict[tuple, list] = {}
            for index, start in entry["items"]:
                p, g, _ = work[index]
                combos.setdefault((p.dtype, g.dtype), []).append((index, start))
            entry["combos"] = []
            for items in combos.values():
                indices = [index for index, _ in items]
                numels = [_local(work[index][0]).numel() for index in indices]
                chunks = make_chunks(range(len(items)), numels, [start for _, start in items], store.page_numel)
                order = torch.argsort(chunks[:, 2], stable=True)  # by page, so each page is a chunk range
                chunks = chunks[order]
                entry["combos"].append({
                    "indices": indices,
                    "index_tensor": torch.tensor(indices, dtype=torch.int64),
                    "chunk_pages": chunks[:, 2].tolist(),
                    "chunks": chunks.to(device),
                })

    def adopt_steps(self, state) -> None:
        """Take over the step counts (from views of another plan's buffer, or fresh tensors)."""
        for i, p in enumerate(self.params):
            self.steps[i] = state[p]["step"]
            state[p]["step"] = self.steps[i]


class PagedAdamW32bit(torch.optim.Optimizer):
    """torch.optim.AdamW with float32 states paged between the GPU and pinned host memory.

    The arguments up to fused are torch.optim.AdamW's, with its defaults (lr 1e-3, weight
    decay 1e-2), amsgrad and maximize included; foreach and fused are accepted and change
    nothing (there is one, fused, implementation); capturable=True and differentiable=True
    are refused (see qlora/optim_options.py). The rest are ours.

    gpu_budget: bytes of GPU memory the states may hold, or "auto": what the device can hold beside
    the peak of a step (forward and backward, torch.cuda.max_memory_allocated, which it reads and
    never resets) and a reserve of max(2 pages, 5 %), evicting least-recently-used pages when that
    shrinks (qlora/paged_budget.py). page_size: bytes per page, both moments together (a multiple
    of 16 KiB; amsgrad in any group adds a third row, max_exp_avg_sq, to every page).
    max_grad_norm: clip the gradients' total L2 norm to this, computed on the
    device (the gradients themselves are left untouched).

    States are exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad groups; float32) and step under
    torch's names; state_dict() returns them as CPU tensors, so checkpoints never need the GPU memory the budget saves.
    CPU parameters are updated with the torch reference; an integer gpu_budget there runs
    the page table with CPU memory on both sides (a simulation, used by the tests).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        gpu_budget: int | str = "auto",
        page_size: int = DEFAULT_PAGE_SIZE,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = adamw_defaults(lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable,
                                  differentiable, fused)
        if not isinstance(page_size, int) or page_size <= 0 or page_size % (STATE_BYTES_PER_ELEMENT * CHUNK):
            raise ValueError(f"page_size must be a positive multiple of {STATE_BYTES_PER_ELEMENT * CHUNK} bytes, "
                             f"got {page_size!r}")
        if gpu_budget != "auto":
            if isinstance(gpu_budget, bool) or not isinstance(gpu_budget, int):
                raise ValueError(f"gpu_budget must be a number of bytes or 'auto', got {gpu_budget!r}")
            if gpu_budget < 2 * page_size:
                raise ValueError(f"gpu_budget={gpu_budget} bytes is below two pages of page_size={page_size}: "
                                 "streaming needs at least two device slots; raise it or lower page_size")
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
        super().__init__(params, defaults)
        self.gpu_budget = gpu_budget
        self.page_size = page_size
        self.max_grad_norm = max_grad_norm
        self._stores: dict[torch.device, PagedStates] = {}
        self._ranges: dict[torch.Tensor, tuple[PagedStates, int]] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._active_plan: _Plan | None = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            fill_missing_flags(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_group(group, len(self.param_groups) - 1)
        for p in group["params"]:
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"PagedAdamW32bit updates float32, bfloat16 and float16 parameters, got {p.dtype}")
            if not p.is_contiguous():
                raise ValueError(f"PagedAdamW32bit needs contiguous parameters, got one with strides {p.stride()}")

    # ---- state ranges -----------------------------------------------------------------------
    def store(self, device: torch.device | str) -> PagedStates:
        """The page table holding the states of parameters on device (created on first use)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._stores:
            if device.type == "cuda":
                budget = self.gpu_budget
            else:  # no paging on the CPU unless a budget asks to simulate it
                budget = None if self.gpu_budget == "auto" else self.gpu_budget
            self._stores[device] = PagedStates(device, self.page_size // STATE_BYTES_PER_ELEMENT, budget,
                                               rows=self._state_rows())
        return self._stores[device]

    def _state_rows(self) -> int:
        return AMSGRAD_ROWS if any(group.get("amsgrad") for group in self.param_groups) else 2

    def _grow_state_rows(self) -> None:
        """A third row for max_exp_avg_sq once any group asks for amsgrad (added later or loaded)."""
        rows = self._state_rows()
        for store in self._stores.values():
            store.add_rows(rows)

    def _range(self, p: torch.Tensor) -> tuple[PagedStates, int]:
        if p not in self._ranges:
            store = self.store(p.device)
            self._ranges[p] = (store, store.allocate(_local(p).numel()))
        return self._ranges[p]

    def _init_state(self, p: torch.Tensor) -> None:
        new = p not in self._ranges
        store, start = self._range(p)
        if not new:  # a parameter whose state was dropped (load_state_dict without it)
            store.write(start, torch.zeros((store.rows, _local(p).numel()), dtype=torch.float32))
        self.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)
        self._active_plan = None  # the step buffer must take this fresh tensor in

    def page_out(self) -> None:
        """Move all states to host memory (e.g. around evaluation or generation)."""
        for store in self._stores.values():
            store.page_out()

    def page_in(self) -> None:
        """Bring states back to the GPU, as far as the budget allows (step() does it too)."""
        for store in self._stores.values():
            store.observe_peak()
            store.fit()

    # ---- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            check_group(group, gi)
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"PagedAdamW32bit does not support sparse gradients "
                                       f"(parameter {i} of param group {gi})")
                g = _local(g)
                work.append((p, g if g.is_contiguous() else g.contiguous(), gi))
        if not work:
            return loss
        for store in self._stores.values():  # "auto": the forward and backward just done set the budget
            store.observe_peak()
        for p, _, _ in work:
            if "step" not in self.state[p]:
                self._init_state(p)
        self._grow_state_rows()

        key = (tuple((id(p), g.dtype) for p, g, _ in work), os.environ.get("QLORA_BACKEND", ""))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 8:
                self._plans.clear()
            plan = self._plans[key] = _Plan(self, work)
        if plan is not self._active_plan:
            plan.adopt_steps(self.state)
            self._active_plan = plan
        plan.steps += 1
        hyper = torch.tensor(
            [[g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"], *group_flags(g)]
             for g in self.param_groups],
            dtype=torch.float64,
        )[plan.group_index]
        lr, beta1, beta2, eps, weight_decay, maximize, amsgrad = hyper.unbind(1)
        scalars = adamw_scalars(lr, beta1, beta2, eps, weight_decay, plan.steps.to(torch.float64), maximize, amsgrad)
        clip = None
        if self.max_grad_norm is not None:
            clip = clip_factor([p.grad for p, _, _ in work], self.max_grad_norm, lambda i: self._name(work[i]))

        for device, entry in plan.by_store.items():
            store = entry["store"]
            store_clip = None if clip is None else clip.to(device, non_blocking=True)
            if entry["kernel"]:
                update = self._kernel_update(store, entry, work, scalars, store_clip)
            else:
                update = self._reference_update(store, entry, work, scalars.tolist(), store_clip)
            if store.cuda:
                with torch.cuda.device(store.device):  # Triton launches on the current device
                    store.run(entry["pages"], update)
            else:
                store.run(entry["pages"], update)
            if entry["kernel"]:
                # The kernel writes the parameters through raw pointers: tell autograd (and whatever
                # keys a cache on the version counter, as QuantLoRALinear's adapter cast) they changed.
                for index, _ in entry["items"]:
                    torch.autograd.graph.increment_version(_local(work[index][0]))
        return loss

    def _name(self, item) -> str:
        p, _, gi = item
        index = next(i for i, q in enumerate(self.param_groups[gi]["params"]) if q is p)
        return f"parameter {index} of param group {gi}"

    @staticmethod
    def _reference_update(store, entry, work, rows, clip):
        def update(pages: list[int]) -> None:
            for k in pages:
                data = store.active[k]
                for index, at, length, offset in entry["segments"].get(k, ()):
                    p, g, _ = work[index]
                    adamw_update_reference(
                        _local(p).view(-1)[at:at + length], g.view(-1)[at:at + length],
                        data[0, offset:offset + length], data[1, offset:offset + length],
                        rows[index], clip, data[2, offset:offset + length] if store.rows > 2 else None,
                    )
        return update

    @staticmethod
    def _kernel_update(store, entry, work, scalars, clip):
        launches = []
        for combo in entry["combos"]:
            params = [_local(work[i][0]) for i in combo["indices"]]
            grads = [work[i][1] for i in combo["indices"]]
            rows, param_align, grad_align = tensor_rows(params, grads)
            # The tensor table only changes when a parameter or gradient moves (a new param set is
            # a new plan; the allocator usually hands gradients the same addresses): copied then only.
            if combo.get("rows") != rows:
                combo["rows"] = rows
                combo["table"] = to_device(torch.tensor(rows, dtype=torch.int64).view(-1, 3), store.device)
            combo_scalars = scalars[combo["index_tensor"]].to(torch.float32)
            launches.append((combo, params[0], grads[0], param_align, grad_align,
                             combo["table"], to_device(combo_scalars, store.device)))

        def update(pages: list[int]) -> None:
            # Consecutive pages are one chunk range: all-resident is one launch per dtype pair.
            runs, first = [], 0
            for i in range(1, len(pages) + 1):
                if i == len(pages) or pages[i] != pages[i - 1] + 1:
                    runs.append((pages[first], pages[i - 1]))
                    first = i
            for combo, param_base, grad_base, param_align, grad_align, table, combo_scalars in launches:
                chunk_pages = combo["chunk_pages"]
                for lo, hi in runs:
                    c0 = bisect.bisect_left(chunk_pages, lo)
                    c1 = bisect.bisect_right(chunk_pages, hi)
                    adamw_chunks_(
                        param_base, grad_base, store.state_base, table, combo_scalars,
                        combo["chunks"], store.page_table, clip,
                        first_chunk=c0, n_chunks=c1 - c0, param_align=param_align, grad_align=grad_align,
                    )
        return update

    # ---- state dicts ------------------------------------------------------------------------------
    def _param_index(self) -> dict[int, int]:
        # The same numbering as torch.optim.Optimizer.state_dict.
        index: dict[int, int] = {}
        start = 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"], start):
                index.setdefault(id(p), i)
            start += len(group["params"])
        return index

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        index = self._param_index()
        amsgrad = {id(p) for group in self.param_groups if group.get("amsgrad") for p in group["params"]}
        for p, (store, start) in self._ranges.items():
            i = index.get(id(p))
            if i is None or "step" not in state_dict["state"].get(i, {}):
                continue
            entry = dict(state_dict["state"][i])
            entry["step"] = entry["step"].clone()
            local = _local(p)  # a sharded parameter's states are its shard's
            states = store.read(start, local.numel())
            entry["exp_avg"] = states[0].view(local.shape)
            entry["exp_avg_sq"] = states[1].view(local.shape)
            # torch keeps max_exp_avg_sq for the parameters of amsgrad groups (the row exists once a
            # step has run with amsgrad on)
            if id(p) in amsgrad and states.shape[0] > 2:
                entry["max_exp_avg_sq"] = states[2].view(local.shape)
            state_dict["state"][i] = entry
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = adopt_implementation_flags(state_dict["param_groups"], self.defaults)
        for gi, group in enumerate(saved_groups):
            check_group(group, gi)
        moments, maxima, stripped = {}, {}, {}
        for i, entry in state_dict["state"].items():
            entry = dict(entry)
            moments[i] = (entry.pop("exp_avg", None), entry.pop("exp_avg_sq", None))
            maxima[i] = entry.pop("max_exp_avg_sq", None)
            stripped[i] = entry
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        unknown = sorted((i for i in moments if i not in id_map), key=str)
        if unknown:
            raise ValueError(f"optimizer state for parameter index {unknown[0]!r}, which no param_group lists "
                             f"(they list {sorted(id_map, key=str)[:8]})")
        super().load_state_dict({"state": stripped, "param_groups": saved_groups})
        self._plans.clear()
        self._active_plan = None
        self._grow_state_rows()
        for i, (exp_avg, exp_avg_sq) in moments.items():
            p = id_map[i]
            state = self.state[p]
            if exp_avg is None or exp_avg_sq is None or "step" not in state:
                raise ValueError(f"state of parameter {i} needs step, exp_avg and exp_avg_sq")
            numel = _local(p).numel()
            for name, tensor in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", maxima[i])):
                if tensor is not None and tensor.numel() != numel:
                    raise ValueError(f"state of parameter {i}: {name} has {tensor.numel()} values for a parameter "
                                     f"of {numel}")
            # Bias correction is computed on the host: keep step a CPU float32 scalar (one sync, here).
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
            store, start = self._range(p)
            rows = [exp_avg, exp_avg_sq]
            if store.rows > 2:  # amsgrad: the saved maximum, or zeros (torch starts it at zero)
                rows.append(maxima[i] if maxima[i] is not None else torch.zeros(numel))
            store.write(start, torch.stack([t.detach().reshape(-1).to("cpu", torch.float32) for t in rows]))


__all__ = ["PagedAdamW32bit", "PagedStates"]
