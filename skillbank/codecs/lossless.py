"""Lossless task vectors: XOR of bit patterns, split into byte planes, then zstd.

Finetuning moves most weights by a little, so the XOR of parent and finetuned bit patterns is
mostly zero in the sign/exponent byte and low-entropy in the top mantissa bits. Grouping byte k of
every element together gives zstd long runs to work with; the low mantissa plane stays noisy.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from skillbank.codecs.base import register
from skillbank.errors import IntegrityError
from skillbank.tensors.dtypes import BITS_VIEW


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(BITS_VIEW[t.element_size()])


@register("xor-zstd")
class XorZstd:
    name = "xor-zstd"
    lossless = True

    def __init__(self, level: int = 3):
        self.level = int(level)
        self._c = zstandard.ZstdCompressor(level=self.level)
        self._d = zstandard.ZstdDecompressor()

    def params(self) -> dict:
        return {"level": self.level}

    def encode(self, parent: torch.Tensor, finetuned: torch.Tensor) -> bytes:
        x = torch.bitwise_xor(_bits(parent), _bits(finetuned))
        width = parent.element_size()
        planes = x.view(torch.uint8).view(-1, width).t().contiguous()
        return self._c.compress(planes.numpy().tobytes())

    def decode(self, data: bytes, parent: torch.Tensor) -> torch.Tensor:
        width = parent.element_size()
        n = parent.numel()
        try:
            raw = self._d.decompress(data, max_output_size=n * width)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"task-vector block does not decompress ({e})") from None
        if len(raw) != n * width:
            raise IntegrityError(f"task-vector block holds {len(raw)} bytes, expected {n * width}")
        planes = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(width, n)
        x = planes.t().contiguous().reshape(-1).view(_bits(parent).dtype)
        return torch.bitwise_xor(_bits(parent), x).view(parent.dtype)
