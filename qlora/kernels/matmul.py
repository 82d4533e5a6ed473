"""x @ W^T and g @ W with W in NF4: the forward and input gradient of every quantised layer."""
from __future__ import annotations

import torch

from qlora.kernels.dequantize import dequantize_nf4


def _dequantize_matrix(packed, absmax, quant_map, out_features, in_features, blocksize,
                       nested_absmax, nested_code, offset, dtype) -> torch.Tensor:
    flat = dequantize_nf4(packed, absmax, quant_map, out_features * in_features, blocksize, dtype,
                          nested_absmax, nested_code, offset)
    return flat.view(out_features, in_features)


def nf4_linear_reference(x, packed, absmax, quant_map, out_features, in_features, blocksize,
                         nested_absmax=None, nested_code=None, offset=None, bias=None) -> torch.Tensor:
    w = _dequantize_matrix(packed, absmax, quant_map, out_features, in_features, blocksize,
                           nested_absmax, nested_code, offset, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def nf4_linear_grad_input_reference(grad_out, packed, absmax, quant_map, out_features, in_features, blocksize,
                                    nested_absmax=None, nested_code=None, offset=None) -> torch.Tensor:
    w = _dequantize_matrix(packed, absmax, quant_map, out_features, in_features, blocksize,
                           nested_absmax, nested_code, offset, grad_out.dtype)
    return grad_out @ w


nf4_linear = nf4_linear_reference
nf4_linear_grad_input = nf4_linear_grad_input_reference
