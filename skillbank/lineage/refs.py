"""Refs: names for versions. Resolution (vN, branch, tag, HEAD, REF~k, digest prefix) and moves.

A ref moves only by compare-and-swap (UPDATE ... WHERE version_id = the one we read), inside the
transaction that writes the reflog row, so two writers can never lose each other's work: the
second finds the row changed and fails with BranchMoved.
"""

from __future__ import annotations

import re

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from skillbank.db.models import Ref, RefLog, Version
from skillbank.errors import BranchMoved, IntegrityError, RefError
from skillbank.lineage.head import Head

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}$")
VERSION_RE = re.compile(r"^v(\d+)$")
ANCESTOR_RE = re.compile(r"^(?P<base>.+?)~(?P<k>\d*)$")
HEX_RE = re.compile(r"^[0-9a-f]{6,32}$")


def check_name(name: str, kind: str) -> str:
    if (not NAME_RE.match(name) or VERSION_RE.match(name) or name == "HEAD" or ".." in name
            or name.endswith(("/", ".")) or "~" in name):
        raise RefError(f"invalid {kind} name {name!r} (letters, digits, . _ / -; not vN or HEAD)")
    return name


def get_ref(s: Session, name: str) -> Ref | None:
    return s.get(Ref, name)


def _count(digits: str) -> int:
    """An id or ancestor count; more digits than any int64 (or than int() converts) is 2**63."""
    return int(digits) if len(digits) <= 19 else 2**63


def _by_id(s: Session, vid: int, ref: str) -> Version:
    v = s.get(Version, vid) if 0 <= vid < 2**63 else None  # larger ids overflow the database's integer
    if v is None:
        raise RefError(f"unknown version {ref!r}")
    return v


def resolve(s: Session, ref: str, head: Head | None = None) -> Version:
    """The version a ref names; RefError with one line when it names none or several."""
    ref = ref.strip()
    if not ref:
        raise RefError("empty ref")
    m = ANCESTOR_RE.match(ref)
    if m:
        v = resolve(s, m["base"], head)
        seen = {v.id}
        for _ in range(_count(m["k"] or "1")):
            if v.parent_id is None:
                raise RefError(f"{ref!r} goes back past the base version v0")
            v = _by_id(s, v.parent_id, ref)
            _no_cycle(v, seen)
        return v
    if ref == "HEAD":
        if head is None:
            raise RefError("HEAD is not set in this bank")
        if head.branch:
            r = get_ref(s, head.branch)
            if r is None:
                raise RefError(f"HEAD points at branch {head.branch!r}, which does not exist")
            return _by_id(s, r.version_id, ref)
        return _by_id(s, head.version, ref)
    m = VERSION_RE.match(ref)
    if m:
        return _by_id(s, _count(m[1]), ref)
    r = get_ref(s, ref)
    if r is not None:
        return _by_id(s, r.version_id, ref)
    if HEX_RE.match(ref):
        hits = s.scalars(select(Version).where(Version.digest.startswith(ref))).all()
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            names = ", ".join(v.label for v in hits[:5])
            raise RefError(f"digest prefix {ref!r} is ambiguous ({names}); give more characters")
    raise RefError(f"unknown ref {ref!r} (expected vN, a branch, a tag, REF~k or a digest prefix)")


def log_move(s: Session, name: str, old: int | None, new: int, action: str, author: str,
             message: str | None = None) -> None:
    s.add(RefLog(ref=name, old_version_id=old, new_version_id=new, action=action, author=author,
                 message=message))


def create_ref(s: Session, name: str, kind: str, version_id: int, action: str, author: str,
               message: str | None = None) -> Ref:
    check_name(name, kind)
    existing = get_ref(s, name)
    if existing is not None:
        raise RefError(f"{existing.kind} {name!r} already exists (at v{existing.version_id})")
    r = Ref(name=name, kind=kind, version_id=version_id)
    s.add(r)
    s.flush()
    log_move(s, name, None, version_id, action, author, message)
    return r


def move_branch(s: Session, name: str, old: int, new: int, action: str, author: str,
                message: str | None = None) -> None:
    """Compare-and-swap: move `name` from `old` to `new`, or raise BranchMoved."""
    result = s.execute(
        update(Ref).where(Ref.name == name, Ref.kind == "branch", Ref.version_id == old)
        .values(version_id=new)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        now = get_ref(s, name)
        where = f"v{now.version_id}" if now is not None else "nowhere"
        raise BranchMoved(
            f"branch {name!r} moved to {where} while this command ran (expected v{old}); "
            "nothing was changed: retry"
        )
    log_move(s, name, old, new, action, author, message)


def _no_cycle(v: Version, seen: set[int]) -> None:
    """Versions are written once with an existing parent, so only a tampered database loops."""
    if v.id in seen:
        raise IntegrityError(f"the parents of {v.label} form a cycle: the database was edited by hand; "
                             "restore it from a backup")
    seen.add(v.id)


def ancestors(s: Session, v: Version) -> list[Version]:
    """v, its parent, ..., the base."""
    out, seen = [v], {v.id}
    while out[-1].parent_id is not None:
        out.append(_by_id(s, out[-1].parent_id, out[-1].label))
        _no_cycle(out[-1], seen)
    return out


def reachable(s: Session, v: Version) -> list[Version]:
    """Every version reachable from `v` through first and second parents (merges have two)."""
    seen: dict[int, Version] = {}
    todo = [v]
    while todo:
        row = todo.pop()
        if row.id in seen:
            continue
        seen[row.id] = row
        todo += [_by_id(s, p, row.label) for p in (row.parent_id, row.second_parent_id) if p is not None]
    return list(seen.values())
