"""Large M: fused tiles or dequantise-to-scratch + cuBLAS, chosen per (M, N, K) by a cost model.

Both paths stay. Until a GPU measures them (bench/kernels.py times both), the choice comes from an
issue-rate model fed with what bench/sass_report.py reads from the sm_90a build (H100 SXM: 132 SMs,
1.755 GHz, 4 warp-instructions per clock per SM; REFERENCE section 7: 3.02 TB/s copy, 687 TFLOP/s bf16):

  fused   = MMA time + decode time. The build waits for each k-step's wgmma before decoding the next
            W tile (no overlap), and every BLOCK_M rows of x decode W again:
            decode = N*K * ceil(M / 128) * SASS per element / 32 / (4 * 132 * 1.755e9).
  cuBLAS  = dequantise (N*K/2 + N*K/64 bytes read, 2*N*K written, at copy speed) + max(MMA time,
            bytes of x, W and out at copy speed).

With 7.7 (forward) and 13.4 (input gradient) SASS per element the fused tiles win up to M = 384
(forward) and about 210-228 (input gradient), whatever N and K; beyond, dequantise + cuBLAS (at
M = 4096 the model puts fused at 1.6x and 2.1x its time). The scratch W is one buffer
per device, reused by every layer (grown to the largest weight seen): never a bf16 copy of W per
layer. It serves one stream: layers run one after the other on it, as in training and generation.
"""
from __future__ import annotations

import torch

SM_COUNT, CLOCK_HZ, ISSUE_PER_CLOCK = 132, 1.755e9, 4
COPY_BYTES_PER_S, MMA_FLOP_PER_S = 3.02e12, 687e12
# Main-loop SASS per weight element of the fused kernels' sm_90a build (bench/RESULTS.md).
FUSED_SASS_PER_ELEMENT = {"forward": 7.7, "grad_input": 13.4}
FUSED_BLOCK_M = 128


def fused_seconds(M: int, N: int, K: int, direction: str = "forward") -> float:
    decode = (N * K * -(-M // FUSED_BLOCK_M) * FUSED_SASS_PER_ELEMENT[direction] / 32
              / (ISSUE_PER_CLOCK * SM_COUNT * CLOCK_HZ))
    return 2 * M * N * K / MMA_FLOP_PER_S + decode


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
