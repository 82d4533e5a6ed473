"""qlora.memory_placement: paged optimizer states under a budget, and per-rank memory (DDP, FSDP2),
against values worked out by hand."""
import pytest

from qlora.llama import LlamaConfig
from qlora.memory_placement import Placement, paged_pages, place, rank_bytes, sharded_trainable
from qlora.memory_predict import Shape, dequant_scratch_bytes, predict, preset_config

MiB = 2**20
PAGE = 16 * MiB
# D 64, I 160, 2 layers, 4 heads of 16 (Q 64) on 2 KV heads (K 32), vocab 100 (as in test_memory.py).
SMALL = LlamaConfig.from_dict(dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=64))
SMALL_SHAPE = Shape(seq=32, batch=2, grad_ckpt=True, r=8, dropout=0.05, device="cuda")
HEADLINE = Shape(seq=2048, batch=1, grad_ckpt=True, r=64, device="cuda", adapter_bytes=2)  # --bf16-adapters


@pytest.mark.parametrize("n_pages,capacity,expected", [
    (10, 20, (10, 0)),  # fits: all resident, no slots
    (10, 10, (10, 0)),
    (10, 5, (5, 8)),    # 2 resident + 3 slots on the device; the other 8 pages on the host
    (10, 3, (3, 9)),    # 3 pages or fewer: 2 slots, 1 resident
    (10, 2, (2, 10)),
    (10, 0, (2, 10)),   # "auto" with no room still streams through two slots
])
def test_paged_pages_as_the_optimizer_places_them(n_pages, capacity, expected):
    assert paged_pages(n_pages, capacity) == expected


def test_65b_fits_44gb_only_with_the_states_paged_out():
    config = preset_config("llama-65b")
    # LoRA r=64 on 80 layers: q, k, v, o (8192 + 8192) and gate, up, down (8192 + 22016) per layer.
    n_values = 80 * 64 * (4 * (8192 + 8192) + 3 * (8192 + 22016))
    assert n_values == 799_539_200
    pages = -(-n_values // (PAGE // 8))  # every tensor a multiple of 2048 values; 8 bytes of states each
    assert pages == 382
    resident = place(config, "qlora", HEADLINE, Placement(gpu_memory=44 * 10**9))
    assert resident["predicted"]["optimizer_states"] == 382 * PAGE  # 6.41 GB
    assert resident["predicted"]["adapters"] == resident["predicted"]["gradients"] == 2 * n_values
    assert not resident["fits"] and resident["host_bytes"] == 0

    paged = place(config, "qlora-paged", HEADLINE, Placement(gpu_budget=2 * PAGE, gpu_memory=44 * 10**9))
    assert paged["state_pages"] == (2, 382)  # two streaming slots on the device, every page on the host
    assert paged["host_bytes"] == 382 * PAGE
    assert paged["predicted_total_bytes"] == resident["predicted_total_bytes"] - 380 * PAGE
    # large_m's cost model keeps every linear fused at 2048 tokens: no dequantise scratch, cuBLAS's workspace.
    assert dequant_scratch_bytes(config, HEADLINE) == 0 and paged["predicted"]["workspace"] == 32 * MiB
    assert paged["fits"] and 41.5e9 < paged["predicted_total_bytes"] < 41.8e9  # the "about 41.7 GB"


def test_auto_budget_leaves_room_for_the_last_steps_peak():
    config = preset_config("llama-65b")
    resident = place(config, "qlora", HEADLINE, Placement(gpu_memory=44 * 10**9))
    # "auto" keeps a reserve of max(2 pages, 5 % of the device) = 2.2 GB free beside the step's peak without
    # the states (weights, activations, ...: 41.60 GB here), and fills the rest with pages: 11 on 44 GB.
    beside = resident["predicted_total_bytes"] - resident["predicted"]["optimizer_states"]
    assert 41.55e9 < beside < 41.65e9
    capacity = (44 * 10**9 - beside - 2_200_000_000) // PAGE
    assert capacity == 11
    auto = place(config, "qlora-paged", HEADLINE, Placement(gpu_budget="auto", gpu_memory=44 * 10**9))
    assert auto["state_pages"] == (11, 382 - 8)  # 8 resident, 3 streaming slots
    # So the next step fits 44 GB, within the reserve (the free memory at the step, activations freed,
    # would have kept 4.1 GB resident: 45.7 GB).
    assert auto["predicted_total_bytes"] == beside + 11 * PAGE <= 44 * 10**9 - 2_200_000_000
    assert auto["fits"]
    # The largest budget that fits is what is left beside everything else.
    assert auto["largest_budget"] == (44 * 10**9 - beside) // PAGE * PAGE
    best = place(config, "qlora-paged", HEADLINE, Placement(gpu_budget=auto["largest_budget"], gpu_memory=44 * 10**9))
    over = place(config, "qlora-paged", HEADLINE, Placement(gpu_budget=auto["largest_budget"] + PAGE, gpu_memory=44 * 10**9))
    assert best["fits"] and not over["fits"]
    # Where not even the two streaming slots fit beside the rest, nothing does.
    tight = place(config, "qlora-paged", HEADLINE, Placement(gpu_budget="auto", gpu_memory=beside + PAGE))
    assert tight["state_pages"] == (2, 382) and not tight["fits"] and tight["largest_budget"] is None
    # On an 80 GiB device everything stays resident: qlora-paged predicts what qlora does.
    roomy = place(config, "qlora-paged", HEADLINE, Placement(gpu_budget="auto", gpu_memory=80 * 2**30))
    assert roomy["state_pages"] == (382, 0) and roomy["predicted"] == resident["predicted"]
    # No paging on the CPU.
    cpu = place(config, "qlora-paged", Shape(device="cpu"), Placement(gpu_budget=2 * PAGE))
    assert cpu["host_bytes"] == 0 and cpu["predicted"]["optimizer_states"] == 382 * PAGE


def test_ddp_rank_holds_everything_plus_the_gradient_buckets():
    single = predict(SMALL, "qlora", SMALL_SHAPE)
    ddp = rank_bytes(SMALL, "qlora", SMALL_SHAPE, world_size=4)
    # cuBLAS, down_proj's dequantise scratch (bf16 [64, 160]), a flat float32 copy of the 17920 LoRA gradients
    assert ddp["workspace"] == 32 * MiB + 2 * 64 * 160 + 4 * 17920
    assert {k: v for k, v in ddp.items() if k != "workspace"} == {k: v for k, v in single.items() if k != "workspace"}


def test_fsdp_rank_by_hand():
    got = rank_bytes(SMALL, "qlora", SMALL_SHAPE, world_size=2, fsdp=True)
    # Per layer: NF4 codes of q 2048, k 1024, v 1024, o 2048, gate/up/down 5120 bytes (21504) + two float32
    # norms of 64 (512): 22016 bytes, half on each rank; two layers gathered whole; the root group
    # (embed_tokens, lm_head bf16 [100, 64], final norm float32) whole.
    assert got["weights"] == 2 * 22016 // 2 + 2 * 22016 + (2 * 100 * 64 * 2 + 4 * 64)
    # Constants per linear: blocks (64, 32, 32, 64, 160, 160, 160) + one float32 nested scale + 1092 table bytes.
    layer_constants = sum(b + 4 + 1092 for b in (64, 32, 32, 64, 160, 160, 160))
    assert layer_constants == 8344
    assert got["quant_constants"] == 2 * 8344 // 2 + 2 * 8344
    # LoRA: 8960 values per layer, 17920 in all, float32; every A [8, in] and B [out, 8] splits evenly.
    assert got["adapters"] == 4 * 17920 // 2 + 2 * 4 * 8960
    assert got["gradients"] == 4 * 17920 // 2 + 4 * 8960  # + one layer's unsharded gradients
    assert got["optimizer_states"] == PAGE  # 28 shards, each rounded up to 2048 values: one page
    single = predict(SMALL, "qlora", SMALL_SHAPE)
    assert got["activations"] == single["activations"] and got["workspace"] == single["workspace"]


def test_fsdp_shards_rows_rounding_up():
    # Three ranks: A [8, in] keeps ceil(8/3) = 3 rows, B [out, 8] ceil(out/3) rows (q: 22, k: 11, gate: 54).
    shards = sharded_trainable(SMALL, "qlora", SMALL_SHAPE, 3)
    assert shards[:4] == [3 * 64, 22 * 8, 3 * 64, 11 * 8]  # q A, q B, k A, k B of layer 0
    assert shards[8:10] == [3 * 64, 54 * 8]                 # gate A, gate B
    with pytest.raises(ValueError, match="LoRA modes"):
        rank_bytes(SMALL, "bf16-full", SMALL_SHAPE, world_size=2, fsdp=True)


def test_70b_on_two_ranks_against_24gb():
    config = preset_config("llama-70b")
    got = place(config, "qlora-paged", HEADLINE, Placement(world_size=2, fsdp=True, gpu_budget=2 * PAGE,
                                                           gpu_memory=24 * 2**30))
    # NF4 codes per layer: q, o 8192x8192, k, v 8192x1024, gate, up, down 8192x28672, half a byte each; norms
    # 2 x 4 x 8192: 427884544 bytes, half per rank, 80 layers; two gathered; embed_tokens + lm_head bf16.
    layer = (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672) // 2 + 2 * 4 * 8192
    assert layer == 427_884_544
    assert got["predicted"]["weights"] == 80 * layer // 2 + 2 * layer + 2 * 32000 * 8192 * 2 + 4 * 8192
    # The adapters' states (80 x 64 x (2 x 16384 + 2 x 9216 + 3 x 36864) values = 1.66 GB bf16) split in two.
    assert got["host_bytes"] == -(-80 * 64 * (2 * 16384 + 2 * 9216 + 3 * 36864) // 2 // (PAGE // 8)) * PAGE
    # Paged out, a rank needs about 25.4 GB: within a 24 GiB card (25.77e9 bytes), with 0.3 GB to spare
    # (no dequantise scratch: large_m keeps every linear fused at 2048 tokens).
    assert dequant_scratch_bytes(config, HEADLINE) == 0
    assert got["fits"] and 25.3e9 < got["predicted_total_bytes"] < 25.5e9
    resident = place(config, "qlora", HEADLINE, Placement(world_size=2, fsdp=True, gpu_memory=24 * 2**30))
    assert not resident["fits"]  # 3.3 GB of states on top do not fit
