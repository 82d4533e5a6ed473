"""The torch references (and, under the interpreter, the Triton kernels) against bitsandbytes'
CUDA kernel outputs recorded on an H100 (tests/data/bnb_cuda_nf4.safetensors, REFERENCE 4b)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qlora.codebook import dynamic_map, nf4_codebook
from qlora.kernels.dequantize import dequantize_absmax_reference, dequantize_nf4_reference, dequantize_nf4_triton
from qlora.kernels.quantize import (quantize_absmax_reference, quantize_absmax_triton, quantize_nf4_blocks_reference,
                                    quantize_nf4_blocks_triton)

from helpers import IGNORE_ZERO_BLOCK_WARNINGS

pytestmark = IGNORE_ZERO_BLOCK_WARNINGS  # all-zero blocks divide by zero on purpose

FIXTURE = Path(__file__).parent / "data" / "bnb_cuda_nf4.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _cases():
    with safe_open(FIXTURE, "pt") as f:
        return json.loads(f.metadata()["cases"])


CASES = _cases()


@pytest.fixture(scope="module")
def fixture():
    with safe_open(FIXTURE, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _quantise(x, blocksize, double_quant, triton):
    quant, quant_absmax = ((quantize_nf4_blocks_triton, quantize_absmax_triton) if triton else
                           (quantize_nf4_blocks_reference, quantize_absmax_reference))
    packed, absmax = quant(x, blocksize)
    out = {"packed": packed, "absmax_f32": absmax}
    if double_quant:
        out["codes"], out["nested_absmax"], out["offset"] = quant_absmax(absmax)
    return out


def _same_bits(a, b):
    return torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_quantise_matches_cuda_bytes(fixture, name, triton):
    case = CASES[name]
    x = fixture[f"{name}.input"]
    assert x.dtype == DTYPES[case["dtype"]]
    got = _quantise(x, case["blocksize"], case["double_quant"], triton)
    assert torch.equal(got["packed"], fixture[f"{name}.packed"].reshape(-1))
    if case["double_quant"]:
        assert torch.equal(got["codes"], fixture[f"{name}.absmax"])
        torch.testing.assert_close(got["nested_absmax"], fixture[f"{name}.nested_absmax"], rtol=1e-6, atol=0)
        # The CUDA mean sums in another order: up to one ulp apart (fp16_odd is).
        ours, theirs = got["offset"].reshape(()), fixture[f"{name}.offset"].reshape(())
        assert abs(int(ours.view(torch.int32)) - int(theirs.view(torch.int32))) <= 1
    else:
        assert torch.equal(got["absmax_f32"], fixture[f"{name}.absmax"])


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_dequantise_matches_cuda_output(fixture, name, triton):
    case = CASES[name]
    dtype = DTYPES[case["dtype"]]
    expected = fixture[f"{name}.dequant"]
    numel = expected.numel()
    packed, absmax = fixture[f"{name}.packed"], fixture[f"{name}.absmax"]
    table = nf4_codebook()
    if triton:
        nested = ((fixture[f"{name}.nested_absmax"], fixture[f"{name}.nested_code"], fixture[f"{name}.offset"])
                  if case["double_quant"] else (None, None, None))
        got = dequantize_nf4_triton(packed, absmax, table, numel, case["blocksize"], dtype, *nested)
    else:
        if case["double_quant"]:
            absmax = dequantize_absmax_reference(absmax, fixture[f"{name}.nested_absmax"],
                                                 fixture[f"{name}.nested_code"], fixture[f"{name}.offset"])
        got = dequantize_nf4_reference(packed, absmax, table, numel, case["blocksize"], dtype)
    assert got.dtype == expected.dtype
    assert _same_bits(got, expected.reshape(-1))


def test_fixture_nested_code_is_the_dynamic_map(fixture):
    for name, case in CASES.items():
        if case["double_quant"]:
            assert torch.equal(fixture[f"{name}.nested_code"], dynamic_map())


def test_all_zero_block_is_code_zero(fixture):
    # bf16_rand holds one all-zero block: the CUDA kernel writes bytes 0x00 (CPU bitsandbytes: 0x77).
    x = fixture["bf16_rand.input"].reshape(-1, 64)
    zero_blocks = torch.nonzero((x == 0).all(dim=1)).flatten()
    assert zero_blocks.numel() >= 1
    for triton in (False, True):
        packed = _quantise(fixture["bf16_rand.input"], 64, False, triton)["packed"].reshape(-1, 32)
        for b in zero_blocks.tolist():
            assert packed[b].tolist() == [0] * 32
            assert fixture["bf16_rand.packed"].reshape(-1, 32)[b].tolist() == [0] * 32
