"""`qlora quantize` / quantize_checkpoint: what is quantised, the layout written, safety, errors."""
from __future__ import annotations

import json
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlora.convert as qc
from qlora.checkpoint import INDEX_FILE, CheckpointError, load_quantized_state_dict, load_state_dict
from qlora.cli import main
from qlora.nf4 import NF4Weight, quantize_nf4
from qlora.convert import DEFAULT_MODEL, quantize_checkpoint

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
N_LAYERS = 4
# 4-bit codes + one uint8 scale per 64 + one float32 per 64*256 (REFERENCE section 3).
DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)


@pytest.fixture(scope="module")
def source():
    return load_file(DEFAULT_MODEL / "model.safetensors")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    dst = tmp_path_factory.mktemp("q") / "tiny-nf4"
    summary = quantize_checkpoint(DEFAULT_MODEL, dst, progress=False)
    return dst, summary


def make_sharded_copy(src_dir, dst_dir, n_shards=3):
    """The embedded model re-saved as n shards plus an index, as transformers writes big models."""
    dst_dir.mkdir(parents=True)
    tensors = load_file(src_dir / "model.safetensors")
    names = list(tensors)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::n_shards]}
        save_file(part, dst_dir / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (dst_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copy(src_dir / name, dst_dir / name)
    return dst_dir


def small_model(path, weights=None, config=True):
    """A two-linear checkpoint directory for the error cases (quantises in milliseconds)."""
    g = torch.Generator().manual_seed(0)
    weights = weights or {}
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 128, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(64, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(16, 64, generator=g).to(torch.bfloat16),
        **weights,
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return path


# --- the default model ------------------------------------------------------------------------

def expected_quantized_names():
    return {f"model.layers.{i}.{lin}.weight" for i in range(N_LAYERS) for lin in LINEARS}


def test_quantizes_exactly_the_linear_weights(quantized, source):
    dst, summary = quantized
    loaded = load_quantized_state_dict(dst)
    assert set(loaded) == set(source)
    nf4 = {name for name, value in loaded.items() if isinstance(value, NF4Weight)}
    assert nf4 == expected_quantized_names()
    for name, value in loaded.items():
        if name in nf4:
            assert value.shape == tuple(source[name].shape) and value.dtype == torch.bfloat16
            assert value.blocksize == 64 and value.double_quant
        else:  # embeddings, norms, lm_head: the same bytes
            assert value.dtype == source[name].dtype and torch.equal(value, source[name]), name
    assert summary.tensors_quantized == len(nf4) == 28
    assert summary.tensors_copied == len(source) - 28


def test_codes_are_those_of_quantize_nf4_and_bitsandbytes_layout(quantized, source):
    dst, _ = quantized
    stored = load_file(dst / "model.safetensors")
    name = "model.layers.2.mlp.down_proj"
    expected = quantize_nf4(source[f"{name}.weight"], 64, True).state_dict(name)
    for key, tensor in expected.items():
        if key.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(stored[key].tolist())) == json.loads(bytes(tensor.tolist()))
        else:
            assert stored[key].dtype == tensor.dtype and torch.equal(stored[key], tensor), key
    assert stored[f"{name}.weight"].shape == (256 * 704 // 2, 1)
    assert stored[f"{name}.weight.absmax"].dtype == torch.uint8


def test_config_other_files_and_summary(quantized):
    dst, summary = quantized
    config = json.loads((dst / "config.json").read_text())
    original = json.loads((DEFAULT_MODEL / "config.json").read_text())
    quant = config.pop("quantization_config")
    assert config == original
    assert quant["quant_method"] == "bitsandbytes" and quant["load_in_4bit"] is True
    assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"] is True
    assert quant["bnb_4bit_compute_dtype"] == "bfloat16" and quant["bnb_4bit_quant_storage"] == "uint8"
    assert quant["llm_int8_skip_modules"] == ["lm_head", "model.embed_tokens"]
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (DEFAULT_MODEL / name).read_bytes()
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "generation_config.json",
                                                    "model.safetensors", "tokenizer_config.json"]
    assert not list(dst.parent.glob(".*partial"))
    assert summary.bits_per_param == pytest.approx(DQ_BITS, abs=1e-9)
    assert summary.bytes_before == (DEFAULT_MODEL / "model.safetensors").stat().st_size
    assert summary.bytes_after == (dst / "model.safetensors").stat().st_size
    assert summary.bytes_after < summary.bytes_before / 3


def test_sharded_source_gives_the_same_tensors_and_output_can_be_sharded(tmp_path, quantized):
    src = make_sharded_copy(DEFAULT_MODEL, tmp_path / "sharded", n_shards=3)
    dst = tmp_path / "out"
    summary = quantize_checkpoint(src, dst, progress=False, max_shard_bytes=600_000)
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert summary.shards == len(shards) >= 3
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((dst / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    reference = load_state_dict(quantized[0])
    sharded = load_state_dict(dst)
    assert sharded.keys() == reference.keys()
    for name in reference:
        assert torch.equal(sharded[name], reference[name]), name
    assert (dst / "tokenizer_config.json").exists() and not (dst / "model.safetensors").exists()


def test_skip_blocksize_and_no_double_quant(tmp_path, source):
    dst = tmp_path / "out"
    summary = quantize_checkpoint(DEFAULT_MODEL, dst, blocksize=128, double_quant=False,
                                  skip=["down_proj,layers.0.self_attn"], compute_dtype="float16", progress=False)
    loaded = load_quantized_state_dict(dst)
    skipped = {f"model.layers.{i}.mlp.down_proj" for i in range(N_LAYERS)}
    skipped |= {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for module in skipped:
        assert torch.equal(loaded[f"{module}.weight"], source[f"{module}.weight"])
    nf4 = [v for v in loaded.values() if isinstance(v, NF4Weight)]
    assert len(nf4) == 28 - len(skipped)
    assert all(w.blocksize == 128 and not w.double_quant and w.absmax.dtype == torch.float32 for w in nf4)
    assert summary.bits_per_param == pytest.approx(4 + 32 / 128)
    quant = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert quant["bnb_4bit_use_double_quant"] is False and quant["bnb_4bit_compute_dtype"] == "float16"
    assert set(quant["llm_int8_skip_modules"]) == skipped | {"lm_head", "model.embed_tokens"}


def test_skip_names_are_trimmed_and_a_single_string_is_one_name(tmp_path):
    src = small_model(tmp_path / "m")
    quantize_checkpoint(src, tmp_path / "a", skip=["up_proj, down_proj"], progress=False)
    assert not any(isinstance(v, NF4Weight) for v in load_quantized_state_dict(tmp_path / "a").values())
    quantize_checkpoint(src, tmp_path / "b", skip="layers.0.mlp.up_proj", progress=False)
    loaded = load_quantized_state_dict(tmp_path / "b")
    assert isinstance(loaded["model.layers.0.mlp.down_proj.weight"], NF4Weight)
    assert not isinstance(loaded["model.layers.0.mlp.up_proj.weight"], NF4Weight)


def test_other_files_are_copied_but_weight_files_are_not(tmp_path):
    src = small_model(tmp_path / "m")
    (src / "tokenizer.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    (src / ".cache").mkdir()
    (src / "original").mkdir()
    (src / "original" / "params.json").write_text("{}")
    (src / "original" / "consolidated.00.pth").write_bytes(b"pickle")
    quantize_checkpoint(src, tmp_path / "out", progress=False)
    copied = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert copied == ["config.json", "model.safetensors", "original", "original/params.json", "tokenizer.json"]


def test_single_safetensors_file_source(tmp_path):
    src = small_model(tmp_path / "m") / "model.safetensors"
    dst = tmp_path / "out"
    quantize_checkpoint(src, dst, progress=False)
    config = json.loads((dst / "config.json").read_text())
    assert list(config) == ["quantization_config"]
    loaded = load_quantized_state_dict(dst)
    assert isinstance(loaded["model.layers.0.mlp.up_proj.weight"], NF4Weight)


def test_reconstruction_error_of_gaussian_weights(tmp_path):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(512, 1024, generator=g) * 0.02).to(torch.bfloat16)
    src = small_model(tmp_path / "m", {"model.layers.0.mlp.up_proj.weight": w})
    quantize_checkpoint(src, tmp_path / "out", progress=False)
    q = load_quantized_state_dict(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"]
    error = torch.linalg.vector_norm(q.dequantize(torch.float32) - w.float()) / torch.linalg.vector_norm(w.float())
    assert 0.088 < float(error) < 0.0925  # bitsandbytes: 0.0920 (REFERENCE section 7)


def test_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """No input tensor and no quantised weight outlives the next read: memory stays near the largest tensor."""
    src = small_model(tmp_path / "m", {f"model.layers.{i}.mlp.gate_proj.weight": torch.randn(96, 64) for i in range(6)})
    alive_inputs, alive_outputs, worst = [], [], []
    real_read, real_quantize = qc.read_tensors, qc.quantize_nf4

    def tracking_read(*args, **kwargs):
        for name, tensor in real_read(*args, **kwargs):
            live = [r for r in alive_inputs + alive_outputs if r() is not None]
            worst.append(len(live))
            alive_inputs.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    def tracking_quantize(*args, **kwargs):
        weight = real_quantize(*args, **kwargs)
        alive_outputs.append(weakref.ref(weight.packed))
        return weight

    monkeypatch.setattr(qc, "read_tensors", tracking_read)
    monkeypatch.setattr(qc, "quantize_nf4", tracking_quantize)
    quantize_checkpoint(src, tmp_path / "out", progress=False)
    assert len(worst) == 11 and max(worst) == 0


# --- the CLI ----------------------------------------------------------------------------------

def test_cli_default_model_to_default_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--no-progress"]) == 0
    out = capsys.readouterr().out
    dst = tmp_path / "qlora-out" / "tiny-llama-nf4"
    assert str(dst) in out and "28 quantised" in out and "bits per parameter: 4.127" in out
    assert isinstance(load_quantized_state_dict(dst)["model.layers.0.mlp.up_proj.weight"], NF4Weight)


def test_cli_progress_bar_reports_tensors_and_bytes(tmp_path, capsys):
    src = small_model(tmp_path / "m")
    assert main(["quantize", str(src), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "5/5 tensors" in err and "100%" in err and "B/s" in err


def test_error_mid_way_leaves_no_dst(tmp_path, monkeypatch):
    src = small_model(tmp_path / "m")
    calls = []

    def failing_quantize(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return quantize_nf4(*args, **kwargs)

    monkeypatch.setattr(qc, "quantize_nf4", failing_quantize)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_checkpoint(src, out_parent / "dst", progress=False)
    assert list(out_parent.iterdir()) == []  # neither DST nor the temporary directory


def test_ctrl_c_leaves_no_dst_and_keeps_an_existing_one(tmp_path, monkeypatch, capsys):
    src = small_model(tmp_path / "m")
    dst = tmp_path / "outputs" / "dst"
    dst.mkdir(parents=True)
    (dst / "keep.txt").write_text("old")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qc, "quantize_nf4", interrupted)
    assert main(["quantize", str(src), str(dst), "--force", "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dst"]
    assert (dst / "keep.txt").read_text() == "old"


def test_force_replaces_an_existing_dst(tmp_path):
    src = small_model(tmp_path / "m")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("x")
    quantize_checkpoint(src, dst, force=True, progress=False)
    assert not (dst / "stale.txt").exists() and (dst / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "m"]


def test_force_never_replaces_a_plain_file_at_dst(tmp_path):
    src = small_model(tmp_path / "m")
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(CheckpointError, match="is a file"):
        quantize_checkpoint(src, notes, force=True, progress=False)
    assert notes.read_text() == "precious"


def test_allow_nonfinite(tmp_path):
    w = torch.randn(128, 64).to(torch.bfloat16)
    w[3, 5] = float("nan")
    src = small_model(tmp_path / "m", {"model.layers.0.mlp.up_proj.weight": w})
    quantize_checkpoint(src, tmp_path / "out", allow_nonfinite=True, progress=False)
    assert isinstance(load_quantized_state_dict(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"], NF4Weight)


def cli_error(capsys, *argv) -> str:
    code = main(["quantize", *map(str, argv), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("qlora quantize: error: ") and "\n" not in err, err
    return err


def test_bad_inputs_give_one_line_each(tmp_path, capsys):
    good = small_model(tmp_path / "good")

    assert "no such file" in cli_error(capsys, tmp_path / "missing", tmp_path / "o1")

    truncated = small_model(tmp_path / "trunc")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-1000])
    err = cli_error(capsys, truncated, tmp_path / "o2")
    assert "truncated" in err and "model.safetensors" in err and "tensor " in err

    corrupt = small_model(tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 3 + b"garbage" * 10)
    assert "not a safetensors file" in cli_error(capsys, corrupt, tmp_path / "o3")

    sharded = make_sharded_copy(DEFAULT_MODEL, tmp_path / "sharded")
    (sharded / "model-00002-of-00003.safetensors").unlink()
    err = cli_error(capsys, sharded, tmp_path / "o4")
    assert INDEX_FILE in err and "model-00002-of-00003.safetensors" in err and "does not exist" in err

    w = torch.randn(128, 64).to(torch.bfloat16)
    w[0, 0] = float("inf")
    nonfinite = small_model(tmp_path / "inf", {"model.layers.0.mlp.up_proj.weight": w})
    err = cli_error(capsys, nonfinite, tmp_path / "o5")
    assert "model.layers.0.mlp.up_proj.weight" in err and "NaN/Inf" in err and "--allow-nonfinite" in err

    float64 = small_model(tmp_path / "f64", {"model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, dtype=torch.float64)})
    err = cli_error(capsys, float64, tmp_path / "o6")
    assert "model.layers.0.mlp.up_proj.weight" in err and "torch.float64" in err and "[128, 64]" in err

    for blocksize in (100, 16, 8192):
        assert "blocksize" in cli_error(capsys, good, tmp_path / "o7", "--blocksize", blocksize)

    existing = tmp_path / "exists"
    existing.mkdir()
    err = cli_error(capsys, good, existing)
    assert "already exists" in err and "--force" in err

    assert "--skip ffn: matches no module" in cli_error(capsys, good, tmp_path / "o8", "--skip", "ffn")
    assert "lies inside the source" in cli_error(capsys, good, good / "inside")
    assert "contains the source" in cli_error(capsys, good / "model.safetensors", tmp_path, "--force")
    assert "--max-shard-size" in cli_error(capsys, good, tmp_path / "o9", "--max-shard-size", "lots")

    quantize_checkpoint(good, tmp_path / "already", progress=False)
    assert "already" in cli_error(capsys, tmp_path / "already", tmp_path / "o10")

    if not torch.cuda.is_available():
        assert "CUDA is not available" in cli_error(capsys, good, tmp_path / "o11", "--device", "cuda")

    # none of the failed runs left an output or a temporary directory behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["good", "trunc", "corrupt", "sharded", "inf", "f64", "exists", "already"])


def test_parse_size():
    assert qc.parse_size("5GB") == 5 * 10**9
    assert qc.parse_size("500MB") == 500 * 10**6
    assert qc.parse_size("2GiB") == 2 * 1024**3
    assert qc.parse_size("1234") == 1234


def test_module_matching_follows_module_boundaries():
    assert qc.module_matches("model.layers.1.mlp.down_proj", "layers.1")
    assert not qc.module_matches("model.layers.11.mlp.down_proj", "layers.1")
    assert qc.module_matches("model.layers.1.mlp.down_proj", "mlp.down_proj")
    assert not qc.module_matches("model.layers.1.mlp.down_proj", "proj")


MEMORY_PROBE = r"""
import resource, sys, torch
from qlora.nf4 import quantize_nf4
from qlora.convert import quantize_checkpoint
quantize_nf4(torch.randn(4096).bfloat16())  # first use builds the tables (imports scipy): not the checkpoint's cost
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
quantize_checkpoint(sys.argv[1], sys.argv[2], progress=False, max_shard_bytes=64 * 2**20)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_peak_memory_follows_the_largest_tensor_not_the_checkpoint(tmp_path):
    """20 tensors of 8 MB (160 MB): the process's peak resident memory may grow by about three
    times the largest tensor plus a constant, never by the checkpoint's size."""
    import subprocess
    import sys

    tensor_bytes = 8 * 2**20
    tensors = {f"model.layers.{i}.embed_like.weight": torch.full((tensor_bytes // 2,), float(i), dtype=torch.bfloat16)
               for i in range(20)}
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.randn(256, 256).to(torch.bfloat16)
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    del tensors
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "src"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    grew = int(result.stdout.split()[-1])
    assert grew < 3 * tensor_bytes + 32 * 2**20, f"peak resident memory grew by {grew / 2**20:.0f} MiB"
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 3
