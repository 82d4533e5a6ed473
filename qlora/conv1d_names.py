"""Which checkpoint tensors belong to transformers' Conv1D (GPT-2's linear, weight stored [in, out]).

bitsandbytes quantises a Conv1D weight transposed, as the [out, in] weight of a Linear4bit; a 4-bit
checkpoint must do the same. The checkpoint alone cannot tell a Conv1D from a Linear, so the model
is built on the meta device from its config.json (transformers' own classes, never remote code).
"""
from __future__ import annotations

import json
from pathlib import Path

from qlora.targets import is_conv1d


# Families whose transformers modeling code has only nn.Linear: no need to import transformers and
# build the model to know (an unknown family is built, so a new one is never quantised the wrong way).
LINEAR_ONLY_FAMILIES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2",
    "gemma3_text", "falcon", "gpt_neox", "opt", "bloom", "starcoder2", "olmo", "olmo2", "stablelm", "cohere",
    "granite", "deepseek_v3", "smollm3",
})


def conv1d_module_names(config_dir: Path) -> list[str]:
    """Full names of the Conv1D modules of the model config_dir/config.json describes; [] without
    transformers, a config or a model type transformers knows."""
    if not (config_dir / "config.json").is_file():
        return []
    try:
        model_type = json.loads((config_dir / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError):
        return []  # quantize_checkpoint reports a bad config.json itself
    if not isinstance(model_type, str) or model_type in LINEAR_ONLY_FAMILIES:
        return []
    try:
        import torch
        import transformers
    except ImportError:
        return []
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_dir), trust_remote_code=False)
    except (ValueError, KeyError, OSError):
        return []  # no model_type, or one this transformers does not know: no Conv1D class to find
    model = None
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with torch.device("meta"):
                model = auto.from_config(config, trust_remote_code=False)
            break
        except (ValueError, KeyError):
            continue
    if model is None:
        return []
    return [name for name, module in model.named_modules() if is_conv1d(module)]


def conv1d_weights(tensor_names, module_names: list[str]) -> set[str]:
    """The `.weight` tensors among tensor_names that belong to one of module_names; a checkpoint may
    name modules with or without the model's base prefix (`transformer.h.0...` or `h.0...`)."""
    found = set()
    for name in tensor_names:
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if any(m == module or m.endswith("." + module) or module.endswith("." + m) for m in module_names):
            found.add(name)
    return found
