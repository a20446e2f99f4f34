"""The streaming executor: every tensor is visited block by block, never held whole.

Blocks are fixed runs of BLOCK_ELEMS elements of the flattened tensor (the task-vector grid), so
resident memory is a few blocks whatever the model's size. A rebuild is fused over the chain: per
block, the base is read once and each task vector once, and the result is produced once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from skillbank.codecs import BLOCK_ELEMS, Codec, TaskVectorWriter
from skillbank.errors import ValidationError
from skillbank.merge.chain import Chain, alpha_for
from skillbank.merge.methods import METHODS
from skillbank.tensors import Checkpoint, CheckpointWriter, TensorSpec, WeightsDigest
from skillbank.tensors.writer import canonical

Progress = Callable[[int], None] | None


def blocks(spec: TensorSpec, block_elems: int = BLOCK_ELEMS) -> Iterator[tuple[int, int, int]]:
    """(block index, first element, element count); an empty tensor still has one empty block."""
    n = spec.numel
    for i in range(max(1, math.ceil(n / block_elems))):
        first = i * block_elems
        yield i, first, min(block_elems, n - first)


def rebuild_block(chain: Chain, spec: TensorSpec, index: int, first: int, count: int) -> torch.Tensor:
    x = chain.base.read(chain.base.tensors[spec.name], first, count)
    for step in chain.steps:
        ft = step.task_vector.decode(spec.name, index, x)
        x = METHODS[step.method](x, ft, step.alpha(spec.name))
    return x


def materialize(chain: Chain, writer: CheckpointWriter | None, progress: Progress = None) -> str:
    """Rebuild every tensor into `writer` (or nowhere) and return the weights digest."""
    digest = WeightsDigest(chain.specs)
    for spec in canonical(chain.specs):
        for index, first, count in blocks(spec):
            x = rebuild_block(chain, spec, index, first, count)
            digest.update(x)
            if writer is not None:
                writer.write(spec.name, x)
            if progress:
                progress(x.numel() * x.element_size())
    return digest.hexdigest()


@dataclass
class AddStats:
    digest: str = ""  # the merged child's weights
    finetuned_digest: str = ""
    raw_bytes: int = 0
    delta_sq: float = 0.0
    parent_sq: float = 0.0
    error_sq: float = 0.0
    nonfinite: list[str] = field(default_factory=list)

    @property
    def rel_norm(self) -> float:
        return math.sqrt(self.delta_sq) / math.sqrt(self.parent_sq) if self.parent_sq else 0.0

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.error_sq) / math.sqrt(self.delta_sq) if self.delta_sq else 0.0


def add_pass(parent: Chain, finetuned: Checkpoint, codec: Codec, tv: TaskVectorWriter, method: str,
             alphas: dict[str, float], groups: dict[str, str | None], progress: Progress = None) -> AddStats:
    """One pass that encodes the task vector, merges, and measures; nothing is committed here."""
    merge = METHODS[method]
    stats = AddStats()
    child = WeightsDigest(parent.specs)
    ft_digest = WeightsDigest(parent.specs)
    for spec in canonical(parent.specs):
        alpha = alpha_for(alphas, groups.get(spec.name))
        for index, first, count in blocks(spec):
            p = rebuild_block(parent, spec, index, first, count)
            f = finetuned.read(spec.name, first, count)
            ft_digest.update(f)
            if p.is_floating_point():
                if not bool(torch.isfinite(f).all()):
                    stats.nonfinite.append(spec.name)
                    raise ValidationError(
                        f"finetuned tensor {spec.name!r} contains NaN or Inf; refusing to store it"
                    )
                p64, f64 = p.double(), f.double()
                stats.delta_sq += float(torch.sum((f64 - p64) ** 2))
                stats.parent_sq += float(torch.sum(p64 * p64))
            data = tv.add_block(spec.name, spec.dtype, spec.shape, p, f)
            if not codec.lossless:
                # The merge is defined by what was stored, so later rebuilds give the same bytes.
                decoded = codec.decode(data, p)
                if p.is_floating_point():
                    stats.error_sq += float(torch.sum((decoded.double() - f.double()) ** 2))
                f = decoded
            child.update(merge(p, f, alpha))
            stats.raw_bytes += f.numel() * f.element_size()
            if progress:
                progress(f.numel() * f.element_size())
    stats.digest = child.hexdigest()
    stats.finetuned_digest = ft_digest.hexdigest()
    return stats
