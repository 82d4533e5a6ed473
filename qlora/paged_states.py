"""Paged state memory: fixed-size float32 pages of optimizer state, resident on the device or in
pinned host memory under a byte budget, streamed through a ring of device slots when they do not fit.

PagedAdamW32bit (qlora/optim.py) owns one PagedStates per device and asks it for ranges of state;
this module knows nothing of the update itself: `run` hands it the pages a step needs and a function
that updates resident pages. On the CPU the same page table runs with CPU tensors on both sides,
which is how the paging logic is tested without a GPU.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from qlora.kernels.adamw import CHUNK, PAGE_COLUMNS
from qlora.paged_budget import DeviceMemory, auto_reserve, auto_state_bytes, cuda_memory

DEFAULT_PAGE_SIZE = 16 << 20  # bytes of state per page (both moments): 2M parameters
STATE_BYTES_PER_ELEMENT = 8    # exp_avg + exp_avg_sq, float32 each (page_size counts these two)
STREAM_SLOTS = 3               # device slots streamed pages pass through (2 would serialise compute)
UNLIMITED_PAGES = 1 << 62      # capacity with no budget to follow


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned, so the copy is asynchronous (a pageable one would wait for the GPU).
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class Page:
    __slots__ = ("device_data", "host_data", "last_used")

    def __init__(self) -> None:
        self.device_data: torch.Tensor | None = None  # authoritative when set
        self.host_data: torch.Tensor | None = None    # authoritative when device_data is None
        self.last_used = -1


class PagedStates:
    """The page table of one device: where each page lives, and the moves between the two sides.

    budget: bytes of device memory the pages (and the streaming slots) may hold; "auto" to leave
    room for the peak of a step (qlora.paged_budget; memory() reads the device, cuda_memory on a
    GPU); None for no limit.
    """

    def __init__(
        self,
        device: torch.device | str,
        page_numel: int,
        budget: int | str | None = None,
        *,
        memory: Callable[[], DeviceMemory] | None = None,
        reserve: int | None = None,
        rows: int = 2,
    ) -> None:
        if page_numel <= 0 or page_numel % CHUNK:
            raise ValueError(f"page_numel must be a positive multiple of {CHUNK}, got {page_numel}")
        self.device = torch.device(device)
        self.page_numel = page_numel
        self.rows = rows
        self.budget = budget
        self.cuda = self.device.type == "cuda"
        if budget == "auto" and memory is None and self.cuda:
            memory = lambda: cuda_memory(self.device)  # noqa: E731
        self.memory = memory
        if reserve is None:
            total = torch.cuda.get_device_properties(self.device).total_memory if self.cuda else 0
            reserve = auto_reserve(total, self.page_bytes)
        self.reserve = reserve
        # "auto": (the allocator's peak, the state bytes on the device when it was reached), and the peak
        # statistic as last read.
        self.last_peak: tuple[int, int] | None = None
        self._peak_read: int | None = None
        self.pages: list[Page] = []
        self.numel = 0  # flat elements handed out
        self.clock = 0
        self.slots: list[torch.Tensor] = []
        self.slot_free: list[torch.cuda.Event | None] = []
        self.active: dict[int, torch.Tensor] = {}  # page -> the tensor the update reads this step
        self.bytes_streamed = 0  # host <-> device bytes moved by step() streaming (both ways)
        self.bytes_paged = 0     # bytes moved by evictions and promotions
        # Offsets in the page table are in float32 elements from this anchor.
        self.state_base = torch.zeros(4, dtype=torch.float32, device=self.device)
        self.page_table: torch.Tensor | None = None
        self._page_table_key: tuple | None = None
        self.in_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.out_stream = torch.cuda.Stream(self.device) if self.cuda else None

    # ---- sizes and limits -------------------------------------------------------------
    @property
    def page_bytes(self) -> int:
        return 4 * self.rows * self.page_numel

    @property
    def resident_pages(self) -> list[int]:
        return [k for k, page in enumerate(self.pages) if page.device_data is not None]

    @property
    def device_bytes(self) -> int:
        """Device memory held by the states: resident pages plus streaming slots."""
        return (len(self.resident_pages) + len(self.slots)) * self.page_bytes

    def _capacity_pages(self, growing: bool) -> int:
        if self.budget is None or (self.budget == "auto" and self.memory is None):
            return UNLIMITED_PAGES
        if self.budget == "auto":
            if self.last_peak is None:
                self.observe_peak()
            now = self.memory()
            peak, peak_state_bytes = self.last_peak
            # Evict below one reserve of room, grow back only above two: no flapping.
            room = auto_state_bytes(now.usable, peak, now.allocated, self.device_bytes,
                                    (2 if growing else 1) * self.reserve, peak_state_bytes)
            return room // self.page_bytes
        return self.budget // self.page_bytes

    def observe_peak(self) -> None:
        """Under "auto": read the allocator's peak (the optimizer does once per step, after backward).

        The statistic is never reset here. One that changed since the last reading (higher: reached since
        then; lower: someone reset it since then) was reached with the states the device holds now, which
        have not moved since the last step (page_out() may have emptied them: that only overestimates what
        else the peak held). An unchanged one leaves the record, with the states held when it was set."""
        if self.budget != "auto" or self.memory is None:
            return
        peak = self.memory().peak
        if self.last_peak is None or peak != self._peak_read:
            self.last_peak = (peak, self.device_bytes)
        self._peak_read = peak

    def _resident_limit(self, n_pages: int, capacity: int) -> int:
        if n_pages <= capacity:
            return n_pages
        return max(capacity - self._slot_count(capacity), 0)

    @staticmethod
    def _slot_count(capacity: int) -> int:
        return STREAM_SLOTS if capacity > STREAM_SLOTS else 2

    # ---- allocation ---------------------------------------------------------------------
    def allocate(self, numel: int) -> int:
        """A zeroed range of numel elements; returns its flat start."""
        start = self.numel
        self.numel += -(-numel // CHUNK) * CHUNK
        while len(self.pages) * self.page_numel < self.numel:
            page = Page()
            if len(self.resident_pages) < self._resident_limit(len(self.pages) + 1, self._capacity_pages(False)):
                page.device_data = torch.zeros((self.rows, self.page_numel), dtype=torch.float32, device=self.device)
            else:
                page.host_data = self._host_zeros()
            self.pages.append(page)
        return start

    def _host_zeros(self) -> torch.Tensor:
        return torch.zeros((self.rows, self.page_numel), dtype=torch.float32, pin_memory=self.cuda)

    def add_rows(self, rows: int) -> None:
        """Grow every page (and the slots) to `rows` rows, the new ones zero: amsgrad switched on."""
        if rows <= self.rows:
            return
        self.synchronize()
        for page in self.pages:
            for side in ("device_data", "host_data"):
                old = getattr(page, side)
                if old is not None:
                    new = torch.zeros((rows, self.page_numel), dtype=torch.float32, device=old.device,
                                      pin_memory=side == "host_data" and self.cuda)
                    new[:self.rows].copy_(old)
                    setattr(page, side, new)
        self.rows = rows
        self.slots, self.slot_free = [], []
        self.page_table, self._page_table_key = None, None

    def pieces(self, start: int, numel: int):
        """(page, offset in page, offset in range, length) for a flat range."""
        pos = start
        while pos < start + numel:
            page, offset = divmod(pos, self.page_numel)
            length = min(self.page_numel - offset, start + numel - pos)
            yield page, offset, pos - start, length
            pos += length

    # ---- residency ------------------------------------------------------------------------
    def evict(self, k: int) -> None:
        """Write page k back to the host and free its device memory."""
        page = self.pages[k]
        if page.device_data is None:
            return
        if page.host_data is None:
            page.host_data = torch.empty((self.rows, self.page_numel), dtype=torch.float32, pin_memory=self.cuda)
        # On the compute stream: a later allocation reusing the freed block is ordered after it.
        page.host_data.copy_(page.device_data, non_blocking=self.cuda)
        page.device_data = None
        self.bytes_paged += self.page_bytes

    def promote(self, k: int) -> None:
        page = self.pages[k]
        if page.device_data is not None:
            return
        page.device_data = torch.empty((self.rows, self.page_numel), dtype=torch.float32, device=self.device)
        page.device_data.copy_(page.host_data, non_blocking=self.cuda)
        # The device copy is authoritative now; keeping the host one would hold the states twice.
        # (The caching host allocator keeps pinned memory alive until the async copy is done.)
        page.host_data = None
        self.bytes_paged += self.page_bytes

    def fit(self) -> None:
        """Evict least-recently-used pages above the budget, or bring host pages back below it."""
        if self.cuda:
            # Host copies are written by the write-back stream; moves below run on the compute stream.
            torch.cuda.current_stream(self.device).wait_stream(self.out_stream)
        resident = self.resident_pages
        # Measured once: under "auto" the capacity counts what we hold, which evictions change.
        capacity = self._capacity_pages(growing=False)
        limit = self._resident_limit(len(self.pages), capacity)
        if len(resident) > limit:
            for k in sorted(resident, key=lambda k: (self.pages[k].last_used, k))[: len(resident) - limit]:
                self.evict(k)
        else:
            room = self._resident_limit(len(self.pages), self._capacity_pages(growing=True)) - len(resident)
            for k in [k for k, page in enumerate(self.pages) if page.device_data is None][: max(room, 0)]:
                self.promote(k)
        n_streamed = len(self.pages) - len(self.resident_pages)
        if n_streamed == 0:
            self.slots, self.slot_free = [], []
        elif not self.slots:
            n_slots = self._slot_count(capacity)
            self.slots = [torch.empty((self.rows, self.page_numel), dtype=torch.float32, device=self.device)
                          for _ in range(n_slots)]
            self.slot_free = [None] * n_slots

    def page_out(self) -> None:
        """Move every page to the host and release the device memory (slots included)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.out_stream)
        for k in self.resident_pages:
            self.evict(k)
        self.slots, self.slot_free = [], []
        self.page_table, self._page_table_key = None, None

    # ---- the step -----------------------------------------------------------------------
    def run(self, needed: Sequence[int], update: Callable[[list[int]], None]) -> None:
        """Call update(pages) so that every page in needed is updated exactly once.

        Resident pages go in one call; the others are streamed in through the slots
        (ahead of their update, on a side stream), updated one by one and written back.
        During each call, self.active[k] is the tensor holding page k and self.page_table
        gives its offsets.
        """
        self.fit()
        resident = [k for k in needed if self.pages[k].device_data is not None]
        streamed = [k for k in needed if self.pages[k].device_data is None]
        for k in needed:
            self.clock += 1
            self.pages[k].last_used = self.clock
        self.active = {k: self.pages[k].device_data for k in resident}
        for i, k in enumerate(streamed):
            self.active[k] = self.slots[i % len(self.slots)]
        self._publish_page_table()
        if self.cuda and streamed:
            self._stream_cuda(resident, streamed, update)
        else:
            if resident:
                update(resident)
            for k in streamed:
                slot = self.active[k]
                slot.copy_(self.pages[k].host_data)
                update([k])
                self.pages[k].host_data.copy_(slot)
        self.bytes_streamed += 2 * len(streamed) * self.page_bytes

    def _stream_cuda(self, resident: list[int], streamed: list[int], update) -> None:
        compute = torch.cuda.current_stream(self.device)
        n_slots = len(self.slots)
        # Loads read host pages that evictions (compute) and the last write-backs (out) wrote.
        self.in_stream.wait_stream(compute)
        self.in_stream.wait_stream(self.out_stream)
        loaded: list[torch.cuda.Event | None] = [None] * len(streamed)

        def load(i: int) -> None:
            slot = i % n_slots
            with torch.cuda.stream(self.in_stream):
                if self.slot_free[slot] is not None:
                    self.in_stream.wait_event(self.slot_free[slot])
                self.slots[slot].copy_(self.pages[streamed[i]].host_data, non_blocking=True)
                loaded[i] = self.in_stream.record_event()

        for i in range(min(n_slots, len(streamed))):
            load(i)
        if resident:
            update(resident)  # overlaps the first loads
        for i, k in enumerate(streamed):
            slot = i % n_slots
            compute.wait_event(loaded[i])
            update([k])
            updated = compute.record_event()
            with torch.cuda.stream(self.out_stream):
                self.out_stream.wait_event(updated)
                self.pages[k].host_data.copy_(self.slots[slot], non_blocking=True)
                self.slot_free[slot] = self.out_stream.record_event()
            if i + n_slots < len(streamed):
                load(i + n_slots)

    def _publish_page_table(self) -> None:
        base = self.state_base.data_ptr()
        rows: list[int] = []
        for k in range(len(self.pages)):
            data = self.active.get(k)
            if data is None:
                rows += (0, 0, 0)
            else:
                offset = (data.data_ptr() - base) // 4
                rows += (offset, offset + self.page_numel, offset + 2 * self.page_numel if self.rows > 2 else 0)
        key = tuple(rows)
        if key != self._page_table_key:
            self.page_table = to_device(torch.tensor(rows, dtype=torch.int64).view(-1, PAGE_COLUMNS), self.device)
            self._page_table_key = key

    # ---- reading and writing ranges (state dicts) -------------------------------------------
    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def read(self, start: int, numel: int) -> torch.Tensor:
        """float32 [rows, numel] CPU copy of a range, wherever its pages are."""
        self.synchronize()
        out = torch.empty((self.rows, numel), dtype=torch.float32)
        for k, offset, at, length in self.pieces(start, numel):
            page = self.pages[k]
            source = page.device_data if page.device_data is not None else page.host_data
            out[:, at:at + length].copy_(source[:, offset:offset + length])
        return out

    def write(self, start: int, data: torch.Tensor) -> None:
        """Overwrite the first rows of a range with float32 [rows, numel] data."""
        self.synchronize()
        for k, offset, at, length in self.pieces(start, data.shape[1]):
            page = self.pages[k]
            target = page.device_data if page.device_data is not None else page.host_data
            target[:data.shape[0], offset:offset + length].copy_(data[:, at:at + length])
        self.synchronize()
