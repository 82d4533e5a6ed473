"""The "auto" budget of paged states: the rule with hand-worked numbers, the page table following it on a
simulated device, and PagedAdamW32bit reading one peak per step (all on the CPU)."""
import torch

from qlora.kernels.adamw import CHUNK
from qlora.optim import PagedAdamW32bit
from qlora.paged_budget import DeviceMemory, auto_reserve, auto_state_bytes
from qlora.paged_states import PagedStates

GB = 10**9
PAGE_NUMEL = CHUNK
PAGE = 8 * PAGE_NUMEL  # bytes of a page (exp_avg and exp_avg_sq, float32)


def test_auto_rule_by_hand():
    # 44 GB; the last step peaked at 40 GB with 2 GB of states on the device; at the step 30 GB are
    # allocated (2 GB states). Beside the states the next step needs 38 GB; the reserve 2.2 GB: 3.8 GB left.
    assert auto_reserve(44 * GB, PAGE) == 2_200_000_000
    assert auto_state_bytes(44 * GB, 40 * GB, 30 * GB, 2 * GB, 2_200_000_000) == 3_800_000_000
    # (What is free at the step would have allowed 44 - 30 + 2 - 2.2 = 13.8 GB: 51.8 GB next step.)
    # A peak below what is allocated now (read just after a reset): what is allocated counts.
    assert auto_state_bytes(44 * GB, 10 * GB, 30 * GB, 2 * GB, 2_200_000_000) == 13_800_000_000
    # The peak was taken with 1 GB of states, 3 GB are on the device now: 39 GB beside them, 2.8 GB left.
    assert auto_state_bytes(44 * GB, 40 * GB, 31 * GB, 3 * GB, 2_200_000_000, peak_state_bytes=1 * GB) \
        == 2_800_000_000
    assert auto_state_bytes(40 * GB, 45 * GB, 30 * GB, 0, 2 * GB) == 0  # no room: none, never negative
    assert auto_reserve(1 * GB, 16 * 2**20) == 50_000_000 and auto_reserve(100 * 2**20, 16 * 2**20) == 32 * 2**20


class SimulatedDevice:
    """A device holding `held` bytes beside the states, with torch's peak statistic: the most allocated
    since the last reset (by the user: the optimizer only reads it), never below what is allocated now."""

    def __init__(self, usable: int, held: int) -> None:
        self.usable, self.held, self.store = usable, held, None
        self.peak = held

    def allocated(self) -> int:
        return self.held + (self.store.device_bytes if self.store else 0)

    def forward_backward(self, activations: int) -> int:
        self.peak = max(self.peak, self.allocated() + activations)
        return self.allocated() + activations

    def __call__(self) -> DeviceMemory:
        self.peak = max(self.peak, self.allocated())
        return DeviceMemory(self.usable, self.peak, self.allocated())

    def reset_peak(self) -> None:  # torch.cuda.reset_peak_memory_stats
        self.peak = self.allocated()


def test_pages_leave_room_for_the_largest_steps_activations():
    # In pages: 40 usable, 10 held beside the states, a reserve of 2, 12 pages of states.
    device = SimulatedDevice(40 * PAGE, 10 * PAGE)
    store = device.store = PagedStates("cpu", PAGE_NUMEL, budget="auto", memory=device, reserve=2 * PAGE)
    for _ in range(12):
        store.allocate(PAGE_NUMEL)
    assert len(store.resident_pages) == 12  # nothing has run yet: 40 - 2 - 10 = 28 pages of room

    def step(activations: int) -> int:
        peak = device.forward_backward(activations * PAGE)
        store.observe_peak()  # as PagedAdamW32bit.step does
        store.run(list(range(12)), lambda pages: None)
        return peak // PAGE

    # Activations of 18 pages: the step peaked at 10 + 12 + 18 = 40 pages. Beside the states that is 28,
    # so 40 - 2 - 28 = 10 pages for the states: 7 resident and 3 streaming slots.
    assert step(18) == 40
    assert len(store.resident_pages) == 7 and len(store.slots) == 3 and store.device_bytes == 10 * PAGE
    # The same step again peaks at 38 pages, within the reserve, and nothing moves.
    assert step(18) == 38
    assert len(store.resident_pages) == 7 and store.device_bytes == 10 * PAGE
    # Short sequences (2 pages of activations) peak lower, but a long one may come again: nothing moves.
    assert step(2) == 22
    assert len(store.resident_pages) == 7
    # Once the user resets the peak statistics, the short step's 10 + 10 + 2 = 22 is the peak: 12 beside
    # the states, 40 - 4 (two reserves to grow) - 12 = 24 >= 12: all back.
    device.reset_peak()
    assert step(2) == 22
    assert len(store.resident_pages) == 12 and not store.slots
    # A long step again peaks at 10 + 12 + 18 = 40: back to 7 resident and 3 slots.
    assert step(18) == 40
    assert len(store.resident_pages) == 7 and store.device_bytes == 10 * PAGE


def test_optimizer_reads_the_peak_every_step_and_stays_exact():
    shapes = [(PAGE_NUMEL,)] * 5 + [(3, 100)]  # 6 pages of states
    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = PagedAdamW32bit(ours, lr=1e-2, weight_decay=0.1, page_size=PAGE)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    # Run the CPU page table as on a GPU under "auto": 20 pages usable, 4 held, a reserve of 1.
    device = SimulatedDevice(20 * PAGE, 4 * PAGE)
    store = device.store = opt.store("cpu")
    store.budget, store.memory, store.reserve = "auto", device, PAGE
    resident = []
    for step, activations in enumerate([2, 12, 12, 1, 1], 1):
        if step == 5:
            device.reset_peak()
        device.forward_backward(activations * PAGE)
        for params in (ours, theirs):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        ref.step()
        resident.append(len(store.resident_pages))
    # Step 1 peaked at 4 + 2 (no states yet): 20 - 1 - 6 = 13 pages of room, all 6 resident. Step 2 at
    # 4 + 6 + 12: 20 - 1 - 16 = 3 pages, 2 of them slots (3 pages or fewer), 1 resident. Steps 3 and 4 peak
    # lower (4 + 3 + 12, 4 + 3 + 1): the peak stays step 2's. After a reset, step 5's 4 + 3 + 1 is the peak:
    # 20 - 2 - 5 = 13 >= 6, all back.
    assert resident == [6, 1, 1, 1, 6]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
