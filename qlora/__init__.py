"""qlora: NF4 quantisation, 4-bit LoRA fine-tuning and paged AdamW, in bitsandbytes' format."""
from qlora.codebook import dynamic_map, nf4_codebook
from qlora.nf4 import NF4Weight, nf4_linear, nf4_linear_grad_input, quantize_nf4

__all__ = [
    "NF4Weight",
    "dynamic_map",
    "nf4_codebook",
    "nf4_linear",
    "nf4_linear_grad_input",
    "quantize_nf4",
]
__version__ = "0.1.0"
