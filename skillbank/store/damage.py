"""What is wrong with a stored object, and putting it right from a remote.

Reads only detect: they raise IntegrityError and change nothing. Changing the store is left to
`fsck --repair`, which replaces a damaged object only once a remote has served a verified copy,
and moves the damaged copy to `lost+found/` rather than deleting it: it is evidence (of a failing
disk, a bad copy, tampering) that a person may want to look at.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from skillbank.errors import IntegrityError, SkillbankError
from skillbank.store.objects import ObjectStore
from skillbank.tensors.writer import fsync_dir

LOST_AND_FOUND = "lost+found"
MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is not trusted to describe a size


@dataclass(frozen=True)
class Damage:
    """One object that cannot be used: missing, truncated (shorter than it must be) or corrupt."""

    digest: str
    kind: str  # "missing" | "truncated" | "corrupt"
    size: int | None = None  # bytes on disk
    expected: int | None = None  # bytes it should have, where known

    def describe(self) -> str:
        if self.kind == "missing":
            return "missing"
        if self.kind == "truncated":
            return f"truncated ({self.size} of {self.expected} bytes)"
        return "corrupt (bytes do not match digest)"

    def sentence(self) -> str:
        """The start of a one-line error: `object X is ...`."""
        if self.kind == "missing":
            return f"object {self.digest} is missing"
        if self.kind == "truncated":
            return f"object {self.digest} is truncated ({self.size} of {self.expected} bytes)"
        return str(ObjectStore.corrupt(self.digest))


def _self_described_size(path: Path, size: int) -> int | None:
    """The size a safetensors object declares in its header (the base and keyframes are ones),
    so truncation shows even where no database row records the size."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > min(size, MAX_HEADER):
                return None
            header = json.loads(f.read(n))
        ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def diagnose(store: ObjectStore, digest: str, expected_size: int | None = None) -> Damage | None:
    """None when the local copy is whole; else what is wrong with it. Never fetches."""
    path = store.path(digest)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Damage(digest, "missing")
    if store.verify(digest):
        return None
    expected = expected_size or _self_described_size(path, size)
    if expected is not None and size < expected:
        return Damage(digest, "truncated", size, expected)
    return Damage(digest, "corrupt", size, expected)


def quarantine(store: ObjectStore, digest: str) -> Path:
    """Move the local copy of `digest` to lost+found/<digest>.<UTC time>; its new path."""
    src = store.path(digest)
    folder = store.root / LOST_AND_FOUND
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dst = folder / f"{digest}.{stamp}"
    n = 1
    while dst.exists():
        n += 1
        dst = folder / f"{digest}.{stamp}.{n}"
    os.replace(src, dst)
    fsync_dir(folder)
    fsync_dir(src.parent)
    return dst


def unquarantine(store: ObjectStore, digest: str, moved: Path) -> None:
    """Put a quarantined copy back when nothing better was found: the bank is left as it was."""
    dst = store.path(digest)
    if not dst.exists():
        os.replace(moved, dst)
        fsync_dir(dst.parent)


@dataclass
class Restored:
    """What `restore` did for one object."""

    digest: str
    source: str | None = None  # the remote whose verified copy is now in the store
    moved_to: Path | None = None  # where the damaged local copy went
    tried: list[str] = field(default_factory=list)  # why each remote could not help

    @property
    def ok(self) -> bool:
        return self.source is not None


def restore(store: ObjectStore, digest: str, remotes: list) -> Restored:
    """Replace a missing or damaged object with the first remote's verified copy (remotes in order).

    A damaged local copy is moved aside only when a remote has a copy, and put back if that copy
    turns out corrupt (Remote.fetch refuses it), so a failed repair leaves the store as it was.
    """
    result = Restored(digest)
    for remote in remotes:
        try:
            if remote.size(digest) is None:
                result.tried.append(f"{remote.name!r} has no copy")
                continue
            present = store.path(digest).exists()
            moved = quarantine(store, digest) if present else None
            try:
                fetched = remote.fetch(store, digest)
            except BaseException:
                if moved is not None:
                    unquarantine(store, digest, moved)
                raise
            if not fetched:
                if moved is not None:
                    unquarantine(store, digest, moved)
                result.tried.append(f"{remote.name!r} has no copy")
                continue
        except IntegrityError:
            result.tried.append(f"{remote.name!r} has a corrupt copy (refused)")
            continue
        except SkillbankError as e:  # RemoteError: unreachable, missing plugin, ...
            result.tried.append(str(e))
            continue
        result.source, result.moved_to = remote.name, moved
        return result
    if not remotes:
        result.tried.append("no remote is configured")
    return result
