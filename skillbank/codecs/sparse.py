"""`sparse-topk`: keep the `density` fraction of largest-magnitude delta entries (TIES-style trimming).

Stored as a bitmap of the kept positions (packbits) and their deltas in the tensor's own dtype,
zstd-compressed. The other entries decode to a zero delta, i.e. the parent's exact bits.
"""

from __future__ import annotations

import numpy as np
import torch

from skillbank.codecs.base import register
from skillbank.codecs.delta import DeltaCodec, masked_delta, masked_sections, positive_float


def keep_count(n: int, density: float) -> int:
    """How many of n entries sparse-topk keeps: round(density * n), at least one of a nonempty block."""
    return min(n, max(1 if n else 0, round(density * n)))


def top_mask(magnitude: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries; among equal magnitudes at the threshold, the lowest positions win."""
    n = magnitude.size
    if k >= n:
        return np.ones(n, dtype=bool)
    threshold = np.partition(magnitude, n - k)[n - k]
    mask = magnitude > threshold
    ties = np.flatnonzero(magnitude == threshold)[:k - int(mask.sum())]
    mask[ties] = True
    return mask


@register("sparse-topk")
class SparseTopK(DeltaCodec):
    name = "sparse-topk"
    tag = b"SBtk"
    sections = 2  # bitmap, kept values

    def __init__(self, density: float = 0.1):
        self.density = positive_float(density, "sparse-topk density", 1.0)

    def params(self) -> dict:
        return {"density": self.density}

    def encode_delta(self, delta: torch.Tensor, parent: torch.Tensor) -> list[bytes] | None:
        flat = delta.reshape(-1)
        mask = torch.from_numpy(top_mask(flat.abs().numpy(), keep_count(flat.numel(), self.density)))
        return masked_sections(mask, flat[mask].to(parent.dtype))

    def decode_delta_sections(self, sections, shape, dtype, device) -> torch.Tensor:
        return masked_delta(sections, shape, dtype, device)
