"""A version as a chain: the base object, then each step's task vector and alphas, in order.

Everything needed to rebuild a version is in its manifest object and its ancestors' manifests,
so a rebuild never depends on mutable database state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from skillbank.codecs import TaskVectorReader
from skillbank.errors import IntegrityError
from skillbank.store import ObjectStore
from skillbank.store.verify import Checks
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


class Opened:
    """The readers one rebuild opened, each object once (nested chains share them), and the
    background checks of their bytes (store/verify.py)."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self.readers: dict = {}
        self.checks = Checks()

    def base(self, digest: str) -> SafetensorsFile:
        key = ("base", digest)
        if key not in self.readers:
            self.readers[key] = SafetensorsFile(self.checks.start(self.store, digest), mapped=True)
        return self.readers[key]

    def task_vector(self, digest: str) -> TaskVectorReader:
        key = ("tv", digest)
        if key not in self.readers:
            self.readers[key] = TaskVectorReader(self.store, digest, self.checks.start(self.store, digest))
        return self.readers[key]

    def close(self) -> None:
        self.checks.cancel()
        for r in self.readers.values():
            r.close()
        self.readers = {}


@dataclass
class Chain:
    specs: list[TensorSpec]
    base: SafetensorsFile
    steps: list[Step] = field(default_factory=list)
    # The readers behind the chain; closed by the chain that opened them (`owns`), not by the
    # nested (delta-parent) chains that share them. None: the chain owns its base and readers.
    opened: Opened | None = None
    owns: bool = True

    def settle(self) -> None:
        """Raise if an object this chain read is corrupt: before anything it produced is kept."""
        if self.opened is not None:
            self.opened.checks.settle()

    def blame(self, cause: BaseException) -> None:
        """A pass over this chain failed with `cause`: raise the corruption behind it, if any."""
        if self.opened is not None:
            self.opened.checks.blame(cause)

    def close(self) -> None:
        if not self.owns:
            return
        if self.opened is not None:
            self.opened.close()
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
               opened: Opened | None = None) -> Chain:
    """The chain to rebuild `manifest`; with `keyframes`, it starts at the nearest one.

    Objects are checked while the pass streams them: a pass over the chain must `settle()` it
    before keeping what it produced (merge/engine.py does). Delta steps open the chain of the
    version their task vector was encoded against; nested chains share `opened`.
    """
    owns = opened is None
    pool = Opened(store) if opened is None else opened
    try:
        ms = _manifest_chain(store, manifest, keyframes)
        chain = Chain([TensorSpec.from_json(r) for r in ms[-1][1]["tensors"]],
                      pool.base(ms[0][1]["base"] or ms[0][1]["digest"]), opened=pool, owns=owns)
        for digest, m in ms[1:]:
            step = m["step"]
            tv = pool.task_vector(step["task_vector"])
            apply = step.get("apply", "merge")
            if apply not in ("merge", "delta"):
                raise IntegrityError(f"manifest {digest}: unknown step kind {apply!r}")
            delta_parent = (open_chain(store, step["delta_parent_manifest"], keyframes, pool)
                            if apply == "delta" else None)
            chain.steps.append(Step(step["method"], tv, step["alphas"], step["groups"], apply, delta_parent,
                                    digest))
    except BaseException as e:
        try:
            pool.checks.blame(e)
        finally:
            if owns:
                pool.close()
        raise
    return chain
