"""Merge methods as small registered functions of (parent block, finetuned block, alpha).

The arithmetic is fixed here, once, for CPU and GPU alike: upcast to the compute dtype (one step
wider than storage), then `parent + alpha * (finetuned - parent)` as three separately rounded
IEEE operations (no fused multiply-add, no lerp), then one rounding back to the stored dtype.
alpha = 0 and alpha = 1 return the parent and the finetuned bytes exactly.
"""

from __future__ import annotations

import math
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


# Elements per tile of a CPU kernel: its fp32 scratch (a few MB) stays in the core's caches.
TILE = 1 << 18


def tiled(kernel: Callable[..., torch.Tensor], out_dtype: torch.dtype, *blocks: torch.Tensor) -> torch.Tensor:
    """`kernel(*blocks)` computed tile by tile on the CPU into one output of `out_dtype`.

    The result is the same bytes as one call on whole blocks (the kernels are elementwise); the
    speed is not: whole-block fp32 temporaries are fresh memory each time, so their page faults
    and cache misses made the merge several times slower than reading and writing its bytes.
    On a GPU the kernel runs once on the whole blocks.
    """
    if blocks[0].device.type != "cpu" or blocks[0].numel() <= TILE:
        return kernel(*blocks).to(out_dtype)
    flat = [b.reshape(-1) for b in blocks]
    out = torch.empty(flat[0].numel(), dtype=out_dtype)
    for s in range(0, out.numel(), TILE):
        out[s:s + TILE] = kernel(*(f[s:s + TILE] for f in flat))
    return out.view(blocks[0].shape)


def _interpolate(parent: torch.Tensor, finetuned: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    # The same three roundings as sub / mul / add into fresh tensors, in place on one copy.
    # (p + step is step + p: IEEE addition commutes.)
    p = parent.to(alpha.dtype)
    return finetuned.to(alpha.dtype, copy=True).sub_(p).mul_(alpha).add_(p)


@register_method("retain")
def retain(parent: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """RETAIN / WiSE-FT interpolation; alpha is the weight of the finetuned model."""
    if alpha == 0.0:
        return parent
    if alpha == 1.0 or not parent.is_floating_point():
        # Integer and bool buffers (step counters, masks) are copied, never interpolated.
        return finetuned
    a = torch.tensor(alpha, dtype=compute_dtype(parent.dtype), device=parent.device)
    return tiled(lambda p, f: _interpolate(p, f, a), parent.dtype, parent, finetuned)


# ----------------------------------------------------------------- additive deltas (rebuild --without)

def apply_delta(x: torch.Tensor, parent: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """`x + alpha * (finetuned - parent)`: a task vector re-applied on top of another version.

    `parent` is the version the task vector was ENCODED against, `x` the version it is applied to
    (they differ after a skill below was removed). Same exactness rule as `retain`: the compute
    dtype one step wider than storage, `finetuned - parent`, `* alpha` and `x + ...` as three
    separately rounded operations, one final rounding. alpha = 0 returns `x`; alpha = 1 is NOT the
    finetuned bytes here (x is not the parent). Integer and bool buffers take the finetuned values
    when alpha > 0, as in `retain`.
    """
    if alpha == 0.0:
        return x
    if not x.is_floating_point():
        return finetuned
    a = torch.tensor(alpha, dtype=compute_dtype(x.dtype), device=x.device)

    def kernel(x_: torch.Tensor, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        tau = f.to(a.dtype, copy=True)  # in place on one copy, as in `retain`
        return tau.sub_(p.to(a.dtype)).mul_(a).add_(x_.to(a.dtype))

    return tiled(kernel, x.dtype, x, parent, finetuned)


# ----------------------------------------------------------------- combining branches (merge A B)
#
# A combiner gets the common ancestor's block, the block of each side's tip, one weight per side,
# its parameters and where the block sits (tensor name, index of its first element). The task
# vectors are `side - ancestor`, formed in the compute dtype (one step wider than storage); every
# operation after that is a separately rounded IEEE operation in that dtype, and the result is
# rounded once to the stored dtype. Integer and bool buffers are taken from the first side that
# changed them (else the ancestor's).

CombineFn = Callable[[torch.Tensor, list, list, dict, tuple], torch.Tensor]
COMBINERS: dict[str, CombineFn] = {}
COMBINE_DEFAULTS: dict[str, dict] = {"task-arithmetic": {}, "ties": {"density": 0.2, "scale": 1.0},
                                     "dare": {"drop": 0.5, "seed": 0}}


def register_combiner(name: str):
    def wrap(fn: CombineFn) -> CombineFn:
        COMBINERS[name] = fn
        return fn

    return wrap


def _ints(anc: torch.Tensor, sides: list) -> torch.Tensor:
    for s in sides:
        if not torch.equal(s, anc):
            return s
    return anc


def _taus(anc: torch.Tensor, sides: list) -> tuple[torch.dtype, torch.Tensor, list]:
    wide = compute_dtype(anc.dtype)
    a = anc.to(wide)
    return wide, a, [torch.sub(s.to(wide), a) for s in sides]


def _weighted_sum(taus: list, weights: list, wide: torch.dtype) -> torch.Tensor:
    acc = None
    for t, w in zip(taus, weights):
        term = torch.mul(t, torch.tensor(w, dtype=wide, device=t.device))
        acc = term if acc is None else torch.add(acc, term)
    return acc


@register_combiner("task-arithmetic")
def task_arithmetic(anc, sides, weights, params, where) -> torch.Tensor:
    """theta = theta_anc + sum_k w_k * (theta_k - theta_anc), summed in side order."""
    if not anc.is_floating_point():
        return _ints(anc, sides)
    wide, a, taus = _taus(anc, sides)
    return torch.add(a, _weighted_sum(taus, weights, wide)).to(anc.dtype)


@register_combiner("ties")
def ties(anc, sides, weights, params, where) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

    Trim keeps each task vector's `density` share of entries with the largest magnitude (those
    with |tau| >= the k-th largest |tau|, k = ceil(density * n)) within the block, so memory stays
    bounded by the block (whole rows of about 2^20 elements; a smaller tensor is one block, as in
    the paper). The weighted trimmed vectors elect a sign per entry (the sign of their sum); the
    merged vector is the mean of the entries that agree with it and are non-zero, times `scale`.
    """
    if not anc.is_floating_point():
        return _ints(anc, sides)
    wide, a, taus = _taus(anc, sides)
    density = float(params.get("density", 0.2))
    trimmed = []
    for t, w in zip(taus, weights):
        flat = t.reshape(-1)
        k = max(1, math.ceil(density * flat.numel())) if flat.numel() else 0
        if k and k < flat.numel():
            thresh = torch.topk(flat.abs(), k, sorted=True).values[-1]
            t = torch.where(t.abs() >= thresh, t, torch.zeros_like(t))
        trimmed.append(torch.mul(t, torch.tensor(w, dtype=wide, device=t.device)))
    total = trimmed[0]
    for t in trimmed[1:]:
        total = torch.add(total, t)
    sign = torch.sign(total)
    num, count = torch.zeros_like(a), torch.zeros_like(a)
    for t in trimmed:
        agree = (torch.sign(t) == sign) & (t != 0)
        num = torch.add(num, torch.where(agree, t, torch.zeros_like(t)))
        count = torch.add(count, agree.to(wide))
    merged = torch.where(count > 0, torch.div(num, count.clamp_min(1)), torch.zeros_like(num))
    merged = torch.mul(merged, torch.tensor(float(params.get("scale", 1.0)), dtype=wide, device=a.device))
    return torch.add(a, merged).to(anc.dtype)


_M32 = 0xFFFFFFFF


def _mul32(z: torch.Tensor, c: int) -> torch.Tensor:
    """(z * c) mod 2^32 for 0 <= z < 2^32 held in int64, without overflowing int64."""
    lo = z * (c & 0xFFFF)
    hi = torch.bitwise_and(z * (c >> 16), 0xFFFF) << 16
    return torch.bitwise_and(lo + hi, _M32)


def _fmix32(z: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values."""
    z = torch.bitwise_xor(z, z >> 16)
    z = _mul32(z, 0x85EBCA6B)
    z = torch.bitwise_xor(z, z >> 13)
    z = _mul32(z, 0xC2B2AE35)
    return torch.bitwise_xor(z, z >> 16)


def dare_key(seed: int, side: int, name: str) -> int:
    import xxhash

    return xxhash.xxh32_intdigest(f"{seed}:{side}:{name}".encode())


def dare_keep(seed: int, side: int, name: str, first: int, count: int, drop: float) -> torch.Tensor:
    """The DARE mask of `count` elements from element `first` of tensor `name`, for one side.

    A counter-based hash of (seed, side, tensor, element index): the same whatever the block grid,
    the device or the library that recomputes it (the tests do so with numpy).
    Element i is kept when fmix32(fmix32((i mod 2^32) xor key) xor (i div 2^32)) >= drop * 2^32.
    """
    key = dare_key(seed, side, name)
    idx = torch.arange(first, first + count, dtype=torch.int64)
    z = _fmix32(torch.bitwise_xor(torch.bitwise_and(idx, _M32), key))
    z = _fmix32(torch.bitwise_xor(z, idx >> 32))
    return z >= int(drop * 2**32)


@register_combiner("dare")
def dare(anc, sides, weights, params, where) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each task-vector entry with probability `drop` (a seeded mask,
    see `dare_keep`), rescale the kept ones by 1 / (1 - drop), then add them as task arithmetic."""
    if not anc.is_floating_point():
        return _ints(anc, sides)
    wide, a, taus = _taus(anc, sides)
    drop = float(params.get("drop", 0.5))
    seed = int(params.get("seed", 0))
    name, first = where
    kept = []
    for k, t in enumerate(taus):
        keep = dare_keep(seed, k, name, first, t.numel(), drop).reshape(t.shape).to(t.device)
        scaled = torch.div(t, torch.tensor(1.0 - drop, dtype=wide, device=t.device))
        kept.append(torch.where(keep, scaled, torch.zeros_like(t)))
    return torch.add(a, _weighted_sum(kept, weights, wide)).to(anc.dtype)
