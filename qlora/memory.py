"""`qlora bench-memory`: what a training step needs, by component, predicted and (optionally) measured.

The prediction is an analytic model of one training step (forward, backward, optimizer step) of a
Llama-family model as this engine runs it: qlora.llama's layers, QuantLoRALinear adapters on every
linear but lm_head, norms in float32, bf16 compute, AdamW with float32 states. Symbols:

    L layers, D hidden, Q = heads * head_dim, K = kv_heads * head_dim, I intermediate, V vocab,
    T = batch * seq tokens, T' = batch * (seq - 1) (positions that get a loss), r LoRA rank,
    linears per layer (in, out): q (D, Q), k (D, K), v (D, K), o (Q, D), gate (D, I), up (D, I), down (I, D)
    P_lin = L (2DQ + 2DK + 3DI)        P_A = L r (2D+2Q + 2(D+K) + 4D+2I + I+D)  (LoRA A and B)

The measurement builds the same model on the meta device, fills it layer by layer with random weights
(quantising each linear as it is made, so the whole model never exists in bf16), runs one step and
reports the peak: torch.cuda.max_memory_allocated and the device memory in use on a GPU; on the CPU
the peak of live tensor storage, tracked op by op with a dispatch mode.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.checkpoint import replacing
from qlora.kernels.adamw import CHUNK
from qlora.kernels.quantize import NESTED_BLOCKSIZE
from qlora.optim import DEFAULT_PAGE_SIZE
import torch.utils._python_dispatch
import torch.utils._pytree
from torch import nn

MODES = ("bf16-full", "bf16-lora", "qlora", "qlora-paged")
COMPONENTS = ("weights", "quant_constants", "adapters", "gradients", "optimizer_states", "activations", "workspace")

# Hugging Face configs of the published models (Llama-1 for 33B/65B; Llama-2 for 7B/13B/70B).
_PRESET_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings")
PRESETS = {name: dict(zip(_PRESET_FIELDS, values)) for name, *values in [
    # name        hidden  intermediate  layers  heads  kv heads  vocab  positions
    ("llama-7b",    4096,        11008,     32,    32,       32, 32000,      4096),
    ("llama-13b",   5120,        13824,     40,    40,       40, 32000,      4096),
    ("llama-33b",   6656,        17920,     60,    52,       52, 32000,      2048),
    ("llama-65b",   8192,        22016,     80,    64,       64, 32000,      2048),
    ("llama-70b",   8192,        28672,     80,    64,        8, 32000,      4096),
    ("tiny",         256,          704,      4,     4,        4,   259,       512),
]}

BLOCKSIZE = 64  # the default NF4 block
# Per quantised linear, besides its codes: the 16-entry NF4 table, the 256-entry nested map, the offset.
QUANT_TABLE_BYTES = 16 * 4 + 256 * 4 + 4
CUBLAS_WORKSPACE_BYTES = 32 * 2**20  # torch's default cuBLAS workspace on sm90, from the caching allocator
# PagedAdamW32bit's layout, imported so the prediction follows the code: state ranges aligned to
# CHUNK elements, pages of PAGE_BYTES.
PAGE_BYTES = DEFAULT_PAGE_SIZE
PAGED_BUDGET_PAGES = 2  # qlora-paged runs with the smallest budget the optimizer allows: two streaming slots


def preset_config(name: str):
    from qlora.llama import LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return LlamaConfig.from_dict({"model_type": "llama", **PRESETS[name]}, source=f"preset {name}")


def linear_shapes(config) -> list[tuple[str, int, int]]:
    """(name, in, out) of one decoder layer's linears, in module order."""
    D, I = config.hidden_size, config.intermediate_size
    Q = config.num_attention_heads * config.head_dim
    K = config.num_key_value_heads * config.head_dim
    return [("self_attn.q_proj", D, Q), ("self_attn.k_proj", D, K), ("self_attn.v_proj", D, K),
            ("self_attn.o_proj", Q, D), ("mlp.gate_proj", D, I), ("mlp.up_proj", D, I), ("mlp.down_proj", I, D)]


def nf4_bytes(numel: int) -> tuple[int, int]:
    """(codes, constants) of one NF4 tensor with double quantisation: ceil(n/2) packed bytes; constants are
    one uint8 absmax code per 64-block, one float32 scale per 256 blocks, and the tables."""
    blocks = -(-numel // BLOCKSIZE)
    return -(-numel // 2), blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + QUANT_TABLE_BYTES


@dataclass
class Shape:
    seq: int = 2048
    batch: int = 1
    grad_ckpt: bool = True
    r: int = 64
    dropout: float = 0.05
    device: str = "cuda"  # dropout masks are bool on CUDA (fused kernel), compute-dtype tensors on the CPU
    adapter_bytes: int = 4  # float32 LoRA weights (PEFT's default); 2 for bf16 adapters (the QLoRA paper's script)


def layer_activation_bytes(config, mode: str, shape: Shape) -> tuple[int, int]:
    """(bytes per token, constant bytes) saved for backward by one decoder layer.

    LoRA modes (base frozen; norms float32; compute bf16; m = dropout-mask bytes per element):
      norms       2 x 4D                      float32 normalised input (the rsqrt, 4 B, too)
      adapters    (m + 2) * (3D + Q + 2D + I) each adapted linear keeps its dropout mask and dropped input
                  + 7 * 2r                    and the bf16 down-projection x A^T
      attention   4Q + 4K' + 4 * heads        q, k, v (K' = Q when K/V heads are expanded), output, logsumexp
      SwiGLU      6I                          gate output, silu(gate), up output
      constant    2 r sum(in + out)           the bf16 copies of A and B
    Without dropout the linears keep their (shared) inputs instead: 2D + 2Q + 2D + 2I.
    bf16-full (everything trains, norms bf16): 16D + 6Q + 4K' + 8I + 4 * heads + 8.
    """
    D, I = config.hidden_size, config.intermediate_size
    Q = config.num_attention_heads * config.head_dim
    K = config.num_key_value_heads * config.head_dim
    K_att = Q if config.n_rep > 1 else K
    attention = 4 * Q + 4 * K_att + 4 * config.num_attention_heads
    if mode == "bf16-full":
        return 16 * D + 6 * Q + 4 * K_att + 8 * I + 4 * config.num_attention_heads + 8, 0
    norms = 2 * (4 * D + 4)
    if shape.dropout > 0:
        mask = 1 if shape.device == "cuda" else 2
        inputs = (mask + 2) * (3 * D + Q + 2 * D + I)
    else:
        inputs = 2 * D + 2 * Q + 2 * D + 2 * I
    per_token = norms + inputs + 7 * 2 * shape.r + attention + 6 * I
    constant = 2 * shape.r * sum(i + o for _, i, o in linear_shapes(config))
    return per_token, constant


def predict(config, mode: str, shape: Shape = Shape()) -> dict[str, int]:
    """Predicted peak bytes of one training step, by component (see the module docstring for symbols).

    weights           bf16-full: 2 (P_lin + VD + VD' + (2L+1)D), D' = 0 when tied
                      bf16-lora: 2 (P_lin + VD + VD') + 4 (2L+1)D        (norms float32, as prepare_model)
                      qlora:     sum ceil(n/2) over linears + 2 (VD + VD') + 4 (2L+1)D
    quant_constants   qlora: per linear ceil(n/64) + 4 ceil(n/64/256) + 1092 (tables)
    adapters          LoRA modes: 4 P_A (float32 A and B; 2 P_A with bf16 adapters)
    gradients         bf16-full: 2 x every parameter; LoRA modes: as the adapters
    optimizer_states  8 per trainable parameter (float32 exp_avg and exp_avg_sq), in PagedAdamW32bit's pages:
                      16 MiB x ceil(sum over tensors of ceil(n / 2048) * 2048 / 2^21); qlora-paged on a GPU:
                      the two 16 MiB streaming slots of its minimum budget (the rest is in pinned host memory)
    activations       the largest of three moments of the step, all while the layers' saved tensors are alive:
                        saved = L * 2D T with checkpointing (each layer's input), else L * (one layer's,
                        layer_activation_bytes); head = (4D + 4) T (final norm; 8D + 4 in bf16-full)
                        loss:       saved + head + 12 V T' (log-softmax output, incoming and outgoing gradient, fp32)
                        final norm: saved + head + 38 D T (the float32 norm's backward temporaries)
                        layer:      saved + one recomputed layer (with checkpointing) + (8D + 2I) T gradients
                                    in flight (+ 2 max(n), a fresh weight gradient, in bf16-full)
                      plus the rotary tables, 4 seq head_dim
    workspace         on CUDA the cuBLAS workspace (32 MiB); the NF4 matmuls are fused (no dequantised copy of W).
                      On the CPU 0: the reference's dequantised W is transient and, measured, never at the peak
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    L, D, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    T, T_loss = shape.batch * shape.seq, shape.batch * (shape.seq - 1)
    lin = [i * o for _, i, o in linear_shapes(config)]
    p_lin = L * sum(lin)
    p_embed = V * D * (1 if config.tie_word_embeddings else 2)
    p_norm = (2 * L + 1) * D
    p_adapter = L * shape.r * sum(i + o for _, i, o in linear_shapes(config))
    out = dict.fromkeys(COMPONENTS, 0)

    if mode == "bf16-full":
        out["weights"] = 2 * (p_lin + p_embed + p_norm)
        trainable = p_lin + p_embed + p_norm
        out["gradients"] = 2 * trainable
    else:
        trainable = p_adapter
        out["adapters"] = shape.adapter_bytes * p_adapter
        out["gradients"] = shape.adapter_bytes * p_adapter
        if mode == "bf16-lora":
            out["weights"] = 2 * (p_lin + p_embed) + 4 * p_norm
        else:
            codes = L * sum(nf4_bytes(n)[0] for n in lin)
            out["weights"] = codes + 2 * p_embed + 4 * p_norm
            out["quant_constants"] = L * sum(nf4_bytes(n)[1] for n in lin)
    out["optimizer_states"] = optimizer_state_bytes(config, mode, shape)

    per_token, constant = layer_activation_bytes(config, mode, shape)
    layer = per_token * T + constant
    saved = L * 2 * D * T if shape.grad_ckpt else L * layer
    head_saved = ((8 if mode == "bf16-full" else 4) * D + 4) * T
    moments = {
        "loss": saved + head_saved + 12 * V * T_loss,
        "final_norm": saved + head_saved + 38 * D * T,
        "layer": saved + (layer if shape.grad_ckpt else 0) + (8 * D + 2 * config.intermediate_size) * T,
    }
    if mode == "bf16-full":  # a fresh weight gradient, before it is added into .grad
        moments["layer"] += 2 * max(lin)
    out["activations"] = max(moments.values()) + 2 * 2 * shape.seq * config.head_dim  # + rotary tables
    if shape.device == "cuda":
        out["workspace"] = CUBLAS_WORKSPACE_BYTES
    return out


def trainable_tensors(config, mode: str, r: int) -> list[int]:
    """Element counts of the trainable tensors, one entry per tensor."""
    L, D, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    if mode != "bf16-full":
        return [n for _ in range(L) for _, i, o in linear_shapes(config) for n in (r * i, r * o)]
    per_layer = [i * o for _, i, o in linear_shapes(config)] + [D, D]
    return [V * D] + per_layer * L + [D] + ([] if config.tie_word_embeddings else [V * D])


def optimizer_pages(config, mode: str, r: int) -> int:
    """Pages of PagedAdamW32bit's state space: each tensor's range is rounded up to CHUNK elements, the
    space to whole pages of PAGE_BYTES / 8 elements (both float32 moments of an element: 8 bytes)."""
    numel = sum(-(-n // CHUNK) * CHUNK for n in trainable_tensors(config, mode, r))
    return -(-numel // (PAGE_BYTES // 8))


def optimizer_state_bytes(config, mode: str, shape: Shape) -> int:
    """Device bytes of optimizer states: every page resident, except qlora-paged on a GPU, whose budget of
    PAGED_BUDGET_PAGES pages holds only the streaming slots (everything else in pinned host memory)."""
    pages = optimizer_pages(config, mode, shape.r)
    if mode == "qlora-paged" and shape.device == "cuda":
        pages = min(pages, PAGED_BUDGET_PAGES)
    return pages * PAGE_BYTES


def host_bytes(config, mode: str, shape: Shape = Shape()) -> int:
    """Pinned host memory of paged optimizer states (qlora-paged on a GPU): the pages not on the device."""
    if mode != "qlora-paged" or shape.device != "cuda":
        return 0
    pages = optimizer_pages(config, mode, shape.r)
    return (pages if pages > PAGED_BUDGET_PAGES else 0) * PAGE_BYTES


# ---- measurement ---------------------------------------------------------------------------------

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


def measure(config, mode: str, shape: Shape, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """One real training step of the configuration; returns peak bytes (and, on a GPU, device memory in use)."""
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
                                gpu_budget=PAGED_BUDGET_PAGES * PAGE_BYTES if paged else "auto", page_size=PAGE_BYTES)
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


# ---- output --------------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}" if n < 1e8 else f"{n / 1e9:.2f}"


def format_table(rows: list[dict]) -> str:
    header = ["mode"] + list(COMPONENTS) + ["predicted", "measured", "meas/pred"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        measured = row.get("measured_peak_bytes")
        cells = [row["mode"]] + [_gb(row["predicted"][c]) for c in COMPONENTS] + [_gb(row["predicted_total_bytes"])]
        cells += [_gb(measured), f"{measured / row['predicted_total_bytes']:.3f}"] if measured else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(GB = 1e9 bytes)"


def write_png(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from qlora.errors import UserError

        raise UserError("--png needs matplotlib: pip install 'qlora[chart]' (or pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    modes = [row["mode"] for row in rows]
    bottom = [0.0] * len(rows)
    for component in COMPONENTS:
        values = [row["predicted"][component] / 1e9 for row in rows]
        ax.bar(modes, values, bottom=bottom, label=component.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    measured = [(i, row["measured_peak_bytes"] / 1e9) for i, row in enumerate(rows) if row.get("measured_peak_bytes")]
    if measured:
        ax.scatter([i for i, _ in measured], [m for _, m in measured], marker="_", s=900, color="black",
                   zorder=3, label="measured peak")
    ax.set_ylabel("GB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_memory(preset: str | None = None, config_path: str | None = None, seq: int = 2048, batch: int = 1,
                 grad_ckpt: bool = False, r: int = 64, dropout: float = 0.05, modes=MODES, measure_step: bool = False,
                 device: str | None = None, bf16_adapters: bool = False) -> dict:
    from qlora.llama import ConfigError, load_config

    config = preset_config(preset) if preset else load_config(config_path)
    if measure_step and seq > config.max_position_embeddings:
        raise ConfigError(f"--seq {seq} is longer than the model's context ({config.max_position_embeddings} tokens); "
                          "a real step cannot run it")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = Shape(seq=seq, batch=batch, grad_ckpt=grad_ckpt, r=r, dropout=dropout, device=torch.device(device).type,
                  adapter_bytes=2 if bf16_adapters else 4)
    rows = []
    for mode in modes:
        predicted = predict(config, mode, shape)
        row = {"mode": mode, "predicted": predicted, "predicted_total_bytes": sum(predicted.values()),
               "host_bytes": host_bytes(config, mode, shape)}
        if measure_step:
            result = measure(config, mode, shape, device)
            row["measured_peak_bytes"] = result.pop("peak_bytes")
            row["measured"] = result
        rows.append(row)
    return {"model": preset or str(config_path), "config": config.to_dict(), "seq": seq, "batch": batch,
            "grad_ckpt": grad_ckpt, "r": r, "dropout": dropout, "device": device, "rows": rows}


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=list(PRESETS), help="a published model's shape")
    source.add_argument("--config", help="a Hugging Face config.json (or its directory)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing per decoder layer")
    parser.add_argument("--r", type=int, default=64, help="LoRA rank (default 64)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--bf16-adapters", action="store_true", help="LoRA weights in bf16 (default float32)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--measure", action="store_true",
                        help="also run one real training step (on the CPU: only sensible for small configs)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--png", help="write a stacked bar chart (needs matplotlib)")


def run(args) -> int:
    from qlora.errors import UserError
    from qlora.llama import ConfigError

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--modes: unknown {bad or modes}; choose from {','.join(MODES)}")
    if args.seq < 2 or args.batch < 1 or args.r < 1:
        raise UserError("--seq must be at least 2, --batch and --r at least 1")
    try:
        result = bench_memory(args.preset, args.config, args.seq, args.batch, args.grad_ckpt, args.r, args.dropout,
                              modes, args.measure, args.device, args.bf16_adapters)
    except ConfigError as err:
        raise UserError(str(err)) from None
    title = (f"{result['model']}: seq {args.seq}, batch {args.batch}, r {args.r}, "
             f"grad ckpt {'on' if args.grad_ckpt else 'off'}")
    print(title)
    print(format_table(result["rows"]))
    if args.json:
        with replacing(args.json) as partial:
            partial.write_text(json.dumps(result, indent=2) + "\n")
    if args.png:
        write_png(result["rows"], Path(args.png), title)
    return 0
