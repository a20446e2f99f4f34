"""Check large objects against their digests while a pass streams them.

Hashing a base and its task vectors before a rebuild reads them twice and holds the pass back;
hashing them on a background thread while the pass reads the same pages costs one read. The
pass's result may only be published after `settle()`: a corrupt object fails the pass there.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import xxhash

from skillbank.errors import IntegrityError
from skillbank.store.objects import ObjectStore, mapped_windows

# One thread: objects are hashed one after another in the order they were opened (the base
# first), a sequential read for the disk, whatever the number of passes in the process.
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skillbank-verify")


class BackgroundCheck:
    """The hash of one object, computed off the pass's critical path."""

    def __init__(self, store: ObjectStore, digest: str, path: Path):
        self.digest = digest
        self._stop = threading.Event()
        self._future: Future = _POOL.submit(self._run, store, digest, path)

    def _run(self, store: ObjectStore, digest: str, path: Path) -> IntegrityError | None:
        key = store.verified_key(digest, path)
        if key in store._verified:
            return None
        h = xxhash.xxh3_128()
        with open(path, "rb", buffering=0) as f:
            for window in mapped_windows(f.fileno()):
                if self._stop.is_set():
                    return None
                h.update(window)
        if h.hexdigest() != digest:
            return store.corrupt(digest)
        store._verified.add(key)
        return None

    def error(self) -> IntegrityError | None:
        """Wait for the hash; the error if the object's bytes do not match its digest."""
        return self._future.result()

    def cancel(self) -> None:
        self._stop.set()


class Checks:
    """The background checks of every object one rebuild opened."""

    def __init__(self) -> None:
        self._checks: list[BackgroundCheck] = []

    def start(self, store: ObjectStore, digest: str) -> Path:
        """Open `digest` for streaming and check it meanwhile."""
        path = store.open_path(digest)
        self._checks.append(BackgroundCheck(store, digest, path))
        return path

    def settle(self) -> None:
        """Raise the first object's corruption, if any; call before publishing what was read."""
        for c in self._checks:
            if (e := c.error()) is not None:
                raise e

    def blame(self, cause: BaseException) -> None:
        """After a pass failed: if an object it read is corrupt, say that instead of the symptom.

        A corrupt object can fail a pass before the end (a header that no longer parses, a zstd
        frame that no longer decodes); the cause the user can act on is the corruption. I/O
        errors and interrupts are reported as they are, without waiting for the checks.
        """
        if isinstance(cause, OSError) or not isinstance(cause, Exception):
            return
        for c in self._checks:
            if (e := c.error()) is not None and e is not cause:
                raise e from cause

    def cancel(self) -> None:
        for c in self._checks:
            c.cancel()
