"""Which version, and which skills, does a checkpoint contain?

The digest decides: a checkpoint whose canonical weights digests equal a version's IS that
version, whatever its metadata says. SHA-256 decides; an xxh3 match alone only names a candidate,
since xxh3 does not resist someone crafting a collision. Otherwise the answer is estimated. In a
RETAIN chain `theta_n = theta_0 + sum_i alpha_i * tau_i`, with `tau_i = finetuned_i - parent_i`, so a
checkpoint's offset from the base, sampled at fixed random coordinates, is regressed on every
registered task vector: each coefficient estimates how much of that skill it holds (its alpha),
and the residual says how much of the change no registered skill explains. Only a fixed sample of
blocks is read, so memory and time stay bounded whatever the model's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import xxhash

from skillbank.codecs import TaskVectorReader
from skillbank.errors import IntegrityError
from skillbank.merge.chain import alpha_for, manifests_of
from skillbank.merge.methods import METHODS, apply_delta
from skillbank.merge.plan import Piece, block_view, blocks
from skillbank.store import ObjectStore
from skillbank.tensors import Checkpoint, Digests, SafetensorsFile, TensorSpec, WeightsDigest
from skillbank.tensors.writer import canonical

SAMPLE_BLOCKS = 48  # blocks read per audit
SAMPLE_PER_BLOCK = 4096  # coordinates kept per block
MIN_SIGNAL = 256  # coordinates with a task-vector move well above rounding, to fit on them alone
KNOWN_PREFIXES = ("model.", "policy.", "module.", "_orig_mod.", "base_model.model.")


def checkpoint_digests(ckpt: Checkpoint, sha256: bool = True) -> Digests:
    """The canonical weights digests (xxh3, SHA-256) of any checkpoint layout, in one read.

    The SHA-256 is what decides an exact match: an xxh3 equality alone may be a forged collision.
    """
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in ckpt]
    digest = WeightsDigest(specs, sha256=sha256)
    for spec in canonical(specs):
        for _, first, count in blocks(spec):
            digest.update(ckpt.read(spec.name, first, count))
    return digest.digests()


def checkpoint_digest(ckpt: Checkpoint, names: dict[str, str] | None = None) -> str:
    """The canonical weights digest of any checkpoint layout (single file, shards, any metadata)."""
    return checkpoint_digests(ckpt, sha256=False).xxh3


def match_names(bank_names: list[str], ckpt_names: list[str]) -> dict[str, str] | None:
    """bank name -> checkpoint name, allowing one known prefix added or removed; None if no fit."""
    have = set(ckpt_names)
    if set(bank_names) == have:
        return {n: n for n in bank_names}
    for p in KNOWN_PREFIXES:
        if all(p + n in have for n in bank_names) and len(have) == len(bank_names):
            return {n: p + n for n in bank_names}
        if all(n.startswith(p) for n in bank_names) and {n[len(p):] for n in bank_names} == have:
            return {n: n[len(p):] for n in bank_names}
    return None


@dataclass
class VersionNode:
    id: int
    parent_id: int | None
    manifest: str


def _sample_pieces(specs: list[TensorSpec], seed: int) -> list[Piece]:
    """A fixed, size-weighted choice of float blocks: the same coordinates on every audit."""
    pieces = [Piece(s, i, f, c) for s in canonical(specs) if s.dtype.startswith(("F", "BF"))
              for i, f, c in blocks(s) if c > 0]
    if len(pieces) <= SAMPLE_BLOCKS:
        return pieces
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([p.count for p in pieces], dtype=torch.float64)
    chosen = torch.multinomial(weights, SAMPLE_BLOCKS, replacement=False, generator=g)
    return [pieces[i] for i in sorted(chosen.tolist())]


def _coords(piece: Piece) -> torch.Tensor:
    key = xxhash.xxh64_intdigest(f"{piece.spec.name}:{piece.index}".encode()) & 0x7FFFFFFF
    g = torch.Generator().manual_seed(key)
    k = min(SAMPLE_PER_BLOCK, piece.count)
    return torch.randperm(piece.count, generator=g)[:k]


class Sampler:
    """Every version of the bank at the sampled coordinates, rebuilt block by block down the DAG."""

    def __init__(self, store: ObjectStore, nodes: list[VersionNode]):
        self.store = store
        self.nodes = sorted(nodes, key=lambda n: n.id)  # a parent is always older than its child
        for n in self.nodes:  # ... unless the database was edited by hand (a cycle, a parent from the future)
            if n.parent_id is not None and n.parent_id >= n.id:
                raise IntegrityError(f"v{n.id} has parent v{n.parent_id}, which is not older: the database was "
                                     "edited by hand; restore it from a backup")
        base_manifest = manifests_of(store, self.nodes[0].manifest)[0]
        self.base = SafetensorsFile(store.open_verified(base_manifest["base"]))
        self.steps: dict[int, dict] = {}
        self.readers: dict[int, TaskVectorReader] = {}
        self.whole: dict[int, SafetensorsFile] = {}  # versions kept whole: branch merges
        self.by_manifest = {n.manifest: n.id for n in self.nodes}
        for n in self.nodes[1:]:
            m = store.get_json(n.manifest)
            step = m["step"]
            if step is None:
                self.whole[n.id] = SafetensorsFile(store.open_verified(m["base"] or m["digest"]))
                continue
            self.steps[n.id] = step
            self.readers[n.id] = TaskVectorReader(store, step["task_vector"])
        # One regression column per registered task vector; a delta step (rebuild --without)
        # re-applies a task vector that already has its column.
        self.tau_ids = [k for k, st in self.steps.items() if st.get("apply", "merge") != "delta"]

    def close(self) -> None:
        self.base.close()
        for r in (*self.readers.values(), *self.whole.values()):
            r.close()

    def block(self, piece: Piece, idx: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(weights of each version, task vector of each skill) at `idx` of this block, in fp64."""
        spec = piece.spec
        full = {self.nodes[0].id: block_view(self.base.read(self.base.tensors[spec.name], piece.first,
                                                            piece.count), spec)}
        values, taus = {}, {}
        for n in self.nodes:
            if n.id in self.whole:
                f = self.whole[n.id]
                full[n.id] = block_view(f.read(f.tensors[spec.name], piece.first, piece.count), spec)
            elif n.id in self.steps:
                step, parent = self.steps[n.id], full[n.parent_id]
                alpha = alpha_for(step["alphas"], step["groups"].get(spec.name))
                if step.get("apply", "merge") == "delta":
                    encoded_against = full[self.by_manifest[step["delta_parent_manifest"]]]
                    ft = self.readers[n.id].decode(spec.name, piece.index, encoded_against)
                    full[n.id] = apply_delta(parent, encoded_against, ft, alpha)
                else:
                    ft = self.readers[n.id].decode(spec.name, piece.index, parent)
                    full[n.id] = METHODS[step["method"]](parent, ft, alpha)
                    taus[n.id] = ft.reshape(-1)[idx].double() - parent.reshape(-1)[idx].double()
            values[n.id] = full[n.id].reshape(-1)[idx].double()
        return values, taus


def _ulp(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """The spacing of the stored dtype's grid around each value (fp64)."""
    from skillbank.tensors.dtypes import to_torch

    eps = torch.finfo(to_torch(dtype)).eps
    _, exp = torch.frexp(values.abs().clamp_min(torch.finfo(to_torch(dtype)).tiny))
    return eps * torch.pow(2.0, (exp - 1).double())


def estimate(store: ObjectStore, nodes: list[VersionNode], ckpt: Checkpoint, names: dict[str, str],
             specs: list[TensorSpec], seed: int = 0) -> dict:
    """Nearest version and per-skill coefficients from a bounded sample of coordinates."""
    sampler = Sampler(store, nodes)
    xs, ulps = [], []
    vals, taus = {n.id: [] for n in nodes}, {k: [] for k in sampler.tau_ids}
    try:
        for piece in _sample_pieces(specs, seed):
            idx = _coords(piece)
            v, t = sampler.block(piece, idx)
            x = ckpt.read(names[piece.spec.name], piece.first, piece.count).reshape(-1)[idx].double()
            xs.append(x)
            ulps.append(_ulp(v[sampler.nodes[0].id], piece.spec.dtype))
            for k in vals:
                vals[k].append(v[k])
            for k in taus:
                taus[k].append(t[k])
    finally:
        sampler.close()
    x = torch.cat(xs)
    if not bool(torch.isfinite(x).all()):
        return {"distances": {}, "coefficients": {}, "residual": math.inf, "samples": int(x.numel())}
    base_id = sampler.nodes[0].id
    base = torch.cat(vals[base_id])
    offset = x - base
    scale = float(offset.norm()) or 1.0
    dist = {k: float((x - torch.cat(v)).norm()) / max(float(torch.cat(v).norm()), 1e-30) for k, v in vals.items()}
    coefficients, residual = {}, 0.0
    if taus:
        ids = sorted(taus)
        design = torch.stack([torch.cat(taus[k]) for k in ids], dim=1)
        # Where every task vector moves a weight by a few ulps at most, rounding to the stored
        # dtype erases most of a re-merge's alpha; fit on the coordinates that carry signal.
        signal = design.abs().amax(dim=1) >= 4 * torch.cat(ulps)
        if int(signal.sum()) >= MIN_SIGNAL:
            design, offset = design[signal], offset[signal]
            scale = float(offset.norm()) or 1.0
        sol = torch.linalg.lstsq(design, offset.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        coefficients = {k: float(c) for k, c in zip(ids, sol)}
        residual = float((offset - design @ sol).norm()) / scale if float(offset.norm()) else 0.0
    return {"distances": dist, "coefficients": coefficients, "residual": residual, "samples": int(x.numel())}
