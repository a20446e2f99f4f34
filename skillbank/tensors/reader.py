"""Read safetensors checkpoints a range at a time, trusting nothing in the header.

The header is validated before any tensor is touched (offsets inside the file, sizes that match
dtype and shape, no overlaps), so a hostile or truncated file fails with one clear line instead of
reading garbage. Data is read with positioned reads into chunk-sized buffers: memory stays bounded
by the chunk, never by the tensor or the model.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from skillbank.errors import CheckpointError, show
from skillbank.tensors.dtypes import ITEMSIZE, SAFETENSORS_TO_TORCH

MAX_HEADER_BYTES = 100 * 2**20
MAX_CONFIG_BYTES = 16 * 2**20
MAX_DIM = 2**63 - 1  # what torch (int64 sizes) can hold
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".h5")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {show(dup)} appears twice")
    return dict(pairs)


def strict_json(raw: bytes):
    """JSON from a file we do not trust: a duplicate key is a lie (which one counts?), and nesting
    or numbers too deep for the parser (RecursionError, int-digit limit) are errors, not crashes."""
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def unsafe_name(name: str) -> bool:
    """No model needs such a tensor name, and a tool that saves one file per tensor would turn it
    into a path outside its directory (or a second line in a log or a model card)."""
    parts = name.replace("\\", "/").split("/")
    return not name or name.startswith("/") or ".." in parts or any(ord(c) < 32 or ord(c) == 127 for c in name)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in its file
    end: int
    path: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"refusing {path}: skillbank reads safetensors only and never unpickles a checkpoint"
        )


class SafetensorsFile:
    """One .safetensors file: its validated header and positioned reads of its tensors."""

    def __init__(self, path: str | os.PathLike, mapped: bool = False):
        self.path = Path(path)
        self.mapped = mapped
        refuse_pickle(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path}: is a directory, expected a .safetensors file") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            if stat.S_ISDIR(os.fstat(self._fd).st_mode):  # O_RDONLY opens a directory on Linux
                raise CheckpointError(f"{self.path}: is a directory, expected a .safetensors file")
            self.metadata, self.tensors = self._parse()
        except BaseException:
            os.close(self._fd)
            self._fd = -1  # or __del__ would close the number again, by then maybe another file's
            raise

    def _fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file ({why})")

    def _parse(self) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._fail("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise self._fail(f"header of {n} bytes is larger than the {MAX_HEADER_BYTES} allowed")
        if 8 + n > size:
            raise self._fail(f"header length {n} runs past the end of the {size}-byte file (truncated?)")
        raw = os.pread(self._fd, n, 8)
        try:
            header = strict_json(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys, depth
            raise self._fail(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._fail("__metadata__ must map strings to strings")
        data_start = 8 + n
        data_len = size - data_start
        infos: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            infos[name] = info = self._entry(name, entry, data_start, data_len)
            if info.nbytes:
                spans.append((info.start, info.end, name))
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise self._fail(f"tensors {show(a)} and {show(b)} overlap")
        return meta, infos

    def _entry(self, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
        if unsafe_name(name):
            raise self._fail(f"tensor name {show(name)} is empty, absolute, has a '..' part or a control "
                             "character: a tool that writes tensors to files would write outside its directory")
        if not isinstance(entry, dict):
            raise self._fail(f"entry {show(name)} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_TO_TORCH:
            raise self._fail(f"tensor {show(name)} has unsupported dtype {show(dtype)}")
        if (not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
                or math.prod(d for d in shape if d) > MAX_DIM):  # an empty tensor may not lie either
            raise self._fail(f"tensor {show(name)} has a bad shape {show(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise self._fail(f"tensor {show(name)} has bad data_offsets {show(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise self._fail(f"tensor {show(name)} offsets {show(offsets)} fall outside the {data_len} data bytes")
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise self._fail(
                f"tensor {show(name)} holds {end - begin} bytes but {dtype}{shape} needs {expected}"
            )
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end, str(self.path))

    def read(self, info: TensorInfo, first: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [first, first+count) of a tensor, flattened, in a fresh buffer.

        A `mapped` file (a store object: immutable, checked at open to hold every tensor) hands
        out a private copy-on-write map of the page cache instead: no copy, and writes to the
        tensor stay in the process. A file that may change under us is read with preadv, so
        that a truncation is an error, not a SIGBUS.
        """
        if count is None:
            count = info.numel - first
        nbytes = count * info.itemsize
        if self.mapped and nbytes:
            start = info.start + first * info.itemsize
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            window = mmap.mmap(self._fd, start + nbytes - aligned, offset=aligned, access=mmap.ACCESS_COPY)
            return torch.frombuffer(window, dtype=SAFETENSORS_TO_TORCH[info.dtype], count=count,
                                    offset=start - aligned)
        buf = bytearray(nbytes)
        view = memoryview(buf)
        pos, got = info.start + first * info.itemsize, 0
        while got < nbytes:
            n = os.preadv(self._fd, [view[got:]], pos + got)
            if n == 0:
                raise CheckpointError(f"{self.path}: file ended early while reading {info.name!r}")
            got += n
        if nbytes == 0:
            return torch.empty(0, dtype=SAFETENSORS_TO_TORCH[info.dtype])
        return torch.frombuffer(buf, dtype=SAFETENSORS_TO_TORCH[info.dtype])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class Checkpoint:
    """A set of tensors spread over one or more safetensors files, addressed by name."""

    def __init__(self, files: list[SafetensorsFile], source: str, config: Path | None = None):
        self.files = files
        self.source = source
        self.config = config
        self._file_of: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in f.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{source}: tensor {name!r} appears in more than one shard")
                self.tensors[name] = info
                self._file_of[name] = f

    @property
    def names(self) -> list[str]:
        return sorted(self.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for f in self.files:
            merged.update(f.metadata)
        return merged

    def read(self, name: str, first: int = 0, count: int | None = None) -> torch.Tensor:
        return self._file_of[name].read(self.tensors[name], first, count)

    def config_bytes(self) -> bytes | None:
        """config.json, checked: a regular file of at most MAX_CONFIG_BYTES holding a JSON object
        (it is kept in the bank and written back on every checkout, so it must be text)."""
        if self.config is None:
            return None
        try:
            if not self.config.is_file():
                raise OSError("not a regular file")
            with open(self.config, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
            if len(raw) > MAX_CONFIG_BYTES:
                raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
            if not isinstance(strict_json(raw), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.config}: not a usable config.json ({e})") from None
        return raw

    def __iter__(self) -> Iterator[TensorInfo]:
        return (self.tensors[n] for n in self.names)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sharded(directory: Path, index_path: Path) -> list[Path]:
    try:
        index = strict_json(index_path.read_bytes())
        weight_map = index["weight_map"]
        shard_names = sorted(set(weight_map.values()))
        if not all(isinstance(s, str) for s in shard_names):
            raise TypeError("weight_map values must be file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
    base = directory.resolve()
    paths = []
    for shard in shard_names:
        # The check is on the name, not on where symlinks lead: the Hugging Face cache links every
        # snapshot file to ../../blobs/<hash>, which is outside the snapshot directory by design.
        p = Path(os.path.normpath(base / shard))
        if base not in p.parents:
            raise CheckpointError(f"{index_path}: shard {shard!r} points outside {directory}")
        paths.append(p)
    return paths


def open_checkpoint(path: str | os.PathLike, source: str | None = None) -> Checkpoint:
    """A .safetensors file, an HF sharded directory, or a LeRobot `pretrained_model/` directory."""
    p = Path(path)
    source = source or str(p)
    refuse_pickle(p)
    if p.is_dir():
        index = p / "model.safetensors.index.json"
        config = p / "config.json"
        config = config if config.is_file() else None
        if index.is_file():
            paths = _sharded(p, index)
        elif (p / "model.safetensors").is_file():
            paths = [p / "model.safetensors"]
        else:
            found = sorted(x.name for x in p.iterdir() if x.suffix.lower() in PICKLE_SUFFIXES)
            if found:
                raise CheckpointError(
                    f"refusing {p}: it holds only pickle weights ({', '.join(found[:3])}); "
                    "convert them to safetensors first"
                )
            raise CheckpointError(
                f"{p}: no model.safetensors or model.safetensors.index.json in this directory"
            )
        files = []
        try:
            for sp in paths:
                files.append(SafetensorsFile(sp))
        except BaseException:
            for f in files:
                f.close()
            raise
        return Checkpoint(files, source, config)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return Checkpoint([SafetensorsFile(p)], source)
