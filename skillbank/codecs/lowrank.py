"""`lowrank`: a truncated SVD of each block's delta (as in LoRA-style task-vector compression).

A (rows, cols) block stores factors A (rows x r) and B (r x cols), r = min(`rank`, rows, cols),
with delta ~= A @ B; the factors are the optimal rank-r approximation (eigenvectors of the smaller
Gram matrix, in float64), balanced so that A's and B's k-th columns/rows have the same norm, and
stored in fp32 or, with `factor_dtype="fp16"`, fp16 (blocks whose fp16 factors overflow use fp32).
1-D blocks (biases, norms), and blocks whose factors would be no smaller than the raw block, are
stored exactly.

Determinism. Decode is the one place where a lossy codec needs a product of matrices, and a
matmul is the one place where CPU and CUDA (and two CPUs: BLAS kernels pick their reduction order
by instruction set and thread count) could round differently. So decode does not call a BLAS: it
accumulates the r rank-1 products in a fixed order, `acc = acc + A[:, k] * B[k, :]` for k = 0..r-1,
as separately rounded elementwise fp32 operations (fp64 for fp64 tensors). That is reproducible on
CPU; until it has been checked bit for bit on CUDA, `device_exact = False` tells the engine to
decode lowrank blocks on the CPU always.
"""

from __future__ import annotations

import struct

import torch

from skillbank.codecs.base import register
from skillbank.codecs.delta import DeltaCodec, check_finite, int_param, tensor_bytes, tensor_from, wide_dtype
from skillbank.errors import IntegrityError, ValidationError, show

_META = struct.Struct("<BI")  # factor dtype code, rank
_FACTOR = {0: torch.float32, 1: torch.float16}
_FACTOR_NAMES = {"fp32": 0, "fp16": 1}


def factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced float64 factors (rows x r, r x cols) of the best rank-r approximation of `delta`."""
    x = delta.double()
    rows, cols = x.shape
    if rows >= cols:
        _, v = torch.linalg.eigh(x.T @ x)
        v = v[:, -r:].flip(1)  # eigh sorts ascending: the top r, largest first
        a, b = x @ v, v.T
    else:
        _, u = torch.linalg.eigh(x @ x.T)
        u = u[:, -r:].flip(1)
        a, b = u, u.T @ x
    na, nb = a.norm(dim=0), b.norm(dim=1)
    live = (na > 0) & (nb > 0)
    c = torch.where(live, torch.sqrt(nb / torch.where(live, na, 1.0)), 0.0)
    a = a * c[None, :]
    b = torch.where(live[:, None], b / torch.where(live, c, 1.0)[:, None], 0.0)
    return a, b


@register("lowrank")
class LowRank(DeltaCodec):
    name = "lowrank"
    tag = b"SBlr"
    sections = 3  # meta, A, B
    device_exact = False  # see the module docstring: decode lowrank blocks on the CPU

    def __init__(self, rank: int = 16, factor_dtype: str = "fp32"):
        self.rank = int_param(rank, "lowrank rank", 1)
        if factor_dtype not in _FACTOR_NAMES:
            raise ValidationError(f"lowrank factor_dtype must be one of {', '.join(_FACTOR_NAMES)}, "
                                  f"not {show(factor_dtype)}")
        self.factor_dtype = factor_dtype

    def params(self) -> dict:
        return {"rank": self.rank, "factor_dtype": self.factor_dtype}

    def encode_delta(self, delta: torch.Tensor, parent: torch.Tensor) -> list[bytes] | None:
        if delta.dim() != 2:
            return None  # biases and norms: tiny, stored exactly
        rows, cols = delta.shape
        r = min(self.rank, rows, cols)
        code = _FACTOR_NAMES[self.factor_dtype]
        if r * (rows + cols) * _FACTOR[code].itemsize >= rows * cols * parent.element_size():
            return None  # the factors would not be smaller than the block itself
        a, b = factors(delta, r)
        fa, fb = a.to(_FACTOR[code]), b.to(_FACTOR[code])
        if code and not (bool(torch.isfinite(fa).all()) and bool(torch.isfinite(fb).all())):
            code = 0
            fa, fb = a.float(), b.float()
        if not (bool(torch.isfinite(fa).all()) and bool(torch.isfinite(fb).all())):
            return None  # an fp64 delta beyond fp32 range
        return [_META.pack(code, r), tensor_bytes(fa), tensor_bytes(fb)]

    def decode_delta_sections(self, sections, shape, dtype, device) -> torch.Tensor:
        if len(shape) != 2 or len(sections[0]) != _META.size:
            raise IntegrityError("lowrank block is not a matrix block")
        code, r = _META.unpack(sections[0])
        rows, cols = shape
        if code not in _FACTOR or not 1 <= r <= min(rows, cols):
            raise IntegrityError(f"lowrank block has factor dtype {code} and rank {r} for a {rows}x{cols} block")
        wide = wide_dtype(dtype)
        a = tensor_from(sections[1], _FACTOR[code], rows * r, "lowrank A")
        b = tensor_from(sections[2], _FACTOR[code], r * cols, "lowrank B")
        check_finite(a, "lowrank A")
        check_finite(b, "lowrank B")
        a = a.view(rows, r).to(device=device, dtype=wide)
        b = b.view(r, cols).to(device=device, dtype=wide)
        acc = torch.mul(a[:, 0:1], b[0:1, :])
        term = torch.empty_like(acc)
        for k in range(1, r):
            torch.mul(a[:, k:k + 1], b[k:k + 1, :], out=term)
            acc.add_(term)
        return acc
