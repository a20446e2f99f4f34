"""`int8`: blockwise symmetric int8 quantisation of the delta (as in LLM.int8 / Q8 blockwise schemes).

The flattened block is cut into groups of `group_size` consecutive elements; each group stores one
fp32 scale `max|delta| / 127` and `round(delta / scale)` in [-127, 127], all zstd-compressed. Per
element the decoded delta is `q * scale` (one rounding in the wide dtype), so its error is at most
`scale / 2` plus that rounding.
"""

from __future__ import annotations

import math

import torch

from skillbank.codecs.base import register
from skillbank.codecs.delta import DeltaCodec, check_finite, int_param, tensor_bytes, tensor_from, wide_dtype
from skillbank.errors import IntegrityError

_SMALLEST = 2.0 ** -149  # the smallest positive fp32 (a subnormal): the scale of a group whose max underflows


@register("int8")
class Int8(DeltaCodec):
    name = "int8"
    tag = b"SBq8"
    sections = 2  # fp32 scales, int8 values

    def __init__(self, group_size: int = 128):
        self.group_size = int_param(group_size, "int8 group_size", 1)

    def params(self) -> dict:
        return {"group_size": self.group_size}

    def encode_delta(self, delta: torch.Tensor, parent: torch.Tensor) -> list[bytes] | None:
        flat = delta.reshape(-1).double()
        n, g = flat.numel(), self.group_size
        groups = math.ceil(n / g)
        x = torch.zeros(groups * g, dtype=torch.float64)
        x[:n] = flat
        x = x.view(groups, g)
        amax = x.abs().amax(dim=1)
        scale = (amax / 127).float()
        if not bool(torch.isfinite(scale).all()):
            return None  # an fp64 delta beyond fp32 range
        scale = torch.where((scale == 0) & (amax > 0), torch.tensor(_SMALLEST), scale)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
        q = torch.round(x / safe[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
        return [tensor_bytes(scale), tensor_bytes(q)]

    def decode_delta_sections(self, sections, shape, dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        groups = math.ceil(n / self.group_size)
        scale = tensor_from(sections[0], torch.float32, groups, "int8 scales")
        check_finite(scale, "int8 scales")
        if bool((scale < 0).any()):
            raise IntegrityError("int8 scales hold a negative value")
        q = tensor_from(sections[1], torch.int8, n, "int8 values")
        if n and int(q.min()) < -127:
            raise IntegrityError("int8 values hold -128")
        wide = wide_dtype(dtype)
        full = scale.repeat_interleave(min(self.group_size, n))[:n]  # a huge group_size: one group, n values
        return torch.mul(q.to(device=device, dtype=wide), full.to(device=device, dtype=wide)).reshape(shape)
