"""The task-vector object: encoded blocks, then a JSON footer that indexes them.

Blocks are runs of whole rows of about BLOCK_ELEMS elements (the grid the merge engine walks,
`skillbank.merge.engine.blocks`), so any block decodes without touching the rest of the tensor. The index
goes last so the object is written in one streaming pass.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from skillbank.codecs.base import Codec, get_codec
from skillbank.errors import IntegrityError, show
from skillbank.store.objects import ObjectStore
from skillbank.tensors.reader import strict_json

MAGIC = b"SBTV0001"
BLOCK_ELEMS = 1 << 20
_TAIL = struct.Struct("<Q8s")


class TaskVectorWriter:
    def __init__(self, store: ObjectStore, codec: Codec):
        self.codec = codec
        self._w = store.writer()
        try:
            self._w.write(MAGIC)
        except BaseException:
            self._w.abort()
            raise
        self.index: dict[str, dict] = {}

    def add_block(self, name: str, dtype: str, shape, parent: torch.Tensor, finetuned: torch.Tensor) -> bytes:
        """Encode and append the next block of `name`; returns the encoded bytes."""
        data = self.codec.encode(parent, finetuned)
        self.append(name, dtype, shape, data)
        return data

    def append(self, name: str, dtype: str, shape, data: bytes) -> None:
        """Append an already encoded block; blocks of a tensor must come in order."""
        entry = self.index.setdefault(name, {"dtype": dtype, "shape": list(shape), "blocks": []})
        entry["blocks"].append([self._w.tell(), len(data)])
        self._w.write(data)

    @property
    def stored_bytes(self) -> int:
        return self._w.tell()

    def commit(self) -> str:
        footer = json.dumps({"codec": self.codec.name, "params": self.codec.params(),
                             "block_elems": BLOCK_ELEMS, "tensors": self.index},
                            sort_keys=True, separators=(",", ":")).encode()
        self._w.write(footer)
        self._w.write(_TAIL.pack(len(footer), MAGIC))
        return self._w.commit()

    def abort(self) -> None:
        self._w.abort()


def _check_index(tensors, data_end: int) -> dict[str, dict]:
    """The footer's index, checked before any block is read: each block lies between the magic
    and the footer, so a damaged index fails here in one line instead of reading wild ranges."""
    if not isinstance(tensors, dict):
        raise ValueError("its tensor index is not an object")
    for name, entry in tensors.items():
        blocks = entry.get("blocks") if isinstance(entry, dict) else None
        if not isinstance(blocks, list):
            raise ValueError(f"tensor {show(name)} has no block list")
        for b in blocks:
            if (not isinstance(b, list) or len(b) != 2 or not all(type(x) is int for x in b)
                    or not len(MAGIC) <= b[0] <= b[0] + b[1] <= data_end):
                raise ValueError(f"tensor {show(name)} has a block {show(b)} outside its data")
    return tensors


class TaskVectorReader:
    def __init__(self, store: ObjectStore, digest: str, path: Path | None = None):
        """`path`: the object opened unchecked, its check running elsewhere (store/verify.py)."""
        self.digest = digest
        path = path or store.open_verified(digest)
        self._fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        try:
            if size < len(MAGIC) + _TAIL.size:
                raise ValueError(f"only {size} bytes")
            n, magic = _TAIL.unpack(os.pread(self._fd, _TAIL.size, size - _TAIL.size))
            if magic != MAGIC or n > size - _TAIL.size - len(MAGIC):
                raise ValueError("bad tail")
            footer = strict_json(os.pread(self._fd, n, size - _TAIL.size - n))
            if not isinstance(footer, dict) or not isinstance(footer.get("params"), dict):
                raise ValueError("footer is not {codec, params, block_elems, tensors}")
            self.codec = get_codec(footer["codec"], **footer["params"])
            self.block_elems = footer["block_elems"]
            if type(self.block_elems) is not int or self.block_elems < 1:
                raise ValueError(f"block_elems {show(self.block_elems)}")
            self.tensors: dict[str, dict] = _check_index(footer["tensors"], size - _TAIL.size - n)
        except (ValueError, KeyError, TypeError, struct.error) as e:
            os.close(self._fd)
            raise IntegrityError(f"task vector {digest} is not a readable task-vector object ({e})") from None
        except BaseException:  # e.g. an unknown codec: say so, without leaking the descriptor
            os.close(self._fd)
            raise

    def decode(self, name: str, block: int, parent: torch.Tensor) -> torch.Tensor:
        blocks = self.tensors[name]["blocks"] if name in self.tensors else []
        if not 0 <= block < len(blocks):
            raise IntegrityError(f"task vector {self.digest} has no block {block} of tensor {show(name)}")
        offset, length = blocks[block]
        return self.codec.decode(os.pread(self._fd, length, offset), parent)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
