"""Merge methods as small registered functions of (parent block, finetuned block, alpha).

The arithmetic is fixed here, once, for CPU and GPU alike: upcast to the compute dtype (one step
wider than storage), then `parent + alpha * (finetuned - parent)` as three separately rounded
IEEE operations (no fused multiply-add, no lerp), then one rounding back to the stored dtype.
alpha = 0 and alpha = 1 return the parent and the finetuned bytes exactly.
"""

from __future__ import annotations

from typing import Callable

import torch

from skillbank.tensors.dtypes import compute_dtype

MergeFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
METHODS: dict[str, MergeFn] = {}


def register_method(name: str):
    def wrap(fn: MergeFn) -> MergeFn:
        METHODS[name] = fn
        return fn

    return wrap


@register_method("retain")
def retain(parent: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """RETAIN / WiSE-FT interpolation; alpha is the weight of the finetuned model."""
    if alpha == 0.0:
        return parent
    if alpha == 1.0 or not parent.is_floating_point():
        # Integer and bool buffers (step counters, masks) are copied, never interpolated.
        return finetuned
    wide = compute_dtype(parent.dtype)
    p = parent.to(wide)
    delta = torch.sub(finetuned.to(wide), p)
    step = torch.mul(delta, torch.tensor(alpha, dtype=wide, device=parent.device))
    return torch.add(p, step).to(parent.dtype)
