"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty comes back full of NaN (floats) or 0xAB (bytes): unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0xAB if t.dtype == torch.uint8 else -1)

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(scope="session")
def nf4_checkpoint(tmp_path_factory):
    """The embedded model quantised by qlora with the defaults (NF4, double quantisation), once per
    session; the tests only read it."""
    from qlora.convert import DEFAULT_MODEL, quantize_checkpoint

    out = tmp_path_factory.mktemp("nf4") / "tiny-nf4"
    quantize_checkpoint(DEFAULT_MODEL, out, progress=False)
    return out
