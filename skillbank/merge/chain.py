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
    method: str
    task_vector: TaskVectorReader
    alphas: dict[str, float]
    groups: dict[str, str | None]

    def alpha(self, name: str) -> float:
        return alpha_for(self.alphas, self.groups.get(name))


@dataclass
class Chain:
    specs: list[TensorSpec]
    base: SafetensorsFile
    steps: list[Step] = field(default_factory=list)

    def close(self) -> None:
        self.base.close()
        for s in self.steps:
            s.task_vector.close()


def manifests_of(store: ObjectStore, manifest: str, keyframes: frozenset[str] = frozenset()) -> list[dict]:
    """The manifests from the base (or the nearest keyframe) to this version.

    A keyframe is a version whose weights are kept whole in the store: its canonical
    serialisation's digest is the version's weights digest, so it serves as a base as it is.
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
        out.append(m)
        if m.get("digest") in keyframes and store.has(m["digest"]):
            break
        digest = m.get("parent_manifest")
    out.reverse()
    return out


def open_chain(store: ObjectStore, manifest: str, keyframes: frozenset[str] = frozenset()) -> Chain:
    """The chain to rebuild `manifest`; with `keyframes`, it starts at the nearest one."""
    ms = manifests_of(store, manifest, keyframes)
    start = ms[0]["base"] or ms[0]["digest"]
    base = SafetensorsFile(store.open_verified(start))
    chain = Chain([TensorSpec.from_json(r) for r in ms[-1]["tensors"]], base)
    try:
        for m in ms[1:]:
            step = m["step"]
            chain.steps.append(Step(step["method"], TaskVectorReader(store, step["task_vector"]),
                                    step["alphas"], step["groups"]))
    except BaseException:
        chain.close()
        raise
    return chain
