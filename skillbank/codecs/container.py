"""The task-vector object: encoded blocks, then a JSON footer that indexes them.

Blocks are runs of whole rows of about BLOCK_ELEMS elements (the grid the merge engine walks,
`skillbank.merge.engine.blocks`), so any block decodes without touching the rest of the tensor. The index
goes last so the object is written in one streaming pass.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from skillbank.codecs.base import Codec, get_codec
from skillbank.errors import IntegrityError
from skillbank.store.objects import ObjectStore

MAGIC = b"SBTV0001"
BLOCK_ELEMS = 1 << 20
_TAIL = struct.Struct("<Q8s")


class TaskVectorWriter:
    def __init__(self, store: ObjectStore, codec: Codec):
        self.codec = codec
        self._w = store.writer()
        self._w.write(MAGIC)
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


class TaskVectorReader:
    def __init__(self, store: ObjectStore, digest: str):
        self.digest = digest
        path = store.open_verified(digest)
        self._fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        try:
            if size < len(MAGIC) + _TAIL.size:
                raise ValueError(f"only {size} bytes")
            n, magic = _TAIL.unpack(os.pread(self._fd, _TAIL.size, size - _TAIL.size))
            if magic != MAGIC or n > size - _TAIL.size - len(MAGIC):
                raise ValueError("bad tail")
            footer = json.loads(os.pread(self._fd, n, size - _TAIL.size - n))
            self.codec = get_codec(footer["codec"], **footer["params"])
            self.block_elems = int(footer["block_elems"])
            self.tensors: dict[str, dict] = footer["tensors"]
        except (ValueError, KeyError, TypeError, struct.error) as e:
            os.close(self._fd)
            raise IntegrityError(f"task vector {digest} is not a readable task-vector object ({e})") from None
        except BaseException:  # e.g. an unknown codec: say so, without leaking the descriptor
            os.close(self._fd)
            raise

    def decode(self, name: str, block: int, parent: torch.Tensor) -> torch.Tensor:
        offset, length = self.tensors[name]["blocks"][block]
        return self.codec.decode(os.pread(self._fd, length, offset), parent)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
