"""`dare`: DARE (Yu et al., "Language Models are Super Mario", 2023): drop each delta entry with
probability 1 - density and rescale the survivors by 1 / density.

The mask is drawn from numpy's PCG64 seeded with (`seed`, xxh3-64 of the parent block's bytes, the
element count), so re-encoding the same block gives the same mask; it is stored as a bitmap with
the rescaled survivors in the tensor's own dtype, so decoding never depends on the generator.
"""

from __future__ import annotations

import numpy as np
import torch
import xxhash

from skillbank.codecs.base import register
from skillbank.codecs.delta import DeltaCodec, int_param, masked_delta, masked_sections, positive_float


@register("dare")
class Dare(DeltaCodec):
    name = "dare"
    tag = b"SBdr"
    sections = 2  # bitmap, rescaled survivors

    def __init__(self, density: float = 0.1, seed: int = 0):
        self.density = positive_float(density, "dare density", 1.0)
        self.seed = int_param(seed, "dare seed", 0)

    def params(self) -> dict:
        return {"density": self.density, "seed": self.seed}

    def mask(self, parent: torch.Tensor) -> torch.Tensor:
        """The kept positions of a block (flat), a function of the seed and the parent block's bytes."""
        n = parent.numel()
        data = parent.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h = xxhash.xxh3_64_intdigest(data)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, h, n])))
        return torch.from_numpy(rng.random(n) < self.density)

    def encode_delta(self, delta: torch.Tensor, parent: torch.Tensor) -> list[bytes] | None:
        flat = delta.reshape(-1)
        mask = self.mask(parent)
        return masked_sections(mask, (flat[mask].double() / self.density).to(parent.dtype))

    def decode_delta_sections(self, sections, shape, dtype, device) -> torch.Tensor:
        return masked_delta(sections, shape, dtype, device)
