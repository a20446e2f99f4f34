"""A version as a chain: the base object, then each step's task vector and alphas, in order.

Everything needed to rebuild a version is in its manifest object and its ancestors' manifests,
so a rebuild never depends on mutable database state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from skillbank.codecs import TaskVectorReader
from skillbank.errors import IntegrityError
from skillbank.store import ObjectStore
from skillbank.tensors import SafetensorsFile, TensorSpec

MANIFEST_FORMAT = "skillbank.version/1"


def alpha_for(alphas: dict[str, float], group: str | None) -> float:
    if "*" in alphas:
        return alphas["*"]
    return alphas[group or "other"]


@dataclass
class Step:
    """One step of a chain.

    A plain step (`apply` "merge") decodes its task vector against the block it is applied to and
    merges with `method`. A delta step (`apply` "delta", written by `rebuild --without`) re-applies
    a task vector encoded against ANOTHER version, `delta_parent` (the chain of the manifest
    `step["delta_parent_manifest"]`): the finetuned block is decoded against that version's block,
    and `alpha * (finetuned - delta_parent)` is added to the block (methods.apply_delta).
    """

    method: str
    task_vector: TaskVectorReader
    alphas: dict[str, float]
    groups: dict[str, str | None]
    apply: str = "merge"
    delta_parent: "Chain | None" = None
    manifest: str | None = None  # the digest of the manifest this step produces

    def alpha(self, name: str) -> float:
        return alpha_for(self.alphas, self.groups.get(name))


@dataclass
class Chain:
    specs: list[TensorSpec]
    base: SafetensorsFile
    steps: list[Step] = field(default_factory=list)
    # Set by open_chain: the readers it opened, shared with nested (delta-parent) chains and
    # closed once, by the outermost chain. None: the chain owns its base and its steps' readers.
    closers: list | None = None

    def close(self) -> None:
        if self.closers is not None:
            for c in self.closers:
                c.close()
            self.closers = []
            return
        self.base.close()
        for s in self.steps:
            s.task_vector.close()


def manifests_of(store: ObjectStore, manifest: str, keyframes: frozenset[str] = frozenset()) -> list[dict]:
    """The manifests from the base (or the nearest keyframe) to this version.

    A keyframe is a version whose weights are kept whole in the store: its canonical
    serialisation's digest is the version's weights digest, so it serves as a base as it is.
    """
    return [m for _, m in _manifest_chain(store, manifest, keyframes)]


def _manifest_chain(store: ObjectStore, manifest: str, keyframes: frozenset[str]) -> list[tuple[str, dict]]:
    """(digest, manifest) pairs from the base (or the nearest keyframe) to `manifest`.

    A manifest whose `base` is set is kept whole (the base, or a branch merge): the walk stops there.
    """
    out, seen = [], set()
    digest: str | None = manifest
    while digest:
        if digest in seen:
            raise IntegrityError(f"manifest {digest} is part of a cycle")
        seen.add(digest)
        m = store.get_json(digest)
        if m.get("format") != MANIFEST_FORMAT:
            raise IntegrityError(f"object {digest} is not a version manifest")
        out.append((digest, m))
        if m.get("base") or (m.get("digest") in keyframes and store.has(m["digest"])):
            break
        digest = m.get("parent_manifest")
    out.reverse()
    return out


def open_chain(store: ObjectStore, manifest: str, keyframes: frozenset[str] = frozenset(),
               _pool: dict | None = None) -> Chain:
    """The chain to rebuild `manifest`; with `keyframes`, it starts at the nearest one.

    Delta steps open the chain of the version their task vector was encoded against; those
    nested chains share this one's readers (`_pool`), so each object is opened once.
    """
    top = _pool is None
    pool: dict = {} if top else _pool

    def opened(kind: str, digest: str, make):
        if (kind, digest) not in pool:
            pool[(kind, digest)] = make()
        return pool[(kind, digest)]

    try:
        ms = _manifest_chain(store, manifest, keyframes)
        start = ms[0][1]["base"] or ms[0][1]["digest"]
        base = opened("base", start, lambda: SafetensorsFile(store.open_verified(start)))
        chain = Chain([TensorSpec.from_json(r) for r in ms[-1][1]["tensors"]], base, closers=[])
        for digest, m in ms[1:]:
            step = m["step"]
            tv = opened("tv", step["task_vector"], lambda: TaskVectorReader(store, step["task_vector"]))
            apply = step.get("apply", "merge")
            if apply not in ("merge", "delta"):
                raise IntegrityError(f"manifest {digest}: unknown step kind {apply!r}")
            delta_parent = (open_chain(store, step["delta_parent_manifest"], keyframes, pool)
                            if apply == "delta" else None)
            chain.steps.append(Step(step["method"], tv, step["alphas"], step["groups"], apply, delta_parent,
                                    digest))
    except BaseException:
        if top:
            for c in pool.values():
                c.close()
        raise
    if top:
        chain.closers = list(pool.values())
    return chain
