"""Write safetensors checkpoints in one pass, and the canonical weights digest.

Every header is computed before the first tensor byte is written (shapes and dtypes are known up
front), so tensors stream straight to their final offsets. The weights digest is xxh3-128 of the
canonical single-file serialisation (names sorted, no metadata): it does not change with sharding
or stamped metadata, and the bank's stored base object *is* that serialisation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import xxhash

from skillbank.errors import CheckpointError
from skillbank.tensors.direct import DirectFile
from skillbank.tensors.dtypes import ITEMSIZE


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape)]

    @classmethod
    def from_json(cls, row) -> "TensorSpec":
        return cls(row[0], row[1], tuple(row[2]))


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for `specs` laid out in the given order."""
    entries: dict[str, object] = {}
    offset = 0
    for s in specs:
        entries[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    if metadata:
        entries["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def canonical(specs) -> list[TensorSpec]:
    return sorted(specs, key=lambda s: s.name)


def as_bytes(chunk: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a flat tensor chunk, without a copy when possible."""
    flat = chunk.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


class Digests(NamedTuple):
    """Both digests of one canonical serialisation: xxh3-128 (the address) and SHA-256 (or None)."""

    xxh3: str
    sha256: str | None


class WeightsDigest:
    """Streaming xxh3-128 of the canonical serialisation; feed tensors' bytes in name order.

    With `sha256=True` the same bytes also feed a SHA-256: xxh3 catches accidents, not an
    adversary who crafts collisions, so versions record both (docs/security.md). hashlib drops
    the GIL on large buffers, so hashing in the writer thread overlaps the workers' compute.
    """

    def __init__(self, specs: list[TensorSpec], sha256: bool = False):
        head = header_bytes(canonical(specs))
        self._h = xxhash.xxh3_128(head)
        self._s = hashlib.sha256(head) if sha256 else None

    def update(self, chunk: torch.Tensor | bytes | memoryview) -> None:
        data = as_bytes(chunk) if isinstance(chunk, torch.Tensor) else chunk
        self._h.update(data)
        if self._s is not None:
            self._s.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    @property
    def sha256(self) -> str | None:
        return self._s.hexdigest() if self._s is not None else None

    def digests(self) -> Digests:
        return Digests(self.hexdigest(), self.sha256)


def plan_shards(specs: list[TensorSpec], max_shard_size: int | None) -> list[list[TensorSpec]]:
    """Greedy, in name order: a new shard starts when the next tensor would overflow this one."""
    specs = canonical(specs)
    if not max_shard_size:
        return [specs]
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


class CheckpointWriter:
    """Writes tensors, in name order, into temp files that appear under their names on `commit`."""

    def __init__(self, out_dir: str | os.PathLike, specs: list[TensorSpec],
                 metadata: dict[str, str] | None = None, max_shard_size: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(specs, max_shard_size)
        n = len(self.shards)
        self.names = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._order = [s for shard in self.shards for s in shard]
        self._shard_of = {s.name: i for i, shard in enumerate(self.shards) for s in shard}
        self._tmp = [self.out_dir / f".{name}.partial" for name in self.names]
        self._files = []
        try:
            for path, shard in zip(self._tmp, self.shards):
                try:
                    f = DirectFile(path)
                except BlockingIOError:
                    raise CheckpointError(f"{self.out_dir}: another checkout is writing {path.name} here; "
                                          "wait for it to finish or choose another --out") from None
                self._files.append(f)
                f.write(header_bytes(shard, self.metadata))
        except BaseException:
            self.abort()
            raise
        self._pos = 0
        self._left = self._order[0].nbytes if self._order else 0

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next chunk; chunks must arrive in name order and fill each tensor exactly."""
        while self._pos < len(self._order) and self._left == 0 and self._order[self._pos].name != name:
            self._advance()
        spec = self._order[self._pos]
        if spec.name != name:
            raise RuntimeError(f"writer expected tensor {spec.name!r}, got {name!r}")
        data = as_bytes(chunk)
        if len(data) > self._left:
            raise RuntimeError(f"too many bytes for tensor {name!r}")
        self._files[self._shard_of[name]].write(data)
        self._left -= len(data)
        if self._left == 0:
            self._advance()

    def _advance(self) -> None:
        done = self._shard_of[self._order[self._pos].name]
        self._pos += 1
        self._left = self._order[self._pos].nbytes if self._pos < len(self._order) else 0
        if self._pos == len(self._order) or self._shard_of[self._order[self._pos].name] != done:
            self._files[done].flush()  # a finished shard gives its staging buffer back

    def commit(self) -> list[Path]:
        """fsync every shard, then rename into place and write the index when sharded."""
        if self._pos < len(self._order) and any(s.nbytes for s in self._order[self._pos:]):
            raise RuntimeError(f"tensor {self._order[self._pos].name!r} was not fully written")
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
        final = [self.out_dir / n for n in self.names]
        # Renamed while still locked, then closed: a writer that opens the temp name after
        # this gets a new file, never this one to truncate.
        for tmp, dst in zip(self._tmp, final):
            os.replace(tmp, dst)
        for f in self._files:
            f.close()
        if len(final) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self._order), **self.metadata},
                "weight_map": {s.name: self.names[i] for i, shard in enumerate(self.shards) for s in shard},
            }
            write_text_atomic(self.out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        fsync_dir(self.out_dir)
        return final

    def abort(self) -> None:
        # Unlinked while still locked (the temp files this writer created, no others), then closed:
        # a writer that takes the name next must not lose its file to this unlink.
        for tmp in self._tmp[:len(self._files)]:
            tmp.unlink(missing_ok=True)
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass  # closing flushes what is buffered, which fails on a full disk; it closes anyway


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def no_follow(path, flags: int) -> int:
    """An `opener` that will not write through a symbolic link planted where a temp file goes."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def write_text_atomic(path: Path, text: str) -> None:
    # A temp name per writer: two `checkout`s writing HEAD at once must not share (and truncate)
    # one temp file, which left HEAD empty or failed the second rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "w", opener=no_follow) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an I/O error must not leave the temp file
        raise
