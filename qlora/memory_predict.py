"""What a training step needs, by component: the analytic model behind `qlora bench-memory`.

An analytic model of one training step (forward, backward, optimizer step) of a Llama-family model on
one device, as this engine runs it: qlora.llama's layers, QuantLoRALinear adapters on every linear but
lm_head, norms in float32, bf16 compute, AdamW with float32 states, every state page resident. Where the
states and weights live (paging, several ranks) is qlora.memory_placement's job. Symbols:

    L layers, D hidden, Q = heads * head_dim, K = kv_heads * head_dim, I intermediate, V vocab,
    T = batch * seq tokens, T' = batch * (seq - 1) (positions that get a loss), r LoRA rank,
    linears per layer (in, out): q (D, Q), k (D, K), v (D, K), o (Q, D), gate (D, I), up (D, I), down (I, D)
    P_lin = L (2DQ + 2DK + 3DI)        P_A = L r (2D+2Q + 2(D+K) + 4D+2I + I+D)  (LoRA A and B)
"""
from __future__ import annotations

from dataclasses import dataclass

from qlora.kernels.adamw import CHUNK
from qlora.kernels import large_m
from qlora.kernels.quantize import NESTED_BLOCKSIZE
from qlora.paged_states import DEFAULT_PAGE_SIZE

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
                      16 MiB x ceil(sum over tensors of ceil(n / 2048) * 2048 / 2^21), all resident (qlora-paged
                      too: qlora.memory_placement applies its budget)
    activations       the largest of three moments of the step, all while the layers' saved tensors are alive:
                        saved = L * 2D T with checkpointing (each layer's input), else L * (one layer's,
                        layer_activation_bytes); head = (4D + 4) T (final norm; 8D + 4 in bf16-full)
                        loss:       saved + head + 12 V T' (log-softmax output, incoming and outgoing gradient, fp32)
                        final norm: saved + head + 38 D T (the float32 norm's backward temporaries)
                        layer:      saved + one recomputed layer (with checkpointing) + (8D + 2I) T gradients
                                    in flight (+ 2 max(n), a fresh weight gradient, in bf16-full)
                      plus the rotary tables, 4 seq head_dim
    workspace         on CUDA the cuBLAS workspace (32 MiB), and in the NF4 modes the large-M path's scratch
                      buffer (dequant_scratch_bytes): 2 max(N K) over the linears that dequantise W into it.
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
        if mode in ("qlora", "qlora-paged"):
            out["workspace"] += dequant_scratch_bytes(config, shape)
    return out


def dequant_scratch_bytes(config, shape: Shape) -> int:
    """Bytes of the device's one scratch buffer (qlora/kernels/large_m.py): a linear whose forward or input
    gradient over M = T tokens is not fused (large_m.prefer_fused says dequantise + cuBLAS is faster, or
    in_features is not a multiple of the block) dequantises its bf16 W [N, K] into it; the buffer is kept,
    grown to the largest 2 N K seen (to within the dequantise kernel's last tile)."""
    M = shape.batch * shape.seq
    fused = large_m.prefer_fused
    unfused = [o * i for _, i, o in linear_shapes(config)
               if i % BLOCKSIZE or not fused(M, o, i, "forward") or not fused(M, o, i, "grad_input")]
    return 2 * max(unfused, default=0)


def trainable_shapes(config, mode: str, r: int) -> list[tuple[int, int]]:
    """(rows, columns) of each trainable tensor (a vector as one column): LoRA A [r, in] and B [out, r]."""
    L, D, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    if mode != "bf16-full":
        return [s for _ in range(L) for _, i, o in linear_shapes(config) for s in ((r, i), (o, r))]
    per_layer = [(o, i) for _, i, o in linear_shapes(config)] + [(D, 1), (D, 1)]
    return [(V, D)] + per_layer * L + [(D, 1)] + ([] if config.tie_word_embeddings else [(V, D)])


def trainable_tensors(config, mode: str, r: int) -> list[int]:
    """Element counts of the trainable tensors, one entry per tensor."""
    return [rows * cols for rows, cols in trainable_shapes(config, mode, r)]


def optimizer_pages(tensor_numels: list[int]) -> int:
    """Pages of PagedAdamW32bit's state space: each tensor's range is rounded up to CHUNK elements, the
    space to whole pages of PAGE_BYTES / 8 elements (both float32 moments of an element: 8 bytes)."""
    numel = sum(-(-n // CHUNK) * CHUNK for n in tensor_numels)
    return -(-numel // (PAGE_BYTES // 8))


def optimizer_state_bytes(config, mode: str, shape: Shape) -> int:
    """Device bytes of optimizer states with every page resident."""
    return optimizer_pages(trainable_tensors(config, mode, shape.r)) * PAGE_BYTES
