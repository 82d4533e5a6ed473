"""PagedAdamW32bit.step's host work: the kernel's tensor table is copied to the device when a
parameter or gradient moves, not every step (and a moved gradient is still found)."""
import torch

import qlora.optim as optim
from qlora.optim import PagedAdamW32bit


def test_tensor_table_copied_only_when_addresses_change(monkeypatch):
    monkeypatch.setenv("QLORA_BACKEND", "triton")  # the kernel path, interpreted on the CPU
    tables = []
    real = optim.to_device

    def counting(host, device):
        # The tensor table: (parameter offset, gradient offset, numel) rows; not the page table.
        if host.dtype == torch.int64 and host.dim() == 2 and host[:, -1].tolist() == [300, 63]:
            tables.append(host.clone())
        return real(host, device)

    monkeypatch.setattr(optim, "to_device", counting)
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(300, generator=g).requires_grad_(), torch.randn(7, 9, generator=g).requires_grad_()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = PagedAdamW32bit(ours, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, grad in zip(ours, theirs, grads):
            if step < 3 and p.grad is not None:
                p.grad.copy_(grad)  # same address: the cached table stays valid
            else:
                p.grad = grad.clone()  # a new address (first step, and step 3)
            q.grad = grad.clone()
        opt.step()
        ref.step()
    assert len(tables) == 2  # the first step and the step whose gradients moved
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
