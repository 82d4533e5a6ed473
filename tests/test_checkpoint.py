"""Checkpoint I/O: the streaming shard writer, reading helpers, load_quantized_state_dict, errors."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora.checkpoint import (
    INDEX_FILE, CheckpointError, ShardWriter, load_quantized_state_dict, load_state_dict, read_safetensors_header,
    read_tensors, replacing, tensor_headers,
)
from qlora.nf4 import NF4Weight, quantize_nf4


def mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "b.u8": torch.randint(0, 255, (41,), generator=g, dtype=torch.uint8),
        "c.f32": torch.randn(7, 3, 5, generator=g),
        "d.f16": torch.randn(9, generator=g).to(torch.float16),
        "e.i64": torch.arange(5, dtype=torch.int64),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(3.5),
    }


def write(out_dir, groups, max_shard_bytes=1 << 30):
    writer = ShardWriter(out_dir, max_shard_bytes)
    for group in groups:
        writer.add(group)
    return writer.close()


def test_shard_writer_single_file_round_trips_every_dtype(tmp_path):
    tensors = mixed_tensors()
    weight_map = write(tmp_path, [{k: v} for k, v in tensors.items()])
    assert set(weight_map.values()) == {"model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no index, no scratch left
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it


def test_shard_writer_keeps_tensors_aligned(tmp_path):
    write(tmp_path, [{k: v} for k, v in mixed_tensors().items()])
    with open(tmp_path / "model.safetensors", "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    assert header_len % 8 == 0
    header.pop("__metadata__")
    item_sizes = {"F32": 4, "I64": 8, "BF16": 2, "F16": 2, "U8": 1, "BOOL": 1}
    for name, entry in header.items():
        assert entry["data_offsets"][0] % item_sizes[entry["dtype"]] == 0, name


def test_shard_writer_splits_into_shards_with_index_and_keeps_groups_together(tmp_path):
    g = torch.Generator().manual_seed(1)
    groups = [{f"m{i}.weight": torch.randn(40, 10, generator=g), f"m{i}.bias": torch.randn(40, generator=g)}
              for i in range(6)]
    group_bytes = 40 * 10 * 4 + 40 * 4
    weight_map = write(tmp_path, groups, max_shard_bytes=2 * group_bytes + 10)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == weight_map
    assert index["metadata"]["total_size"] == 6 * group_bytes
    for i in range(6):
        assert weight_map[f"m{i}.weight"] == weight_map[f"m{i}.bias"]
    loaded = load_state_dict(tmp_path)
    for group in groups:
        for name, tensor in group.items():
            assert torch.equal(loaded[name], tensor)


def test_shard_writer_refuses_duplicate_names(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add({"x": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="x written twice"):
        writer.add({"x": torch.zeros(2)})
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_read_tensors_streams_in_requested_order(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "x.safetensors")
    headers = tensor_headers(tmp_path / "x.safetensors")
    assert {n: (h.dtype, h.shape) for n, h in headers.items()} == {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    order = ["d.f16", "a.bf16", "g.scalar"]
    got = list(read_tensors(headers, order))
    assert [n for n, _ in got] == order
    for name, tensor in got:
        assert torch.equal(tensor, tensors[name])


def nf4_state(seed=0, shape=(64, 96), double_quant=True):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
    return w, quantize_nf4(w, 64, double_quant)


def assert_same_nf4(a: NF4Weight, b: NF4Weight):
    assert a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
    assert torch.equal(a.dequantize(), b.dequantize())


def test_load_quantized_state_dict_groups_nf4_keys_and_keeps_the_rest(tmp_path):
    _, q = nf4_state(0)
    _, q_nodq = nf4_state(1, (33, 70), double_quant=False)
    bias = torch.randn(64)
    norm = torch.ones(96, dtype=torch.bfloat16)
    state = {**q.state_dict("layers.0.proj"), **q_nodq.state_dict("layers.1.proj"),
             "layers.0.proj.bias": bias, "norm.weight": norm}
    save_file(state, tmp_path / "q.safetensors")
    loaded = load_quantized_state_dict(tmp_path / "q.safetensors")
    assert set(loaded) == {"layers.0.proj.weight", "layers.1.proj.weight", "layers.0.proj.bias", "norm.weight"}
    assert_same_nf4(loaded["layers.0.proj.weight"], q)
    assert_same_nf4(loaded["layers.1.proj.weight"], q_nodq)
    assert not loaded["layers.1.proj.weight"].double_quant
    assert torch.equal(loaded["layers.0.proj.bias"], bias) and torch.equal(loaded["norm.weight"], norm)


def test_load_quantized_state_dict_reads_shards_even_with_a_weight_split_across_them(tmp_path):
    _, q = nf4_state(2)
    parts = q.state_dict("lin")
    names = sorted(parts)
    first, second = {n: parts[n] for n in names[:3]}, {n: parts[n] for n in names[3:]}
    second["head.weight"] = torch.randn(5, 4)
    save_file(first, tmp_path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, tmp_path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {**{n: "model-00001-of-00002.safetensors" for n in first},
                  **{n: "model-00002-of-00002.safetensors" for n in second}}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_quantized_state_dict(tmp_path)
    assert set(loaded) == {"lin.weight", "head.weight"}
    assert_same_nf4(loaded["lin.weight"], q)


# --- errors: one line naming the file and the tensor ----------------------------------------

def checkpoint_error(load, path) -> str:
    """The message of the CheckpointError that load(path) raises, which must be one line."""
    with pytest.raises(CheckpointError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def write_index(directory, weight_map) -> None:
    (directory / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))


def test_missing_path(tmp_path):
    message = checkpoint_error(load_quantized_state_dict, tmp_path / "nope")
    assert "nope" in message and "no such file" in message


def test_directory_without_weights_names_the_pickle_it_will_not_load(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_pickles)
    message = checkpoint_error(load_quantized_state_dict, tmp_path)
    assert "pytorch_model.bin" in message and "pickled" in message
    with pytest.raises(CheckpointError, match="pickled checkpoints are not loaded"):
        load_quantized_state_dict(tmp_path / "pytorch_model.bin")


def test_truncated_file_names_file_and_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(10), "b": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    message = checkpoint_error(load_quantized_state_dict, tmp_path)
    assert str(path) in message and "truncated" in message and "tensor b" in message


def test_file_cut_inside_the_header(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(10)}, path)
    path.write_bytes(path.read_bytes()[:20])
    message = checkpoint_error(read_safetensors_header, path)
    assert str(path) in message and "truncated" in message


@pytest.mark.parametrize("content", [b"", b"abc", b"this is not a checkpoint at all, just text"])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    message = checkpoint_error(load_state_dict, path)
    assert str(path) in message and "not a safetensors file" in message


def test_corrupt_header_json(tmp_path):
    path = tmp_path / "x.safetensors"
    blob = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # unterminated
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(8))
    message = checkpoint_error(load_state_dict, path)
    assert str(path) in message and "corrupt safetensors header" in message


def test_header_offsets_that_do_not_match_the_shape(tmp_path):
    path = tmp_path / "x.safetensors"
    blob = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(64))
    message = checkpoint_error(load_state_dict, path)
    assert "tensor w" in message and "[4, 4]" in message and "64 bytes" in message


def test_unknown_dtype(tmp_path):
    path = tmp_path / "x.safetensors"
    blob = json.dumps({"w": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4))
    message = checkpoint_error(load_state_dict, path)
    assert "tensor w" in message and "Q4_K" in message


def test_index_naming_a_missing_shard(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    write_index(tmp_path, weight_map)
    message = checkpoint_error(load_quantized_state_dict, tmp_path)
    assert INDEX_FILE in message and "tensor b" in message and "model-00002-of-00002.safetensors" in message


def test_index_listing_a_tensor_its_shard_lacks(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    weight_map = {"a": "model-00001-of-00001.safetensors", "ghost": "model-00001-of-00001.safetensors"}
    write_index(tmp_path, weight_map)
    message = checkpoint_error(load_state_dict, tmp_path)
    assert "tensor ghost" in message and "not found" in message


def test_corrupt_index(tmp_path):
    (tmp_path / INDEX_FILE).write_text("{not json")
    message = checkpoint_error(load_state_dict, tmp_path)
    assert INDEX_FILE in message and "corrupt index" in message


def test_nf4_parts_that_do_not_fit_name_the_tensor(tmp_path):
    _, q = nf4_state(3)
    state = q.state_dict("blk.lin")
    state["blk.lin.weight.absmax"] = state["blk.lin.weight.absmax"][:-1].clone()
    save_file(state, tmp_path / "q.safetensors")
    message = checkpoint_error(load_quantized_state_dict, tmp_path / "q.safetensors")
    assert "q.safetensors" in message and "blk.lin.weight.absmax" in message


def test_unknown_quant_types_are_refused_by_name(tmp_path):
    state = {"lin.weight": torch.zeros(8, 1, dtype=torch.uint8),
             "lin.weight.quant_state.bitsandbytes__af4": torch.zeros(4, dtype=torch.uint8)}
    save_file(state, tmp_path / "q.safetensors")
    message = checkpoint_error(load_quantized_state_dict, tmp_path / "q.safetensors")
    assert "lin.weight.quant_state.bitsandbytes__af4" in message and "'af4'" in message


def test_replacing_writes_whole_files_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(target) as partial:
            partial.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with replacing(target) as partial:
        partial.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block completes
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
