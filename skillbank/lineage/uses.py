"""Which versions need which objects: the index behind "affects v2, v3 (main)".

A version's rebuild reads its manifest; the manifests it is rebuilt from (its parent's, unless it
is kept whole, and for a delta step the version its task vector was encoded against) and
everything they read in turn; their base, task vectors and config; and any keyframe on the way. So
an object affects the versions that read it directly and every version rebuilt from those.

The index is built from the database rows AND the manifests that can be read here, so a missing
or corrupt manifest still has its versions (its row names it) and its descendants (their
manifests, or their rows' parent links, name it). It reads only local objects and never fetches.
"""

from __future__ import annotations

import json

import xxhash
from sqlalchemy import select
from sqlalchemy.orm import Session

from skillbank.db.models import Keyframe, Ref, Skill, TaskVector, Version
from skillbank.store.objects import ObjectStore
from skillbank.tensors import TensorSpec
from skillbank.tensors.writer import canonical, header_bytes

MAX_SHOWN = 10  # versions named in a one-line error before the list is shortened


def _local_json(store: ObjectStore, digest: str) -> dict | None:
    """A manifest as it is here, or None when it is absent, damaged or not JSON."""
    try:
        data = store.path(digest).read_bytes()
    except (OSError, ValueError):
        return None
    if xxhash.xxh3_128_hexdigest(data) != digest:
        return None
    try:
        m = json.loads(data)
    except ValueError:
        return None
    return m if isinstance(m, dict) else None


def canonical_size(tensors: list[dict]) -> int:
    """Bytes of the canonical serialisation of these tensor specs (a base or keyframe object)."""
    specs = canonical([TensorSpec.from_json(r) for r in tensors])
    return len(header_bytes(specs)) + sum(s.nbytes for s in specs)


class ObjectUses:
    def __init__(self) -> None:
        self.users: dict[str, set[int]] = {}  # object -> versions whose rebuild reads it directly
        self.dependents: dict[int, set[int]] = {}  # version -> versions rebuilt from it
        self.rows: dict[str, list[str]] = {}  # object -> the database rows that name it
        self.sizes: dict[str, int] = {}  # object -> its size, where a row or a manifest says
        self.refs: dict[int, list[str]] = {}  # version -> branch and tag names
        self.required_bases: set[str] = set()  # objects some manifest rebuilds from (not a cache)
        self.keyframes: dict[str, list[int]] = {}  # keyframe object -> versions with a keyframe row
        self.unreadable: list[str] = []  # manifests absent or damaged here: what they name is unknown

    # ------------------------------------------------------------------ building

    def _use(self, digest: str | None, version: int) -> None:
        if digest:
            self.users.setdefault(digest, set()).add(version)

    def _depend(self, parent: int, child: int) -> None:
        if parent != child:
            self.dependents.setdefault(parent, set()).add(child)

    def _row(self, digest: str, text: str) -> None:
        self.rows.setdefault(digest, []).append(text)

    @classmethod
    def build(cls, s: Session, store: ObjectStore) -> ObjectUses:
        u = cls()
        versions = {v.id: v for v in s.scalars(select(Version).order_by(Version.id))}
        by_manifest: dict[str, list[int]] = {}
        for v in versions.values():
            by_manifest.setdefault(v.manifest, []).append(v.id)
        keyframe_ids = set(s.scalars(select(Keyframe.version_id)))
        keyframe_digests = {versions[i].digest for i in keyframe_ids if i in versions}
        for r in s.scalars(select(Ref).order_by(Ref.name)):
            u.refs.setdefault(r.version_id, []).append(r.name)
        for tv in s.scalars(select(TaskVector).order_by(TaskVector.id)):
            u._row(tv.object, f"task_vectors row {tv.id}")
            u.sizes[tv.object] = tv.stored_bytes
        tv_of_skill = dict(s.execute(select(Skill.id, TaskVector.object)
                                     .join(TaskVector, Skill.task_vector_id == TaskVector.id)).all())

        def delta_parent(v: Version) -> int | None:
            """The version a replayed step's task vector was encoded against (rebuild --without)."""
            seen = set()
            while v.rebuilt_from_id is not None and v.rebuilt_from_id in versions and v.id not in seen:
                seen.add(v.id)
                v = versions[v.rebuilt_from_id]
            return v.parent_id

        for v in versions.values():
            u._use(v.manifest, v.id)
            u._row(v.manifest, f"versions row v{v.id} (manifest)")
            if v.id in keyframe_ids:
                u._row(v.digest, f"keyframes row v{v.id}")
                u.keyframes.setdefault(v.digest, []).append(v.id)
            if v.digest in keyframe_digests:
                u._use(v.digest, v.id)
            if v.skill_id in tv_of_skill:
                u._use(tv_of_skill[v.skill_id], v.id)
            if v.parent_id is None or v.method.startswith("merge:"):
                u._use(v.digest, v.id)  # the base, or a branch merge kept whole: rebuilt from itself
                u.required_bases.add(v.digest)
            else:
                u._depend(v.parent_id, v.id)
            if v.rebuilt_from_id is not None and (dp := delta_parent(versions[v.rebuilt_from_id])) is not None:
                u._depend(dp, v.id)
            m = _local_json(store, v.manifest)
            if m is not None:
                u._add_manifest(m, v.id, by_manifest)
            elif v.manifest not in u.unreadable:
                u.unreadable.append(v.manifest)
        return u

    def _add_manifest(self, m: dict, vid: int, by_manifest: dict[str, list[int]]) -> None:
        step = m.get("step") or {}
        for d in (m.get("base"), m.get("config"), m.get("train_config"), step.get("task_vector")):
            self._use(d, vid)
        if m.get("base"):
            self.required_bases.add(m["base"])
        elif m.get("parent_manifest"):
            for p in by_manifest.get(m["parent_manifest"], []):
                self._depend(p, vid)
        for p in by_manifest.get(step.get("delta_parent_manifest") or "", []):
            self._depend(p, vid)
        if isinstance(m.get("tensors"), list):
            try:
                size = canonical_size(m["tensors"])
            except (KeyError, TypeError, ValueError):
                return
            for d in (m.get("base"), m.get("digest")):
                if d:
                    self.sizes.setdefault(d, size)

    # ------------------------------------------------------------------ questions

    def referenced(self) -> set[str]:
        """Every object a version or a database row names."""
        return set(self.users) | set(self.rows)

    def affected(self, digest: str) -> list[int]:
        """Ids of the versions whose rebuild needs `digest`, oldest first."""
        todo = list(self.users.get(digest, ()))
        seen = set(todo)
        while todo:
            for child in self.dependents.get(todo.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return sorted(seen)

    def optional_keyframe(self, digest: str) -> bool:
        """A keyframe that only caches a version (rebuildable from its chain), not a chain's base."""
        return digest in self.keyframes and digest not in self.required_bases

    def labels(self, ids: list[int]) -> list[str]:
        return [f"v{i}" for i in ids]

    def describe(self, ids: list[int]) -> str:
        """"v2, v3, v5 (main)": the versions with their refs, shortened when there are many."""
        if not ids:
            return "no recorded version"

        def one(i: int) -> str:
            return f"v{i} ({', '.join(self.refs[i])})" if self.refs.get(i) else f"v{i}"

        if len(ids) <= MAX_SHOWN:
            return ", ".join(one(i) for i in ids)
        head, tail = ids[:4], ids[-4:]
        return (", ".join(one(i) for i in head) + f", ... {len(ids) - 8} more ..., "
                + ", ".join(one(i) for i in tail) + f" ({len(ids)} versions)")
