"""The code tables and the quantiser thresholds against the published facts (REFERENCE section 1,
docs/FP4.md)."""
import struct
from fractions import Fraction

import pytest
import torch

from qlora.codebook import dynamic_map, fp4_codebook, fp4_thresholds, nf4_codebook, nf4_thresholds, quant_table

# bitsandbytes' hard-coded NF4 table (float32), as REFERENCE section 1 gives it.
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# bitsandbytes' CUDA quantiser thresholds, IEEE float32 bit patterns (REFERENCE section 1).
BNB_THRESHOLD_BITS = (
    "bf591cd9 bf1c5270 beeb8480 beadea76 be703cec be0d38bc bd3a7871 3d22faff "
    "3df64863 3e5067e0 3e9582d4 3ec753f9 3f006d03 3f248daf 3f5c89d9"
).split()


def _bits(t: torch.Tensor) -> list[int]:
    return [b & 0xFFFFFFFF for b in t.view(torch.int32).tolist()]


def test_codebook_bit_identical_to_bitsandbytes():
    expected = torch.tensor(BNB_NF4, dtype=torch.float32)
    assert _bits(nf4_codebook()) == _bits(expected)


def test_codebook_shape():
    table = nf4_codebook()
    assert table.dtype == torch.float32 and table.shape == (16,)
    assert table[7].item() == 0.0 and table[0].item() == -1.0 and table[15].item() == 1.0
    assert bool((table[1:] > table[:-1]).all())


def test_thresholds_are_the_cuda_bit_patterns():
    assert [f"{b:08x}" for b in _bits(nf4_thresholds())] == BNB_THRESHOLD_BITS


def test_thresholds_within_one_ulp_of_midpoints():
    table = torch.tensor(BNB_NF4, dtype=torch.float32)
    mid = (table[1:] + table[:-1]) / 2
    thr = nf4_thresholds()
    ulps = (thr.view(torch.int32).long() - mid.view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 1
    # Exactly four (k = 0, 8, 12, 14) are one ulp off the float32 midpoints.
    assert sorted(torch.nonzero(ulps).flatten().tolist()) == [0, 8, 12, 14]


def test_dynamic_map_facts():
    m = dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32
    assert bool((m[1:] > m[:-1]).all())
    assert m[-1].item() == 1.0 and 0.0 in m.tolist()
    assert m[0].item() == pytest.approx(-0.99297, abs=1e-5)
    # Not linear int8: the smallest nonzero magnitude is far below 1/127.
    assert m.abs()[m != 0].min().item() < 1e-5


def test_dynamic_map_matches_bitsandbytes_when_installed():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    expected = bnb_functional.create_dynamic_map(signed=True).to(torch.float32)
    assert _bits(dynamic_map()) == _bits(expected)


def test_threshold_bits_decode():
    # The patterns read back as the float32 values the tensor holds (guards the int32 view).
    values = [struct.unpack(">f", bytes.fromhex(h))[0] for h in BNB_THRESHOLD_BITS]
    assert nf4_thresholds().tolist() == values


# bitsandbytes' CUDA source (csrc/kernels.cu): dQuantizeFP4's decimal threshold literals, ascending, and
# the magnitudes its dequantiser's lookup table holds for codes 0b000..0b111, as written there.
CUDA_FP4_THRESHOLDS = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")
CUDA_FP4_LUT = ("0.0", "0.005208333333", "0.66666667", "1.0", "0.33333333", "0.5", "0.16666667", "0.25")


def nearest_float32(decimal: str) -> float:
    """What a C compiler makes of the literal `decimal`f: the float32 nearest the exact decimal value
    (exact rational arithmetic, no detour through a double)."""
    exact = Fraction(decimal)
    guess = torch.tensor(float(exact), dtype=torch.float32)
    candidates = [guess.item(), torch.nextafter(guess, torch.tensor(-1.0)).item(),
                  torch.nextafter(guess, torch.tensor(2.0)).item()]
    return min(candidates, key=lambda c: abs(Fraction(c) - exact))


def test_fp4_table_is_the_cuda_lookup_table_with_signs():
    table = fp4_codebook()
    assert table.dtype == torch.float32 and table.shape == (16,)
    magnitudes = [nearest_float32(v) for v in CUDA_FP4_LUT]
    assert table[:8].tolist() == magnitudes
    assert table[8:].tolist() == [-m for m in magnitudes]
    assert table[3].item() == 1.0 and table[11].item() == -1.0


def test_fp4_table_bit_identical_to_bitsandbytes_when_installed():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    expected = bnb_functional.get_4bit_type("fp4", device="cpu").to(torch.float32)
    # Bits, so that the sign of code 0b1000's zero counts too (bitsandbytes stores +0.0 there).
    assert _bits(fp4_codebook()) == _bits(expected)


def test_fp4_thresholds_are_the_cuda_literals():
    assert fp4_thresholds().tolist() == [nearest_float32(v) for v in CUDA_FP4_THRESHOLDS]


def test_fp4_thresholds_lie_between_neighbouring_magnitudes():
    magnitudes = fp4_codebook()[:8].sort().values
    thresholds = fp4_thresholds()
    assert bool((magnitudes[:-1] < thresholds).all() and (thresholds < magnitudes[1:]).all())
    # Near the midpoints, but not all on them: 0.583333f is 6 ulps below, 0.00260417f 14 above.
    ulps = (thresholds.view(torch.int32).long() - ((magnitudes[1:] + magnitudes[:-1]) / 2).view(torch.int32).long())
    assert ulps.tolist() == [14, 0, -1, -1, 0, -6, -1]


def test_quant_table_names_the_types():
    assert torch.equal(quant_table("nf4"), nf4_codebook()) and torch.equal(quant_table("fp4"), fp4_codebook())
    with pytest.raises(ValueError, match="'int4'"):
        quant_table("int4")
