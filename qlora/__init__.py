"""qlora: NF4 / FP4 quantisation, 4-bit LoRA fine-tuning and paged AdamW, in bitsandbytes' format."""
from qlora.codebook import dynamic_map, fp4_codebook, nf4_codebook
from qlora.checkpoint import CheckpointError, load_quantized_state_dict
from qlora.nf4 import NF4Weight, nf4_linear, nf4_linear_grad_input, quantize_4bit, quantize_nf4
from qlora.layer import QuantLoRALinear
from qlora.lora_embedding import LoRAEmbedding
from qlora.model import load_adapter, load_quantized, merge_and_unload, prepare_model, save_adapter
from qlora.optim import PagedAdamW32bit
from qlora.finetune import finetune
from qlora.generate import generate
from qlora.fsdp import save_nf4_checkpoint, shard_model
from qlora.convert import quantize_checkpoint

__all__ = [
    "CheckpointError",
    "LoRAEmbedding",
    "NF4Weight",
    "PagedAdamW32bit",
    "QuantLoRALinear",
    "dynamic_map",
    "finetune",
    "fp4_codebook",
    "generate",
    "load_adapter",
    "load_quantized",
    "load_quantized_state_dict",
    "merge_and_unload",
    "nf4_codebook",
    "nf4_linear",
    "nf4_linear_grad_input",
    "prepare_model",
    "quantize_4bit",
    "quantize_checkpoint",
    "quantize_nf4",
    "save_adapter",
    "save_nf4_checkpoint",
    "shard_model",
]
__version__ = "0.1.0"
