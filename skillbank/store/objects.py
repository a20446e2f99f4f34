"""Content-addressed object store: objects/ab/<rest of xxh3-128 hex>, written atomically.

An object is written to tmp/, fsynced, then renamed to its digest's path, so a reader sees a whole
object or none. Every read checks the digest: small objects as they are read, large ones once per
process before their first use.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator

import xxhash

from skillbank.errors import IntegrityError
from skillbank.tensors.direct import DirectFile
from skillbank.tensors.writer import fsync_dir

DIGEST_RE = re.compile(r"^[0-9a-f]{32}$")


MAP_WINDOW = 16 * 2**20


def mapped_windows(fd: int) -> Iterator[mmap.mmap]:
    """A file's bytes as successive read-only memory maps of at most MAP_WINDOW bytes.

    Hashing the page cache in place costs no copy into a buffer: a third of the CPU of reading a
    large object, and resident memory stays one window. The size is taken once, at the start, so
    a file that was truncated before is hashed as it is (and fails its digest); the store's
    objects are never written in place, so none shrinks while it is mapped. Use each window
    before asking for the next: it is unmapped then.
    """
    size = os.fstat(fd).st_size
    for offset in range(0, size, MAP_WINDOW):
        with mmap.mmap(fd, min(MAP_WINDOW, size - offset), offset=offset, access=mmap.ACCESS_READ) as window:
            yield window


def hash_file(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        for window in mapped_windows(f.fileno()):
            h.update(window)
    return h.hexdigest()


class ObjectWriter:
    """Stream bytes into a new object; `commit()` returns its digest."""

    def __init__(self, store: "ObjectStore"):
        self.store = store
        fd, name = tempfile.mkstemp(dir=store.tmp, prefix="obj-")  # a fresh name, made exclusively
        os.close(fd)
        self.tmp_path = Path(name)
        try:
            self.file = DirectFile(name)  # objects are large and written once: no page cache copy
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        self._h = xxhash.xxh3_128()
        self.size = 0

    def write(self, data) -> None:
        self._h.update(data)
        self.file.write(data)
        self.size += len(memoryview(data).cast("B"))

    def tell(self) -> int:
        return self.size

    def commit(self) -> str:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        digest = self._h.hexdigest()
        dst = self.store.path(digest)
        if dst.exists():
            self.tmp_path.unlink()
            os.utime(dst)  # fresh again: gc's grace period protects it until it is referenced
        else:
            dst.parent.mkdir(exist_ok=True)
            os.chmod(self.tmp_path, 0o444)
            os.replace(self.tmp_path, dst)
            fsync_dir(dst.parent)
        return digest

    def abort(self) -> None:
        try:
            if not self.file.closed:
                self.file.close()
        except OSError:
            pass  # closing flushes what is buffered, which fails on a full disk; it closes anyway
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ObjectWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()


class ObjectStore:
    fetcher = None  # optional callable(digest) -> bool for missing objects; default: the bank's remotes

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self._verified: set[tuple[str, int, int]] = set()

    def create(self) -> "ObjectStore":
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self

    def path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise IntegrityError(f"malformed object digest {digest!r}")
        return self.objects / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def writer(self) -> ObjectWriter:
        return ObjectWriter(self)

    def put_bytes(self, data: bytes) -> str:
        with self.writer() as w:
            w.write(data)
            return w.commit()

    def put_json(self, obj) -> str:
        return self.put_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

    def _missing(self, digest: str) -> IntegrityError:
        return IntegrityError(f"object {digest} is missing from {self.objects}")

    def _fetch_missing(self, digest: str) -> bool:
        """Lazy fetch hook: place a missing object from the bank's remotes, verified (store/remote.py).

        `fetcher` replaces the default (the remotes in the bank directory's bank.json)."""
        if self.fetcher is not None:
            return bool(self.fetcher(digest))
        from skillbank.store.remote import fetch_missing

        return fetch_missing(self, digest)

    def get_bytes(self, digest: str) -> bytes:
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            if not self._fetch_missing(digest):
                raise self._missing(digest) from None
            data = self.path(digest).read_bytes()
        if xxhash.xxh3_128_hexdigest(data) != digest:
            raise self.corrupt(digest)
        return data

    def get_json(self, digest: str):
        return json.loads(self.get_bytes(digest))

    def open_path(self, digest: str) -> Path:
        """Path of an object, fetched from a remote if missing, NOT yet checked: the caller must
        check it (open_verified, or store/verify.py while a pass streams it)."""
        p = self.path(digest)
        if not p.is_file():
            if not self._fetch_missing(digest):
                raise self._missing(digest)
        return p

    def verified_key(self, digest: str, path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return (digest, st.st_size, st.st_mtime_ns)

    def open_verified(self, digest: str) -> Path:
        """Path of a large object whose bytes were checked against its digest in this process."""
        p = self.open_path(digest)
        if not self.verify(digest):
            raise self.corrupt(digest)
        return p

    @staticmethod
    def corrupt(digest: str) -> IntegrityError:
        return IntegrityError(f"object {digest} is corrupt (its bytes no longer match its digest)")

    def verify(self, digest: str) -> bool:
        """Whether the local copy is whole; hashed once per process while its size and mtime hold
        (fsck checks every object, then rebuilds every version from the same ones)."""
        p = self.path(digest)
        if not p.is_file():
            return False
        key = self.verified_key(digest, p)
        if key in self._verified:
            return True
        if hash_file(p) != digest:
            return False
        self._verified.add(key)
        return True

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def __iter__(self) -> Iterator[str]:
        if not self.objects.is_dir():
            return
        for fan in sorted(self.objects.iterdir()):
            if fan.is_dir() and len(fan.name) == 2:
                for obj in sorted(fan.iterdir()):
                    digest = fan.name + obj.name
                    if DIGEST_RE.match(digest):
                        yield digest

    def remove(self, digest: str) -> int:
        p = self.path(digest)
        size = p.stat().st_size
        p.unlink()
        return size

    def age(self, digest: str) -> float:
        return time.time() - self.path(digest).stat().st_mtime

    def stale_temp_files(self, older_than: float) -> list[Path]:
        if not self.tmp.is_dir():
            return []
        now = time.time()
        return [p for p in self.tmp.iterdir() if now - p.stat().st_mtime >= older_than]
