"""The "auto" budget of paged optimizer states: how many state bytes may stay on the device.

The optimizer step runs after backward, when the step's activations are freed, so the free memory
it sees then is not what the next forward and backward will have. The rule keeps room for the peak
instead: the states may hold

    total - reserve - (the peak, less the states held then)

where total is what the allocator can reach, and the reserve (max(2 pages, 5 % of the device)) absorbs
fragmentation and step-to-step variation. The same function drives PagedStates on a GPU and the
paging model of `qlora bench-memory` (qlora.memory_placement), so the prediction follows the code.

On CUDA the peak is torch.cuda.max_memory_allocated, read once per step and never reset (other code
reads it: a training report, bench-memory --measure). It is the highest since the process started or
since whoever last called torch.cuda.reset_peak_memory_stats, so the states are sized for the largest
step seen (long and short sequences alike), not the last one; PagedStates.observe_peak keeps the
states held when that peak was set. A step that peaks higher raises it; resetting the statistics
(after loading a model that peaked higher than training does, say) lets the states grow back.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

AUTO_RESERVE_FRACTION = 0.05  # "auto" keeps this much of the device (at least two pages) free


class DeviceMemory(NamedTuple):
    usable: int     # bytes the allocator can reach: free to the driver plus cached by torch
    peak: int       # most bytes allocated since the peak statistic was last reset (or ever)
    allocated: int  # bytes allocated now


def auto_state_bytes(total: int, last_peak: int, allocated: int, state_bytes: int, reserve: int,
                     peak_state_bytes: int | None = None) -> int:
    """Device bytes the states may hold so that the next forward and backward fit in total.

    last_peak: the most allocated during a step (states included: peak_state_bytes of them,
    by default state_bytes); allocated: allocated now, state_bytes of it held by the states. What is
    not states at the peak (or now, if more) comes back next step; the states get the rest, less the reserve.
    """
    if peak_state_bytes is None:
        peak_state_bytes = state_bytes
    others = max(last_peak - peak_state_bytes, allocated - state_bytes, 0)
    return max(total - reserve - others, 0)


def auto_reserve(total: int, page_bytes: int) -> int:
    """Bytes "auto" keeps free: 5 % of the device, at least two pages."""
    return max(2 * page_bytes, int(AUTO_RESERVE_FRACTION * total))


def cuda_memory(device: torch.device) -> DeviceMemory:
    """DeviceMemory of one CUDA device, from the driver and torch's allocator statistics (read only)."""
    free, _ = torch.cuda.mem_get_info(device)
    return DeviceMemory(free + torch.cuda.memory_reserved(device), torch.cuda.max_memory_allocated(device),
                        torch.cuda.memory_allocated(device))
