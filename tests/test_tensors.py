"""skillbank.tensors: validated safetensors reads, one-pass writes, the weights digest, hf:// sources.

Files are made with `safetensors.torch` itself (or byte by byte where a test needs a broken one),
so the reader is checked against the reference implementation, not against our own writer.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import socket
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from skillbank.errors import CheckpointError
from skillbank.merge.engine import blocks
from skillbank.tensors import (
    CheckpointWriter,
    SafetensorsFile,
    TensorSpec,
    WeightsDigest,
    header_bytes,
    open_checkpoint,
)
from skillbank.tensors.dtypes import (
    ITEMSIZE,
    SAFETENSORS_TO_TORCH,
    TORCH_TO_SAFETENSORS,
    compute_dtype,
    is_float,
    to_torch,
)
from skillbank.tensors.sources import open_source, resolve_hf

# --------------------------------------------------------------------------- helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of a tensor's bit patterns, so NaN and -0.0 compare exactly."""
    t = t.reshape(-1).contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.is_floating_point():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.numel() == b.numel()
    assert torch.equal(_bits(a), _bits(b))


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor per dtype the tests care about, plus a scalar and empty tensors."""
    g = torch.Generator().manual_seed(seed)
    f32 = torch.randn(7, 13, generator=g)
    f32[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    i64 = torch.randint(-(2**62), 2**62, (5, 9), generator=g, dtype=torch.int64)
    i64[0, 0], i64[0, 1] = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    return {
        "bf16": torch.randn(11, 17, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(3, 5, 7, generator=g).to(torch.float16),
        "fp32": f32,
        "i64": i64,
        "mask": torch.rand(6, 10, generator=g) > 0.5,
        "scalar": torch.tensor(3.25, dtype=torch.float32),
        "scalar_i": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.zeros(0, dtype=torch.bfloat16),
        "empty2d": torch.zeros(4, 0, dtype=torch.float32),
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


def raw_safetensors(path: Path, header, data: bytes = b"", n: int | None = None) -> Path:
    """A file laid out as safetensors (8-byte length, header, data) with whatever is asked."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], metadata=None,
                     max_shard_size=None, chunk: int = 5) -> list[Path]:
    """Stream `tensors` through CheckpointWriter in small chunks, in name order."""
    w = CheckpointWriter(out, specs_of(tensors), metadata=metadata, max_shard_size=max_shard_size)
    for spec in sorted(specs_of(tensors), key=lambda s: s.name):
        flat = tensors[spec.name].reshape(-1)
        for _, first, count in blocks(spec, chunk):
            w.write(spec.name, flat[first:first + count])
    return w.commit()


def digest_of_checkpoint(path: Path) -> str:
    with open_checkpoint(path) as ck:
        specs = [TensorSpec(i.name, i.dtype, i.shape) for i in ck]
        d = WeightsDigest(specs)
        for spec in sorted(specs, key=lambda s: s.name):
            for _, first, count in blocks(spec, 7):
                d.update(ck.read(spec.name, first, count))
        return d.hexdigest()


def canonical_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The canonical single-file serialisation, built independently of skillbank's writer:
    names sorted, data packed in that order, no metadata, header padded with spaces to 8."""
    header, offset, data = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        data.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(data)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- dtypes


def test_dtype_tables_agree_with_torch():
    for name, dt in SAFETENSORS_TO_TORCH.items():
        assert to_torch(name) is dt
        assert TORCH_TO_SAFETENSORS[dt] == name
        assert ITEMSIZE[name] == torch.empty((), dtype=dt).element_size()
        assert is_float(name) == dt.is_floating_point
    assert ITEMSIZE["BF16"] == 2 and ITEMSIZE["F64"] == 8 and ITEMSIZE["BOOL"] == 1
    assert not is_float("I64") and not is_float("BOOL") and is_float("BF16")


def test_compute_dtype_is_one_step_wider():
    assert compute_dtype(torch.float32) == torch.float64
    assert compute_dtype(torch.float64) == torch.float64
    assert compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.bfloat16) == torch.float32


# --------------------------------------------------------------------------- reading


@pytest.fixture
def sample_file(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"note": "hello"})
    return path, tensors


def test_header_matches_saved_tensors(sample_file):
    path, tensors = sample_file
    f = SafetensorsFile(path)
    try:
        assert set(f.tensors) == set(tensors)
        assert f.metadata == {"note": "hello"}
        for name, t in tensors.items():
            info = f.tensors[name]
            assert info.dtype == TORCH_TO_SAFETENSORS[t.dtype]
            assert info.shape == tuple(t.shape)
            assert info.numel == t.numel()
            assert info.nbytes == t.numel() * t.element_size()
            assert info.path == str(path)
    finally:
        f.close()


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32", "i64", "mask"])
def test_read_ranges_equal_saved_values(sample_file, name):
    path, tensors = sample_file
    flat = tensors[name].reshape(-1)
    n = flat.numel()
    with open_checkpoint(path) as ck:
        assert_same_bits(ck.read(name), flat)  # whole tensor
        for first, count in [(0, 1), (0, n), (1, n - 1), (n - 1, 1), (n // 3, n // 2), (5, 0), (n, 0)]:
            got = ck.read(name, first, count)
            assert got.shape == (count,)
            assert_same_bits(got, flat[first:first + count])
        got = ck.read(name, n // 2)  # count defaults to "to the end"
        assert_same_bits(got, flat[n // 2:])


def test_chunked_reads_rebuild_every_tensor(sample_file):
    path, tensors = sample_file
    with open_checkpoint(path) as ck:
        assert ck.names == sorted(tensors)
        for info in ck:
            spec = TensorSpec(info.name, info.dtype, info.shape)
            parts = [ck.read(info.name, first, count) for _, first, count in blocks(spec, 4)]
            assert_same_bits(torch.cat(parts), tensors[info.name].reshape(-1))


def test_scalar_and_empty_tensors(sample_file):
    path, tensors = sample_file
    with open_checkpoint(path) as ck:
        s = ck.tensors["scalar"]
        assert s.shape == () and s.numel == 1 and s.nbytes == 4
        assert ck.read("scalar").tolist() == [3.25]
        assert ck.read("scalar_i").tolist() == [-7]
        for name, dt, shape in [("empty", torch.bfloat16, (0,)), ("empty2d", torch.float32, (4, 0))]:
            info = ck.tensors[name]
            assert info.shape == shape and info.numel == 0 and info.nbytes == 0
            got = ck.read(name)
            assert got.dtype == dt and got.numel() == 0


def test_read_result_is_an_independent_buffer(sample_file):
    path, tensors = sample_file
    with open_checkpoint(path) as ck:
        a = ck.read("fp32", 20, 10)
        a.zero_()
        assert_same_bits(ck.read("fp32", 20, 10), tensors["fp32"].reshape(-1)[20:30])


def test_mapped_reads_equal_copied_reads_and_stay_private(sample_file):
    """Store objects are read through copy-on-write maps: same values, and no write reaches the file."""
    path, tensors = sample_file
    before = Path(path).read_bytes()
    plain, mapped = SafetensorsFile(path), SafetensorsFile(path, mapped=True)
    try:
        for name, t in tensors.items():
            info = plain.tensors[name]
            n = info.numel
            for first, count in [(0, n), (1, max(n - 1, 0)), (n // 3, n // 2), (n, 0)]:
                assert_same_bits(mapped.read(mapped.tensors[name], first, count), plain.read(info, first, count))
        kept = mapped.read(mapped.tensors["fp32"], 20, 10)
        kept.zero_()
        mapped.close()  # a map outlives its file's descriptor
        assert float(kept.abs().sum()) == 0.0
        again = SafetensorsFile(path, mapped=True)
        assert_same_bits(again.read(again.tensors["fp32"], 20, 10), tensors["fp32"].reshape(-1)[20:30])
        again.close()
    finally:
        plain.close()
        mapped.close()
    assert Path(path).read_bytes() == before


# --------------------------------------------------------------------------- validation


def _f32(n: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}


BAD_FILES = {
    # name: (header or raw bytes, data, forced length, expected message fragment)
    "truncated-below-8-bytes": (None, b"", None, "shorter than its 8-byte header length"),
    "header-longer-than-file": ({"a": _f32(1)}, b"\0" * 4, 4096, "runs past the end"),
    "huge-header": ({}, b"", 2**40, "larger than the"),
    "huge-header-u64-max": ({}, b"", 2**64 - 1, "larger than the"),
    "non-json": (b"this is not json", b"", None, "not JSON"),
    "non-utf8": (b"\xff\xfe\xfd\xfc{}  ", b"", None, "not JSON"),
    "json-not-object": ([1, 2, 3], b"", None, "not a JSON object"),
    "offsets-past-data": ({"a": _f32(4)}, b"\0" * 8, None, "fall outside"),
    "offsets-reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 8, None,
                         "fall outside"),
    "offsets-negative": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 8, None,
                         "fall outside"),
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    "overlap-one-byte": ({"b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
                          "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 3, None, "overlap"),
    "same-span": ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
                   "b": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]}}, b"\0" * 8, None, "overlap"),
    "size-mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12, None,
                      "needs 12"),
    "size-mismatch-dtype": ({"a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 16]}},
                            b"\0" * 16, None, "needs 8"),
    "unknown-dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16, None,
                      "unsupported dtype"),
    "bad-shape": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", None, "bad shape"),
    "bad-offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, None,
                    "bad data_offsets"),
    "bad-metadata": ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_invalid_headers_raise_one_line_checkpoint_error(tmp_path, case):
    header, data, n, fragment = BAD_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    if header is None:
        path.write_bytes(b"\x10\x00\x00")
    else:
        raw_safetensors(path, header, data, n)
    before = open_fds()
    for opener in (open_checkpoint, SafetensorsFile):
        with pytest.raises(CheckpointError) as ei:
            opener(path)
        msg = str(ei.value)
        assert "\n" not in msg
        assert str(path) in msg
        assert fragment in msg
    assert open_fds() == before  # the descriptor is closed when the header is refused


def test_a_refused_file_never_closes_a_descriptor_it_no_longer_owns(tmp_path):
    # Regression: a SafetensorsFile whose header was refused closed its descriptor but kept the
    # number, and its __del__ closed that number again later, by then someone else's file.
    bad = raw_safetensors(tmp_path / "bad.safetensors", {"a": _f32(4)}, b"")
    probe = os.open(os.devnull, os.O_RDONLY)  # the lowest free descriptor number
    os.close(probe)
    err = None
    try:
        SafetensorsFile(bad)
    except CheckpointError as e:
        err = e  # its traceback keeps the half-built object alive
    assert err is not None
    fd = os.open(tmp_path / "innocent", os.O_CREAT | os.O_RDWR)
    try:
        assert fd == probe  # the number the refused file had
        del err
        gc.collect()
        os.fstat(fd)  # still open: nobody closed it behind our back
    finally:
        os.close(fd)


def test_truncated_real_file_is_refused(sample_file, tmp_path):
    path, _ = sample_file
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-3])
    with pytest.raises(CheckpointError, match="fall outside") as ei:
        open_checkpoint(cut)
    assert str(cut) in str(ei.value) and "\n" not in str(ei.value)


def test_trailing_bytes_after_data_are_tolerated(sample_file, tmp_path):
    # Not an error: every tensor still lies inside the file and nothing overlaps.
    path, tensors = sample_file
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(path.read_bytes() + b"\0" * 16)
    with open_checkpoint(longer) as ck:
        assert_same_bits(ck.read("bf16"), tensors["bf16"].reshape(-1))


def test_missing_paths_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path)  # an empty directory
    with pytest.raises(CheckpointError, match="is a directory"):
        SafetensorsFile(tmp_path)


# --------------------------------------------------------------------------- pickles


class _Trap:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".PT", ".pkl"])
def test_pickle_suffixes_are_refused_without_unpickling(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(pickle.dumps(_Trap(marker)))
    for opener in (open_checkpoint, SafetensorsFile, open_source):
        with pytest.raises(CheckpointError, match="refusing") as ei:
            opener(str(path) if opener is open_source else path)
        assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    assert not marker.exists()


def test_pickle_suffix_is_refused_even_when_the_bytes_are_safetensors(sample_file, tmp_path):
    path, _ = sample_file
    disguised = tmp_path / "model.bin"
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="safetensors only"):
        open_checkpoint(disguised)


def test_directory_with_only_pytorch_model_bin_is_refused(tmp_path):
    d = tmp_path / "pretrained_model"
    d.mkdir()
    marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(d)
    msg = str(ei.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and str(d) in msg and "\n" not in msg
    assert not marker.exists()


# --------------------------------------------------------------------------- directories


def _hf_sharded(d: Path, tensors: dict[str, torch.Tensor], groups: list[list[str]]) -> dict[str, str]:
    """An HF-style sharded directory made with safetensors itself; returns the weight map."""
    d.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(d / shard), metadata={f"shard{i}": "yes"})
        weight_map.update({n: shard for n in names})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return weight_map


def test_sharded_directory_via_index(tmp_path):
    tensors = sample_tensors(1)
    names = sorted(tensors)
    d = tmp_path / "sharded"
    _hf_sharded(d, tensors, [names[:3], names[3:6], names[6:]])
    with open_checkpoint(d) as ck:
        assert len(ck.files) == 3
        assert ck.names == names
        assert ck.config is None
        assert ck.metadata == {"shard0": "yes", "shard1": "yes", "shard2": "yes"}
        for n in names:
            assert_same_bits(ck.read(n), tensors[n].reshape(-1))
        assert ck.source == str(d)


def test_sharded_directory_refuses_a_tensor_in_two_shards(tmp_path):
    tensors = sample_tensors(2)
    d = tmp_path / "dup"
    d.mkdir()
    save_file({"fp32": tensors["fp32"]}, str(d / "a.safetensors"))
    save_file({"fp32": tensors["fp32"], "i64": tensors["i64"]}, str(d / "b.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"fp32": "a.safetensors", "i64": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match="more than one shard"):
        open_checkpoint(d)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS"])
def test_index_pointing_outside_the_directory_is_refused(tmp_path, shard):
    tensors = {"w": torch.ones(3)}
    outside = tmp_path / "outside.safetensors"
    save_file(tensors, str(outside))  # it exists: the refusal is about where, not about a missing file
    d = tmp_path / "model"
    d.mkdir()
    if shard == "ABS":
        shard = str(outside)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match="points outside") as ei:
        open_checkpoint(d)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("index", ["not json", '{"no_weight_map": 1}', '{"weight_map": [1]}',
                                   '{"weight_map": {"w": 5}}'])
def test_malformed_index_is_a_checkpoint_error(tmp_path, index):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        open_checkpoint(d)


def test_index_naming_a_missing_shard_is_a_checkpoint_error(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    before = open_fds()
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(d)
    assert open_fds() == before  # the shard opened before the failure is closed again


def test_index_naming_a_directory_as_shard_is_a_checkpoint_error(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "sub"}}))
    with pytest.raises(CheckpointError, match="is a directory") as ei:
        open_checkpoint(d)
    assert "\n" not in str(ei.value)


def test_lerobot_directory_exposes_config(tmp_path):
    tensors = sample_tensors(3)
    d = tmp_path / "pretrained_model"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"type": "smolvla"}))
    with open_checkpoint(d) as ck:
        assert ck.config == d / "config.json"
        assert json.loads(ck.config.read_text()) == {"type": "smolvla"}
        assert ck.names == sorted(tensors)
        assert_same_bits(ck.read("bf16"), tensors["bf16"].reshape(-1))
    (d / "config.json").unlink()
    with open_checkpoint(d) as ck:
        assert ck.config is None
    with open_checkpoint(d / "model.safetensors") as ck:
        assert ck.config is None


# --------------------------------------------------------------------------- writing


def test_writer_single_file_round_trips_through_safetensors(tmp_path):
    tensors = sample_tensors(4)
    out = tmp_path / "out"
    paths = write_checkpoint(out, tensors, metadata={"skillbank.version": "v3", "a": "b"})
    assert paths == [out / "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # no index, no leftovers
    loaded = load_file(str(paths[0]))
    assert set(loaded) == set(tensors)
    for n, t in tensors.items():
        assert loaded[n].shape == t.shape
        assert_same_bits(loaded[n], t)
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "skillbank.version": "v3", "a": "b"}


def test_writer_sharded_round_trips_with_a_correct_index(tmp_path):
    tensors = {f"layer{i}.w": torch.randn(10, 10).to(torch.bfloat16) for i in range(5)}  # 200 B each
    tensors["step"] = torch.tensor(12, dtype=torch.int64)
    tensors["mask"] = torch.ones(3, dtype=torch.bool)
    out = tmp_path / "out"
    paths = write_checkpoint(out, tensors, metadata={"k": "v"}, max_shard_size=450)
    n = len(paths)
    assert n >= 3
    assert [p.name for p in paths] == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["k"] == "v"
    weight_map = index["weight_map"]
    assert set(weight_map) == set(tensors)
    seen = {}
    for p in paths:
        loaded = load_file(str(p))
        assert sum(t.numel() * t.element_size() for t in loaded.values()) <= 450
        for name, t in loaded.items():
            assert weight_map[name] == p.name
            assert name not in seen
            seen[name] = t
        with safe_open(str(p), "pt") as f:
            assert f.metadata() == {"format": "pt", "k": "v"}
    assert set(seen) == set(tensors)
    for name, t in tensors.items():
        assert_same_bits(seen[name], t)
    with open_checkpoint(out) as ck:  # and our own reader takes the directory as it is
        assert ck.names == sorted(tensors)
        for name, t in tensors.items():
            assert_same_bits(ck.read(name), t.reshape(-1))


def test_writer_without_shard_limit_writes_one_file_even_for_many_tensors(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(20)}
    paths = write_checkpoint(tmp_path / "o", tensors)
    assert [p.name for p in paths] == ["model.safetensors"]
    assert load_file(str(paths[0]))["t7"].tolist() == [7.0] * 4


def test_writer_refuses_out_of_order_and_incomplete_writes_and_abort_cleans_up(tmp_path):
    specs = [TensorSpec("a", "F32", (4,)), TensorSpec("b", "F32", (2,))]
    out = tmp_path / "out"
    w = CheckpointWriter(out, specs)
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        w.write("b", torch.ones(2))
    w.write("a", torch.ones(2))
    with pytest.raises(RuntimeError, match="too many bytes"):
        w.write("a", torch.ones(3))
    with pytest.raises(RuntimeError, match="not fully written"):
        w.commit()
    w.abort()
    assert list(out.iterdir()) == []


def test_header_bytes_are_padded_and_parseable():
    specs = [TensorSpec("b", "BF16", (3,)), TensorSpec("a", "F32", ())]
    raw = header_bytes(specs, {"z": "1", "a": "2"})
    (n,) = struct.unpack("<Q", raw[:8])
    assert n == len(raw) - 8 and n % 8 == 0
    header = json.loads(raw[8:])
    assert list(header) == ["b", "a", "__metadata__"]  # the given order; metadata last, sorted
    assert header["b"]["data_offsets"] == [0, 6] and header["a"]["data_offsets"] == [6, 10]
    assert list(header["__metadata__"]) == ["a", "z"]
    # Every header length, whatever the names, is padded to a multiple of 8.
    residues = set()
    for k in range(1, 17):
        raw = header_bytes([TensorSpec("x" * k, "F32", (2,))])
        (n,) = struct.unpack("<Q", raw[:8])
        residues.add(len(json.dumps({"x" * k: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                    separators=(",", ":"))) % 8)
        assert n == len(raw) - 8 and n % 8 == 0
        assert raw[8:].rstrip(b" ") == raw[8:].rstrip()  # padding is spaces
        assert json.loads(raw[8:])["x" * k]["data_offsets"] == [0, 8]
    assert residues == set(range(8))  # the unpadded lengths really took every residue


# --------------------------------------------------------------------------- digest


def test_digest_is_xxh3_128_of_the_canonical_serialisation():
    tensors = sample_tensors(5)
    d = WeightsDigest(specs_of(tensors))
    for name in sorted(tensors):
        d.update(tensors[name])
    expected = xxhash.xxh3_128_hexdigest(canonical_bytes(tensors))
    assert d.hexdigest() == expected
    assert len(expected) == 32
    # The canonical bytes are a real safetensors file holding the same tensors.
    from safetensors.torch import load

    loaded = load(canonical_bytes(tensors))
    for name, t in tensors.items():
        assert_same_bits(loaded[name], t)


def test_digest_matches_safetensors_own_serialisation_for_one_dtype():
    # With one dtype safetensors lays tensors out in name order too, so its bytes are canonical.
    g = torch.Generator().manual_seed(6)
    tensors = {"z.w": torch.randn(5, 3, generator=g), "a.b": torch.randn(7, generator=g),
               "m": torch.randn(2, 2, 2, generator=g)}
    d = WeightsDigest(specs_of(tensors))
    for name in sorted(tensors):
        d.update(tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes work too
    assert d.hexdigest() == xxhash.xxh3_128_hexdigest(save(tensors))


def test_digest_ignores_sharding_and_metadata_but_not_values(tmp_path):
    tensors = {f"layer{i}.w": torch.randn(8, 8).to(torch.bfloat16) for i in range(4)}
    tensors["bias"] = torch.randn(8)
    tensors["count"] = torch.tensor([3], dtype=torch.int64)
    plain = tmp_path / "plain"
    stamped = tmp_path / "stamped"
    sharded = tmp_path / "sharded"
    write_checkpoint(plain, tensors)
    write_checkpoint(stamped, tensors, metadata={"skillbank.version": "v9", "skillbank.skills": "x,y"})
    write_checkpoint(sharded, tensors, metadata={"other": "meta"}, max_shard_size=200)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    # The files really differ ...
    assert (plain / "model.safetensors").read_bytes() != (stamped / "model.safetensors").read_bytes()
    # ... but the weights digest does not.
    expected = xxhash.xxh3_128_hexdigest(canonical_bytes(tensors))
    assert digest_of_checkpoint(plain) == expected
    assert digest_of_checkpoint(stamped) == expected
    assert digest_of_checkpoint(sharded) == expected
    # A metadata-stamped file's own hash is not the weights digest.
    assert xxhash.xxh3_128_hexdigest((stamped / "model.safetensors").read_bytes()) != expected

    changed = dict(tensors)
    changed["bias"] = tensors["bias"].clone()
    changed["bias"][3] = torch.nextafter(changed["bias"][3], torch.tensor(float("inf")))
    write_checkpoint(tmp_path / "changed", changed)
    assert digest_of_checkpoint(tmp_path / "changed") != expected

    renamed = {("bias2" if k == "bias" else k): v for k, v in tensors.items()}
    write_checkpoint(tmp_path / "renamed", renamed)
    assert digest_of_checkpoint(tmp_path / "renamed") != expected


# --------------------------------------------------------------------------- hf://

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """A Hugging Face cache under tmp_path, offline mode on, and every socket connect refused."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    import huggingface_hub.constants as constants

    # huggingface_hub reads its environment once, at import: set what it has already read too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(home))

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is not allowed in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield cache
    assert attempts == [], "a test tried to reach the network"


def _cache_repo(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT,
                refs: tuple[str, ...] = ("main",)) -> Path:
    """The hub cache layout: blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/<ref>."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for rel, data in files.items():
        blob = root / "blobs" / xxhash.xxh3_128_hexdigest(data)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.mark.parametrize("rev", ["", "@main", f"@{COMMIT}"])
def test_hf_uri_resolves_from_the_offline_cache_and_is_pinned(hf_offline, rev):
    tensors = sample_tensors(7)
    snap = _cache_repo(hf_offline, "lerobot/smolvla_base",
                       {"model.safetensors": save(tensors), "config.json": b'{"type": "smolvla"}'})
    local, source = resolve_hf(f"hf://lerobot/smolvla_base{rev}")
    assert source == f"hf://lerobot/smolvla_base@{COMMIT}"
    assert Path(local).resolve() == snap.resolve()
    with open_source(f"hf://lerobot/smolvla_base{rev}") as ck:
        assert ck.source == f"hf://lerobot/smolvla_base@{COMMIT}"
        assert ck.config is not None and json.loads(ck.config.read_text()) == {"type": "smolvla"}
        assert ck.names == sorted(tensors)
        for n, t in tensors.items():
            assert_same_bits(ck.read(n), t.reshape(-1))


def test_hf_sharded_repo_in_the_cache_opens_through_its_symlinks(hf_offline):
    # Regression: the hub cache links snapshot files to ../../blobs/, outside the snapshot
    # directory; the index's "inside the directory" check must not follow those links.
    tensors = sample_tensors(8)
    names = sorted(tensors)
    files, weight_map = {}, {}
    for i, part in enumerate([names[:4], names[4:]]):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        files[shard] = save({n: tensors[n] for n in part})
        weight_map.update({n: shard for n in part})
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    snap = _cache_repo(hf_offline, "org/sharded", files)
    assert (snap / "model-00001-of-00002.safetensors").is_symlink()
    with open_source("hf://org/sharded") as ck:
        assert ck.source == f"hf://org/sharded@{COMMIT}"
        assert len(ck.files) == 2
        for n, t in tensors.items():
            assert_same_bits(ck.read(n), t.reshape(-1))


def test_hf_uncached_repo_offline_is_a_checkpoint_error(hf_offline):
    _cache_repo(hf_offline, "org/present", {"model.safetensors": save({"w": torch.ones(2)})})
    for uri in ["hf://org/absent", "hf://org/absent@main", f"hf://org/absent@{COMMIT}",
                "hf://org/present@no-such-branch", f"hf://org/present@{'f' * 40}"]:
        with pytest.raises(CheckpointError) as ei:
            open_source(uri)
        msg = str(ei.value)
        assert msg.startswith(f"{uri}: ") and "\n" not in msg


@pytest.mark.parametrize("uri", ["hf://", "hf://org/name/extra", "hf://org/na me", "hf://org/name@"])
def test_malformed_hf_uri_is_a_checkpoint_error(hf_offline, uri):
    with pytest.raises(CheckpointError, match="expected hf://ORG/NAME"):
        open_source(uri)


def test_local_paths_go_through_open_checkpoint(sample_file):
    path, tensors = sample_file
    with open_source(str(path)) as ck:
        assert ck.source == str(path)
        assert ck.names == sorted(tensors)
