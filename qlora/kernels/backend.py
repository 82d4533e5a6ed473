"""Which implementation runs an op: Triton for CUDA tensors, the torch reference for CPU ones.

`QLORA_BACKEND=torch` forces the reference everywhere; `QLORA_BACKEND=triton` forces the Triton
kernels, and on CPU tensors they run under the Triton interpreter (slow; for tests).

The interpreter is chosen when a kernel is *defined* (`@triton.jit` reads TRITON_INTERPRET then),
so it has to be switched on before the kernel modules are imported. This module is imported first
by each of them and turns it on when there is no CUDA device: without a GPU the interpreter is the only
way Triton kernels can run, so nothing is lost. (On a GPU machine, forcing Triton on CPU tensors needs
TRITON_INTERPRET=1 set by hand, and then every kernel is interpreted.)
"""
from __future__ import annotations

import functools
import os

import torch

_CHOICES = ("", "torch", "triton")


def _choice() -> str:
    choice = os.environ.get("QLORA_BACKEND", "").strip().lower()
    if choice not in _CHOICES:
        raise ValueError(f"QLORA_BACKEND={choice!r}: expected 'torch' or 'triton' (or unset)")
    return choice


_choice()  # fail early on a misspelt value
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Captured once: kernels defined from here on are interpreted iff this is true.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


class _TritonMissing:
    """Stands in for triton and triton.language where no wheel exists (macOS, Windows): the kernels
    are still defined, never launched, and the torch reference runs every op."""

    @staticmethod
    def jit(fn=None, **options):
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name):
        raise ImportError(f"triton.{name}: triton is not installed; qlora uses its torch reference")


try:  # after TRITON_INTERPRET is settled: triton reads it when a kernel is defined
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = _TritonMissing()
HAS_TRITON = not isinstance(triton, _TritonMissing)


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor t should run the Triton kernels."""
    choice = _choice()
    if choice == "torch" or (not HAS_TRITON and choice != "triton"):
        return False
    if not HAS_TRITON:
        raise RuntimeError("QLORA_BACKEND=triton: triton is not installed (pip install triton, on Linux)")
    if choice == "triton" or t.is_cuda:
        if not t.is_cuda and not INTERPRET:
            raise RuntimeError("QLORA_BACKEND=triton on CPU tensors needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before qlora is imported")
        return True
    return False


def on_gpu(t: torch.Tensor) -> bool:
    """Compiled (not interpreted) Triton: the kernels may use PTX inline assembly."""
    return t.is_cuda and not INTERPRET


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host side of a launch (triton.cdiv is a JIT function: slow from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of device (asked once per device). The interpreter pretends to a
    small machine, so that small test shapes take the split-K and persistent paths."""
    if device.type != "cuda":
        return 2
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def run_chosen(choose, args):
    """choose(use_triton(args[0]))(*args), launched on args[0]'s GPU (not whichever is current)."""
    first = args[0]
    if first.is_cuda and first.device.index != torch.cuda.current_device():
        with torch.cuda.device(first.device):
            return choose(use_triton(first))(*args)
    return choose(use_triton(first))(*args)


def dispatching_op(name: str, schema: str, fake):
    """Decorator: the torch.library op qlora::name from `choose(use_triton) -> implementation`.

    Each call runs the implementation choose returns (it is asked at every call, so a test can swap
    one in) for use_triton of the first argument; fake gives the output shapes under torch.compile,
    which keeps the op in the graph as one opaque node. Returns the op, for register_autograd."""
    def register(choose):
        def run(*args):
            return run_chosen(choose, args)

        op = torch.library.custom_op(f"qlora::{name}", run, mutates_args=(), schema=schema)
        op.register_fake(fake)
        return op

    return register
