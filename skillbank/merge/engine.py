"""The streaming executor: plan -> read -> decode -> merge -> hash/write, chunk by chunk.

Workers compute chunks ahead of the writer (reads, zstd and torch kernels release the GIL, so
they overlap); the writer consumes results strictly in plan order, hashing and appending each
block at its final offset. At most `lookahead` chunks are in flight, so resident memory is a few
chunks whatever the model's size. A rebuild is fused over the chain: per block, the base is read
once and each task vector once, and the result is produced once.
"""

from __future__ import annotations

import math
import os
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from skillbank.codecs import Codec, TaskVectorWriter
from skillbank.errors import CheckpointError, SkillbankError, ValidationError
from skillbank.merge.chain import Chain, alpha_for
from skillbank.merge.methods import COMBINERS, METHODS, apply_delta
from skillbank.merge.plan import DEFAULT_CHUNK_MB, Chunk, Piece, block_view, blocks, plan
from skillbank.store import ObjectWriter
from skillbank.tensors import Checkpoint, CheckpointWriter, Digests, TensorSpec, WeightsDigest, header_bytes
from skillbank.tensors.dtypes import all_finite, compute_dtype
from skillbank.tensors.writer import as_bytes, canonical

__all__ = ["AddStats", "Options", "add_pass", "blocks", "combine_pass", "materialize", "merge_checkpoints",
           "rebuild_piece", "replay_digests",
           "resolve_device"]

Progress = Callable[[int], None] | None
T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    chunk_mb: float = DEFAULT_CHUNK_MB
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    workers: int = 0  # 0: one per core, at most 4

    @property
    def n_workers(self) -> int:
        return self.workers or max(1, min(4, os.cpu_count() or 1))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SkillbankError(f"unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SkillbankError(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise SkillbankError(f"unsupported device {name!r} (cpu, cuda, cuda:N or auto)")
    return device


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu" or x.device == device:
        return x
    return x.pin_memory().to(device, non_blocking=True)


def _merge(method: str, p: torch.Tensor, f: torch.Tensor, alpha: float, device: torch.device) -> torch.Tensor:
    """Run a merge method on `device`; the arithmetic (methods.py) gives the same bytes on any."""
    if device.type == "cpu" or not p.is_floating_point() or alpha in (0.0, 1.0):
        return METHODS[method](p, f, alpha)
    return METHODS[method](_to(p, device), _to(f, device), alpha).cpu()


def rebuild_piece(chain: Chain, piece: Piece, device: torch.device, _memo: dict | None = None,
                  trace: list | None = None) -> torch.Tensor:
    """One block of a version: the base block, then each step of the chain applied in order.

    A delta step needs the block of the version its task vector was encoded against, rebuilt from
    that version's own chain. Consecutive delta steps (a `rebuild --without`) name consecutive
    versions of one original chain, so the last original block is remembered (`_memo`, keyed by
    manifest) and the next one is one step further: both chains advance together, block by block,
    and memory stays a few blocks. With `trace`, the block after every step is appended to it.
    """
    spec = piece.spec
    memo: dict = {} if _memo is None else _memo
    start, x = 0, None
    for i in range(len(chain.steps) - 1, -1, -1):
        if chain.steps[i].manifest is not None and chain.steps[i].manifest in memo:
            start, x = i + 1, memo[chain.steps[i].manifest]
            break
    if x is None:
        x = block_view(chain.base.read(chain.base.tensors[spec.name], piece.first, piece.count), spec)
    for step in chain.steps[start:]:
        if step.delta_parent is not None:
            p = rebuild_piece(step.delta_parent, piece, device, memo)
            ft = step.task_vector.decode(spec.name, piece.index, p)
            x = _apply_delta(x, p, ft, step.alpha(spec.name), device)
        else:
            ft = step.task_vector.decode(spec.name, piece.index, x)
            x = _merge(step.method, x, ft, step.alpha(spec.name), device)
        if trace is not None:
            trace.append(x)
    if _memo is not None and chain.steps and chain.steps[-1].manifest is not None:
        memo.clear()
        memo[chain.steps[-1].manifest] = x
    return x


def _apply_delta(x: torch.Tensor, p: torch.Tensor, f: torch.Tensor, alpha: float, device: torch.device) -> torch.Tensor:
    if device.type == "cpu" or not x.is_floating_point() or alpha == 0.0:
        return apply_delta(x, p, f, alpha)
    return apply_delta(_to(x, device), _to(p, device), _to(f, device), alpha).cpu()


def pipeline(items: Iterable[T], compute: Callable[[T], object], workers: int, lookahead: int) -> Iterator:
    """compute(item) for every item on a thread pool, yielded in input order, few in flight."""
    it = iter(items)
    # Parallelism comes from the chunks: torch's own intra-op threads on top of ours only wait on
    # each other, and on a busy machine that makes every kernel several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="skillbank") as pool:
        pending = deque(pool.submit(compute, item) for item in _take(it, lookahead))
        try:
            while pending:
                result = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(compute, nxt))
                yield result
        finally:
            for f in pending:
                f.cancel()
            torch.set_num_threads(threads)


def _take(it: Iterator[T], n: int) -> list[T]:
    out = []
    for _ in range(n):
        item = next(it, None)
        if item is None:
            break
        out.append(item)
    return out


@contextmanager
def checked(*chains: Chain):
    """Run a pass over chains whose objects are still being checked (store/verify.py).

    On success the checks are settled, so a corrupt object fails the pass before its result is
    kept; on failure, a corruption behind the failure is reported instead of its symptom.
    """
    try:
        yield
    except BaseException as e:
        for c in chains:
            c.blame(e)
        raise
    for c in chains:
        c.settle()


def materialize(chain: Chain, writer: CheckpointWriter | None, progress: Progress = None,
                options: Options = Options(), hasher: WeightsDigest | None = None) -> str:
    """Rebuild every tensor into `writer` (or nowhere, to verify) and return the weights digest.

    Pass `hasher=WeightsDigest(specs, sha256=True)` to get the SHA-256 too (from `hasher.sha256`);
    a plain checkout skips it, so it costs only the xxh3.
    """
    device = resolve_device(options.device)
    digest = hasher if hasher is not None else WeightsDigest(chain.specs)

    def compute(chunk: Chunk) -> list[tuple[Piece, torch.Tensor]]:
        return [(piece, rebuild_piece(chain, piece, device)) for piece in chunk.pieces]

    n = options.n_workers
    with checked(chain):
        for results in pipeline(plan(chain.specs, options.chunk_mb), compute, n, 2 * n):
            for piece, x in results:
                digest.update(x)
                if writer is not None:
                    writer.write(piece.spec.name, x)
                if progress:
                    progress(piece.nbytes)
    return digest.hexdigest()


@dataclass
class AddStats:
    digest: str = ""  # the merged child's weights
    sha256: str = ""  # the same bytes' SHA-256 (versions.sha256)
    finetuned_digest: str = ""
    raw_bytes: int = 0
    delta_sq: float = 0.0
    parent_sq: float = 0.0
    error_sq: float = 0.0

    @property
    def rel_norm(self) -> float:
        return math.sqrt(self.delta_sq) / math.sqrt(self.parent_sq) if self.parent_sq else 0.0

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.error_sq) / math.sqrt(self.delta_sq) if self.delta_sq else 0.0


def _sq(x: torch.Tensor) -> float:
    return float(torch.dot(x.reshape(-1), x.reshape(-1)))


def _measure(name: str, p: torch.Tensor, f: torch.Tensor, decoded: torch.Tensor) -> tuple[float, float, float]:
    """(||f - p||^2, ||p||^2, ||decoded - f||^2) in the compute dtype; refuses NaN/Inf in f."""
    wide = compute_dtype(p.dtype)
    pw, fw = p.to(wide), f.to(wide)
    delta_sq = _sq(fw - pw)
    if not math.isfinite(delta_sq) and not bool(torch.isfinite(fw).all()):
        raise ValidationError(f"finetuned tensor {name!r} contains NaN or Inf; refusing to store it")
    err_sq = 0.0 if decoded is f else _sq(decoded.to(wide) - fw)
    return delta_sq, _sq(pw), err_sq


def add_pass(parent: Chain, finetuned: Checkpoint, codec: Codec, tv: TaskVectorWriter, method: str,
             alphas: dict[str, float], groups: dict[str, str | None], progress: Progress = None,
             options: Options = Options(), keep: ObjectWriter | None = None) -> AddStats:
    """One pass that encodes the task vector, merges, and measures; nothing is committed here.

    With `keep`, the merged child is also streamed, canonically serialised, into that object:
    a keyframe, for the cost of one more write.
    """
    device = resolve_device(options.device)

    def compute(chunk: Chunk) -> list:
        out = []
        for piece in chunk.pieces:
            spec = piece.spec
            p = rebuild_piece(parent, piece, device)
            f = block_view(finetuned.read(spec.name, piece.first, piece.count), spec)
            data = codec.encode(p, f)
            # The merge is defined by what was stored, so later rebuilds give the same bytes.
            decoded = f if codec.lossless else codec.decode(data, p)
            norms = _measure(spec.name, p, f, decoded) if p.is_floating_point() else (0.0, 0.0, 0.0)
            child = _merge(method, p, decoded, alpha_for(alphas, groups.get(spec.name)), device)
            out.append((piece, data, f, child, norms))
        return out

    stats = AddStats()
    child_digest, ft_digest = WeightsDigest(parent.specs, sha256=True), WeightsDigest(parent.specs)
    if keep is not None:
        keep.write(header_bytes(canonical(parent.specs)))
    n = options.n_workers
    with checked(parent):
        for results in pipeline(plan(parent.specs, options.chunk_mb), compute, n, 2 * n):
            for piece, data, f, child, (delta_sq, parent_sq, err_sq) in results:
                tv.append(piece.spec.name, piece.spec.dtype, piece.spec.shape, data)
                ft_digest.update(f)
                child_digest.update(child)
                if keep is not None:
                    keep.write(as_bytes(child))
                stats.delta_sq += delta_sq
                stats.parent_sq += parent_sq
                stats.error_sq += err_sq
                stats.raw_bytes += piece.nbytes
                if progress:
                    progress(piece.nbytes)
    stats.digest, stats.sha256 = child_digest.digests()
    stats.finetuned_digest = ft_digest.hexdigest()
    return stats


def merge_checkpoints(parent: Checkpoint, finetuned: Checkpoint, method: str, alphas: dict[str, float],
                      groups: dict[str, str | None], writer: CheckpointWriter, options: Options = Options()) -> str:
    """Stream `method(parent, finetuned, alpha)` of two checkpoints on disk into `writer`.

    For merges that are tried and thrown away (an alpha sweep): nothing is recorded in a bank.
    """
    device = resolve_device(options.device)
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in parent]

    def compute(chunk: Chunk) -> list:
        out = []
        for piece in chunk.pieces:
            name = piece.spec.name
            p = block_view(parent.read(name, piece.first, piece.count), piece.spec)
            f = block_view(finetuned.read(name, piece.first, piece.count), piece.spec)
            out.append((piece, _merge(method, p, f, alpha_for(alphas, groups.get(name)), device)))
        return out

    digest = WeightsDigest(specs)
    n = options.n_workers
    for results in pipeline(plan(specs, options.chunk_mb), compute, n, 2 * n):
        for piece, x in results:
            digest.update(x)
            writer.write(piece.spec.name, x)
    return digest.hexdigest()


def replay_digests(chain: Chain, first: int, progress: Progress = None,
                   options: Options = Options()) -> list[Digests]:
    """The weights digests (xxh3, SHA-256) after each step `first`, `first + 1`, ... of `chain`, in one pass.

    For `rebuild --without`: every replayed version is measured while the new chain and the
    original one are rebuilt together block by block; nothing is written.
    """
    device = resolve_device(options.device)
    n = len(chain.steps) - first
    digests = [WeightsDigest(chain.specs, sha256=True) for _ in range(n)]

    def compute(chunk: Chunk) -> list:
        out = []
        for piece in chunk.pieces:
            trace: list = []
            rebuild_piece(chain, piece, device, trace=trace)
            out.append((piece, trace[first:]))
        return out

    w = options.n_workers
    with checked(chain):
        for results in pipeline(plan(chain.specs, options.chunk_mb), compute, w, 2 * w):
            for piece, xs in results:
                for d, x in zip(digests, xs):
                    d.update(x)
                if progress:
                    progress(piece.nbytes)
    return [d.digests() for d in digests]


def combine_pass(ancestor: Chain, sides: list[Chain], method: str, weights: list[float], params: dict,
                 keep: ObjectWriter, progress: Progress = None, options: Options = Options()) -> Digests:
    """Stream `COMBINERS[method]` of the ancestor and each side, block by block, into `keep`.

    `keep` receives the canonical serialisation (a keyframe object); returns its weights digests.
    Combining runs on the CPU (the DARE mask is built there; the arithmetic is the same anywhere).
    """
    fn = COMBINERS[method]
    device = resolve_device(options.device)

    def compute(chunk: Chunk) -> list:
        out = []
        for piece in chunk.pieces:
            a = rebuild_piece(ancestor, piece, device)
            ss = [rebuild_piece(c, piece, device) for c in sides]
            out.append((piece, fn(a, ss, weights, params, (piece.spec.name, piece.first))))
        return out

    digest = WeightsDigest(ancestor.specs, sha256=True)
    keep.write(header_bytes(canonical(ancestor.specs)))
    w = options.n_workers
    with checked(ancestor, *sides):
        for results in pipeline(plan(ancestor.specs, options.chunk_mb), compute, w, 2 * w):
            for piece, x in results:
                digest.update(x)
                keep.write(as_bytes(x))
                if progress:
                    progress(piece.nbytes)
    return digest.digests()


def copy_canonical(ckpt: Checkpoint, out: ObjectWriter, progress: Progress = None,
                   options: Options = Options()) -> Digests:
    """Stream a checkpoint into its canonical single-file serialisation, refusing NaN and Inf.

    Returns the serialisation's digests; the xxh3 equals the object's own digest.
    """
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in ckpt]
    digest = WeightsDigest(specs, sha256=True)

    def compute(chunk: Chunk) -> list:
        out_ = []
        for piece in chunk.pieces:
            x = ckpt.read(piece.spec.name, piece.first, piece.count)
            if not all_finite(x):
                raise CheckpointError(f"{ckpt.source}: tensor {piece.spec.name!r} contains NaN or Inf")
            out_.append((piece, x))
        return out_

    out.write(header_bytes(canonical(specs)))
    n = options.n_workers
    for results in pipeline(plan(specs, options.chunk_mb), compute, n, 2 * n):
        for piece, x in results:
            data = as_bytes(x)
            out.write(data)
            digest.update(data)
            if progress:
                progress(piece.nbytes)
    return digest.digests()
