"""Write qlora's embedded default model: a tiny Llama in Hugging Face layout.

    python scripts/make_tiny_llama.py [OUT_DIR]      (default: qlora/data/tiny-llama)

The files are config.json (LlamaForCausalLM), model.safetensors (bf16, HF key names),
generation_config.json and tokenizer_config.json describing a byte-level tokenizer
(ids 0-255 are bytes, then bos, eos, pad). No transformers needed: the config and
tensors are written by hand, so the script runs wherever qlora does.

make_tiny_llama(out_dir, state_dict=None, seed=0) writes the given weights, or a random
init (std 0.02, norms 1) from a fixed seed, so a later pretrained version can reuse it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "qlora" / "data" / "tiny-llama"

N_BYTES = 256
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": N_BYTES + 3,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}

GENERATION_CONFIG = {
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "max_new_tokens": 128,
}

# The tokenizer is trivial (UTF-8 bytes are the ids), so a description is all it needs.
TOKENIZER_CONFIG = {
    "tokenizer_class": "qlora.tokenizer.ByteTokenizer",
    "description": "byte-level: token id = UTF-8 byte value (0-255); then special tokens",
    "byte_vocab_size": N_BYTES,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "model_max_length": CONFIG["max_position_embeddings"],
    "add_bos_token": True,
    "add_eos_token": False,
}


def llama_shapes(config: dict = CONFIG) -> dict[str, tuple[int, ...]]:
    """HF Llama key name -> shape, in the order transformers lists them."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (q_out, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_out, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_out, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, q_out),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_init(seed: int = 0, config: dict = CONFIG) -> dict[str, torch.Tensor]:
    """N(0, 0.02) matrices and all-ones norms, bf16, from a fixed seed (CPU generator)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, shape in llama_shapes(config).items():
        if len(shape) == 1:
            state_dict[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            w = torch.randn(shape, generator=generator, dtype=torch.float32) * config["initializer_range"]
            state_dict[name] = w.to(torch.bfloat16)
    return state_dict


def make_tiny_llama(out_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                    seed: int = 0) -> Path:
    """Write the tiny Llama to out_dir: the given weights, or random_init(seed)."""
    out_dir = Path(out_dir)
    expected = llama_shapes()
    if state_dict is None:
        state_dict = random_init(seed)
    if set(state_dict) != set(expected):
        missing, extra = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        raise ValueError(f"state dict does not match the tiny Llama: missing {missing[:3]}, extra {extra[:3]}")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"{name}: shape {list(state_dict[name].shape)}, expected {list(shape)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: state_dict[name].detach().to("cpu", torch.bfloat16).contiguous() for name in expected}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for filename, content in (("config.json", CONFIG), ("generation_config.json", GENERATION_CONFIG),
                              ("tokenizer_config.json", TOKENIZER_CONFIG)):
        (out_dir / filename).write_text(json.dumps(content, indent=2) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_tiny_llama(args.out_dir, seed=args.seed)
    n_params = sum(torch.Size(s).numel() for s in llama_shapes().values())
    print(f"wrote {path} ({n_params / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
