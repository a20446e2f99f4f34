"""`bitdelta`: BitDelta (Liu et al., 2024): one bit per element, the sign of the delta, and one fp32
scale per row, the row's mean absolute delta (the L2-optimal scale for a sign matrix; the paper then
distils the scales, which needs the model and data, so this codec stops at that initialisation).

A row's decoded delta is `+scale` where the delta is >= 0 and `-scale` where it is < 0, so signs are
kept wherever the delta is nonzero and each row keeps its L1 norm. 1-D blocks use one scale.
"""

from __future__ import annotations

import math

import torch

from skillbank.codecs.base import register
from skillbank.codecs.delta import DeltaCodec, check_finite, pack_mask, tensor_bytes, tensor_from, unpack_mask, \
    wide_dtype
from skillbank.errors import IntegrityError


def _rows(shape) -> tuple[int, int]:
    n = math.prod(shape)
    return (shape[0], n // shape[0]) if len(shape) == 2 else (1, n)


@register("bitdelta")
class BitDelta(DeltaCodec):
    name = "bitdelta"
    tag = b"SBbd"
    sections = 2  # fp32 row scales, sign bitmap

    def params(self) -> dict:
        return {}

    def encode_delta(self, delta: torch.Tensor, parent: torch.Tensor) -> list[bytes] | None:
        m = delta.reshape(_rows(delta.shape))
        # float64 numpy mean: one fixed summation order, whatever torch's threading.
        mean = torch.from_numpy(m.abs().double().numpy().mean(axis=1))
        scale = mean.float()
        if not bool(torch.isfinite(scale).all()):
            return None  # an fp64 delta beyond fp32 range
        # A row whose mean underflows fp32 gets the smallest positive scale, so its signs survive.
        scale = torch.where((scale == 0) & (mean > 0), torch.tensor(2.0 ** -149), scale)
        return [tensor_bytes(scale), pack_mask(m >= 0)]

    def decode_delta_sections(self, sections, shape, dtype, device) -> torch.Tensor:
        rows, cols = _rows(shape)
        scale = tensor_from(sections[0], torch.float32, rows, "bitdelta scales")
        check_finite(scale, "bitdelta scales")
        if bool((scale < 0).any()):
            raise IntegrityError("bitdelta scales hold a negative value")
        signs = unpack_mask(sections[1], rows * cols, "bitdelta signs").view(rows, cols).to(device)
        s = scale.to(device=device, dtype=wide_dtype(dtype))[:, None]
        return torch.where(signs, s, torch.neg(s)).reshape(shape)
