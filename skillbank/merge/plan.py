"""The planner: a model's tensors cut into blocks, the blocks packed into chunks of work.

A block is a run of whole rows of about BLOCK_ELEMS elements: the grid task vectors are encoded
on, so any block decodes alone. A chunk is what one worker computes at a time: the blocks of a
big tensor one after another, or many small tensors together, up to `chunk_bytes`. The executor
keeps a bounded number of chunks in flight, so memory is set by the chunk size, never the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from skillbank.codecs import BLOCK_ELEMS
from skillbank.tensors import TensorSpec
from skillbank.tensors.writer import canonical

DEFAULT_CHUNK_MB = 16


def row_elems(spec: TensorSpec) -> int:
    return math.prod(spec.shape[1:]) if len(spec.shape) >= 2 else 1


def blocks(spec: TensorSpec, block_elems: int = BLOCK_ELEMS) -> Iterator[tuple[int, int, int]]:
    """(block index, first element, element count) over whole rows of about `block_elems`.

    Blocks never split a row, so a codec sees a (rows, row_elems) matrix (low-rank and per-row
    scales need that). A row longer than `block_elems` makes a block of one row; an empty tensor
    still has one empty block.
    """
    n, row = spec.numel, row_elems(spec)
    step = max(1, block_elems // row) * row if n else 1
    for i in range(max(1, math.ceil(n / step))):
        first = i * step
        yield i, first, min(step, n - first)


def block_view(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """A flat block as a codec sees it: (rows, row_elems) for matrices, flat otherwise."""
    row = row_elems(spec)
    return x.view(-1, row) if len(spec.shape) >= 2 and row and x.numel() else x


@dataclass(frozen=True)
class Piece:
    spec: TensorSpec
    index: int
    first: int
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * self.spec.nbytes // max(self.spec.numel, 1)


@dataclass
class Chunk:
    pieces: list[Piece] = field(default_factory=list)
    nbytes: int = 0


def plan(specs: list[TensorSpec], chunk_mb: float = DEFAULT_CHUNK_MB) -> list[Chunk]:
    """Every block of every tensor, in name order (the order they are written and hashed)."""
    limit = max(1, int(chunk_mb * 2**20))
    chunks = [Chunk()]
    for spec in canonical(specs):
        for index, first, count in blocks(spec):
            piece = Piece(spec, index, first, count)
            if chunks[-1].pieces and chunks[-1].nbytes + piece.nbytes > limit:
                chunks.append(Chunk())
            chunks[-1].pieces.append(piece)
            chunks[-1].nbytes += piece.nbytes
    return chunks if chunks[0].pieces else []
