"""Large M: fused tiles or dequantise-to-scratch + cuBLAS, chosen per (M, N, K) by a cost model.

Both paths stay. Until a GPU measures them (bench/kernels.py times both), the choice comes from an
issue-rate model fed with what bench/sass_report.py reads from the sm_90a build (H100 SXM: 132 SMs,
1.755 GHz, 4 warp-instructions per clock per SM; REFERENCE section 7: 3.02 TB/s copy, 687 TFLOP/s bf16):

  decode  = N*K * ceil(M / 128) * SASS per element / 32 / (4 * 132 * 1.755e9): every 128 rows of x
            decode W again.
  fused   = max(MMA time, decode). Within one CTA the build still waits for each k-step's wgmma
            before decoding the next W tile, but the large-M tiles run one warpgroup per CTA and two
            CTAs per SM: while one waits on its wgmma the other decodes, so decode hides behind the
            tensor cores as long as one CTA's decode takes less than its MMA (0.5-0.8 of it in the
            build). With one CTA per SM it would be MMA time + decode.
  cuBLAS  = dequantise (N*K/2 + N*K/64 bytes read, 2*N*K written, at copy speed) + max(MMA time,
            bytes of x, W and out at copy speed).

With 5.4 (forward) and 5.8 (input gradient) SASS per element the model puts the fused tiles below
dequantise + cuBLAS at every M for the Llama shapes (at M = 4096: 1.00x against 1.07x the bf16
MMA time), so large M stays fused and no scratch W is needed; dequantise + cuBLAS remains for K not
a multiple of the blocksize, float32, and any shape where the model says so. It is a model: the
overlap is the warp schedulers', not enforced, and a GPU table replaces it once measured. The scratch
W is one buffer per device, reused by every layer (grown to the largest weight seen): never a bf16
copy of W per layer. It serves one stream: layers run one after the other on it.
"""
from __future__ import annotations

import torch

SM_COUNT, CLOCK_HZ, ISSUE_PER_CLOCK = 132, 1.755e9, 4
COPY_BYTES_PER_S, MMA_FLOP_PER_S = 3.02e12, 687e12
# Main-loop SASS per weight element of the fused kernels' sm_90a build (bench/RESULTS.md).
FUSED_SASS_PER_ELEMENT = {"forward": 5.4, "grad_input": 5.8}
FUSED_BLOCK_M = 128
# CTAs of the large-M tiles resident on one SM at once (matmul._fused_config): two or more overlap.
FUSED_CTAS_PER_SM = 2


def fused_seconds(M: int, N: int, K: int, direction: str = "forward", ctas_per_sm: int = FUSED_CTAS_PER_SM) -> float:
    decode = (N * K * -(-M // FUSED_BLOCK_M) * FUSED_SASS_PER_ELEMENT[direction] / 32
              / (ISSUE_PER_CLOCK * SM_COUNT * CLOCK_HZ))
    mma = 2 * M * N * K / MMA_FLOP_PER_S
    return max(mma, decode) if ctas_per_sm >= 2 else mma + decode


def dequant_cublas_seconds(M: int, N: int, K: int) -> float:
    dequantise = (N * K // 2 + N * K // 64 + 2 * N * K) / COPY_BYTES_PER_S
    matmul = max(2 * M * N * K / MMA_FLOP_PER_S, 2 * (M * K + N * K + M * N) / COPY_BYTES_PER_S)
    return dequantise + matmul


def prefer_fused(M: int, N: int, K: int, direction: str = "forward") -> bool:
    """True where the model puts the fused tiles at or below dequantise + cuBLAS."""
    return fused_seconds(M, N, K, direction) <= dequant_cublas_seconds(M, N, K)


_scratch: dict[torch.device, torch.Tensor] = {}


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [numel] dtype view of this device's one scratch buffer, grown when too small."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buffer = _scratch.get(device)
    if buffer is None or buffer.numel() < nbytes:
        _scratch.pop(device, None)  # free the old one before the new one exists: no double peak
        buffer = _scratch[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buffer[:nbytes].view(dtype)
