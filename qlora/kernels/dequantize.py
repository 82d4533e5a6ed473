"""NF4 dequantisation, nested absmax decoded on the way: w = table[code] * absmax, in float32."""
from __future__ import annotations

import torch

from qlora.kernels.quantize import NESTED_BLOCKSIZE, REFERENCE_CHUNK


def dequantize_absmax_reference(
    codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: torch.Tensor,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """absmax[b] = code2[q8[b]] * absmax2[b // 256] + offset: a product and a sum, each rounded
    to float32 (no fused multiply-add), as bitsandbytes computes it."""
    codes = codes.reshape(-1).long()
    scale = nested_absmax.reshape(-1).repeat_interleave(nested_blocksize)[: codes.numel()]
    return nested_code[codes] * scale + offset.reshape(())


def dequantize_nf4_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Flat [numel] tensor of dtype from packed codes and float32 block scales."""
    packed = packed.reshape(-1)
    absmax = absmax.reshape(-1).to(torch.float32)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    chunk = max(REFERENCE_CHUNK // blocksize, 1) * blocksize
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        pairs = packed[start // 2:(stop + 1) // 2]
        codes = torch.stack((pairs >> 4, pairs & 0xF), dim=1).view(-1)[: stop - start].long()
        scales = absmax[start // blocksize:-(-stop // blocksize)].repeat_interleave(blocksize)[: stop - start]
        out[start:stop] = (quant_map[codes] * scales).to(dtype)
    return out


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatching entry point: flat [numel] weights from the bitsandbytes layout. With
    nested_absmax given, absmax holds the uint8 codes of the double quantisation."""
    if nested_absmax is not None:
        absmax = dequantize_absmax_reference(absmax, nested_absmax, nested_code, offset)
    return dequantize_nf4_reference(packed, absmax, quant_map, numel, blocksize, dtype)
