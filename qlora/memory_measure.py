"""`qlora bench-memory --measure`: one real training step of a configuration, and its peak memory.

The model is built on the meta device, then filled layer by layer with random weights (quantising each
linear as it is made, so the whole model never exists in bf16), runs one step and reports the peak:
torch.cuda.max_memory_allocated and the device memory in use on a GPU; on the CPU the peak of live
tensor storage, tracked op by op with a dispatch mode.
"""
from __future__ import annotations

import math
import time

import torch
import torch.utils._python_dispatch
import torch.utils._pytree
from torch import nn

from qlora.memory_predict import COMPONENTS, PAGE_BYTES, Shape, linear_shapes


class _BF16LoRALinear(nn.Module):
    """A frozen bf16 nn.Linear plus float32 LoRA, computed exactly as QuantLoRALinear computes it
    (the bf16-lora baseline: same adapters, full-precision base)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.r, self.scaling = base.requires_grad_(False), r, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        h = x.to(self.base.weight.dtype)
        out = self.base(h)
        down = nn.functional.linear(self.lora_dropout(h), self.lora_A.weight.to(h.dtype)).reshape(-1, self.r)
        out = torch.addmm(out.reshape(-1, out.shape[-1]), down, self.lora_B.weight.to(h.dtype).t(),
                          alpha=self.scaling)
        return out.view(*x.shape[:-1], -1).to(x.dtype)


def build_random_model(config, mode: str, shape: Shape, device: torch.device, seed: int = 0):
    """The model on the meta device, then each module materialised on `device` with random weights;
    in the qlora modes each linear is quantised as soon as it exists, so at most one bf16 weight lives."""
    from qlora.layer import QuantLoRALinear
    from qlora.llama import build_model
    from qlora.model import prepare_model
    from qlora.nf4 import quantize_nf4

    generator = torch.Generator(device=device).manual_seed(seed)
    model = build_model(config, device="meta")
    targets = {f"model.layers.{i}.{name}" for i in range(config.num_hidden_layers) for name, _, _ in linear_shapes(config)}

    def random_(t: torch.Tensor) -> torch.Tensor:
        return t.normal_(0.0, 0.02, generator=generator)

    for name, module in list(model.named_modules()):
        if name in targets and mode in ("qlora", "qlora-paged"):
            w = random_(torch.empty(module.out_features, module.in_features, device=device, dtype=torch.bfloat16))
            layer = QuantLoRALinear.from_nf4(quantize_nf4(w), r=0)
            del w
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            value = torch.empty(p.shape, device=device, dtype=p.dtype)
            value = value.fill_(1.0) if "norm" in name else random_(value)
            setattr(module, pname, nn.Parameter(value))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if mode == "bf16-full":
        model.gradient_checkpointing = shape.grad_ckpt
        model.enable_input_require_grads()
        return model
    if mode == "bf16-lora":
        for p in model.parameters():
            p.requires_grad_(False)
        for name in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    _BF16LoRALinear(model.get_submodule(name), shape.r, 16, shape.dropout))
        for module in model.modules():
            if "Norm" in type(module).__name__:
                module.weight.data = module.weight.data.float()
        model.enable_input_require_grads()
        model.gradient_checkpointing = shape.grad_ckpt
        return model
    adapter_dtype = torch.bfloat16 if shape.adapter_bytes == 2 else torch.float32
    return prepare_model(model, r=shape.r, alpha=16, dropout=shape.dropout, gradient_checkpointing=shape.grad_ckpt,
                         verbose=False, adapter_dtype=adapter_dtype)


def _static_bytes(model, optimizer=None) -> dict[str, int]:
    """Exact bytes of what a model and optimizer hold, by component (shared storages counted once)."""
    from qlora.layer import QuantLoRALinear

    seen: set[int] = set()
    out = dict.fromkeys(COMPONENTS, 0)

    def add(component, t):
        if t is None or t.device.type == "meta":
            return
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out[component] += t.untyped_storage().nbytes()

    for module in model.modules():
        if isinstance(module, QuantLoRALinear):
            add("weights", module.weight)
            for name, buf in module._buffers.items():
                if name != "weight":
                    add("quant_constants", buf)
    for name, p in model.named_parameters():
        add("adapters" if "lora_" in name else "weights", p)
        add("gradients", p.grad)
    for name, b in model.named_buffers():
        add("weights", b)
    if optimizer is not None:
        devices = {p.device for group in optimizer.param_groups for p in group["params"]}
        out["optimizer_states"] += sum(optimizer.store(d).device_bytes for d in devices)
    return out


def _live_tensors(model, optimizer) -> list[torch.Tensor]:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for store in getattr(optimizer, "_stores", {}).values():  # the pages of PagedAdamW32bit
        for page in store.pages:
            tensors += [t for t in (page.device_data, page.host_data) if t is not None]
    return tensors


class LiveStorageBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensor storage created on `device` while active (CPU memory has no allocator
    counters): every op's outputs are recorded with a weak reference to their storage."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weakref = StorageWeakRef
        self.device_type = device_type
        self.live: dict[int, tuple[object, int]] = {}
        self.current = self.peak = 0

    def ignore(self, tensors) -> None:
        """Storages that existed before (parameters, states): never counted as new."""
        for t in tensors:
            self.live.setdefault(t.untyped_storage().data_ptr(), (self._weakref(t.untyped_storage()), 0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (self._weakref(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def measure(config, mode: str, shape: Shape, device: str | torch.device = "cpu", seed: int = 0,
            gpu_budget: int | str = "auto") -> dict:
    """One real training step of the configuration; returns peak bytes (and, on a GPU, device memory in use).
    gpu_budget: qlora-paged's PagedAdamW32bit budget on a GPU (the other modes keep every page resident)."""
    from qlora.optim import PagedAdamW32bit

    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        free_before, total = torch.cuda.mem_get_info(device)
    model = build_random_model(config, mode, shape, device, seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Paging is a GPU feature: on the CPU qlora-paged runs (and is predicted) with every page resident.
    paged = mode == "qlora-paged" and cuda
    optimizer = PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0, max_grad_norm=0.3,
                                gpu_budget=gpu_budget if paged else "auto", page_size=PAGE_BYTES)
    ids = torch.randint(0, config.vocab_size, (shape.batch, shape.seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(seed))

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss.detach()

    # A warm-up step first: the measured one runs in the steady state, with gradients and optimizer
    # states allocated, as every step after the first does.
    step()
    static = _static_bytes(model, optimizer)
    start = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_allocated = torch.cuda.memory_allocated(device)
        loss = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        free_after, _ = torch.cuda.mem_get_info(device)
        result = {"peak_bytes": peak, "step_extra_bytes": peak - base_allocated,
                  "device_in_use_bytes": free_before - free_after, "device_total_bytes": total}
    else:
        before = _live_tensors(model, optimizer)
        tracker = LiveStorageBytes(device.type)
        tracker.ignore(before)
        with tracker:
            loss = step()
        held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in before}.values())
        result = {"peak_bytes": held + tracker.peak, "step_extra_bytes": tracker.peak, "held_bytes": held}
    result["seconds"] = time.perf_counter() - start
    result["tokens_per_second"] = shape.batch * shape.seq / result["seconds"]
    result["static"] = static
    result["loss"] = float(loss)
    del model, optimizer, loss
    if cuda:
        torch.cuda.empty_cache()
    return result
