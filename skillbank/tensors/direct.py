"""Sequential file writes that bypass the page cache (O_DIRECT), for multi-GB outputs.

Buffered writes copy every byte into the page cache and then throttle the writer while the
kernel flushes it: on this project's 2-core VM, writing 4 GB that way cost 3.5-10 s of kernel
CPU, more than the merge itself. With O_DIRECT the disk reads the bytes straight from an aligned
staging buffer: one memcpy in user space, well under a second for 4 GB (measured in
benchmarks/RESULTS.md). Every write goes through a Python file object, so whatever wraps
`open` (stress/faultinject.py) still sees each one.

O_DIRECT wants the buffer address, the file offset and the length aligned to the device's block
size. The stage is page-aligned memory written in whole stages from offset 0, so only the last
partial stage needs care: its aligned part goes direct, then O_DIRECT is switched off on the
descriptor (fcntl F_SETFL) for the few remaining bytes. A filesystem that refuses O_DIRECT
(tmpfs, some network and FUSE filesystems) gets ordinary buffered writes, same bytes. The file is
locked (flock) while it is written, so two writers of one temp path cannot mix their bytes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

STAGE_BYTES = 8 * 2**20  # a multiple of every block size O_DIRECT asks for (512 B - 64 KiB)
ALIGN = 64 * 2**10
_DIRECT = getattr(os, "O_DIRECT", 0)


def _open(path: str | os.PathLike, direct: bool) -> int:
    # O_NOFOLLOW: never write through a symbolic link planted where a temp file goes. No O_TRUNC:
    # the file is emptied only once it is locked.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (_DIRECT if direct else 0), 0o666)


def _lock(fd: int) -> None:
    """Exclusive, non-blocking (BlockingIOError when held); skipped where the filesystem has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise


class DirectFile:
    """A write-only file for one sequential stream of bytes; `direct` says whether O_DIRECT is on."""

    def __init__(self, path: str | os.PathLike, direct: bool = True):
        self.direct = bool(direct and _DIRECT)
        fd = -1
        if self.direct:
            try:
                fd = _open(path, True)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
        if fd < 0:
            fd = _open(path, False)
        try:
            # Locked before it is emptied: a second writer of the same path fails here
            # (BlockingIOError) instead of truncating the first one's bytes and interleaving.
            _lock(fd)
            if os.fstat(fd).st_size:
                os.ftruncate(fd, 0)
            self._f = open(fd, "wb", buffering=0 if self.direct else -1)
        except BaseException:
            os.close(fd)
            raise
        self._stage = mmap.mmap(-1, STAGE_BYTES) if self.direct else None
        self._used = 0

    def fileno(self) -> int:
        return self._f.fileno()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        if self._stage is None:
            done = 0
            while done < total:  # a raw file object may write less than it was given
                done += self._f.write(view[done:])
            return total
        while view:
            n = min(len(view), STAGE_BYTES - self._used)
            self._stage[self._used:self._used + n] = view[:n]
            self._used += n
            view = view[n:]
            if self._used == STAGE_BYTES:
                self._drain(STAGE_BYTES)
        return total

    def _drain(self, n: int) -> None:
        """Write the first n bytes of the stage and keep what follows them at its start."""
        stage = memoryview(self._stage)
        done = 0
        try:
            while done < n:
                if self.direct and (done % ALIGN or (n - done) % ALIGN):
                    self._buffered()  # a short write or a tail: the rest cannot be aligned
                done += self._f.write(stage[done:n])
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL and done == 0):
                raise
            self._buffered()  # the filesystem opened it but will not do direct writes
            return self._drain(n)
        rest = self._used - n
        if rest:
            self._stage.move(0, n, rest)
        self._used = rest

    def _buffered(self) -> None:
        fd = self._f.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT)
        self.direct = False

    def flush(self) -> None:
        """Write out everything staged and free the stage; anything written later is buffered."""
        if self._stage is not None:
            try:
                aligned = self._used - self._used % ALIGN
                if self.direct and aligned:
                    self._drain(aligned)
                if self._used:
                    self._drain(self._used)
            finally:
                self._free()
        self._f.flush()

    def _free(self) -> None:
        # Dropped, not closed: after a failed write the traceback may still hold a view of it,
        # and the map is unmapped when the last view goes.
        self._stage = None
        if self.direct:
            self._buffered()

    def close(self) -> None:
        if self._f.closed:  # a writer's abort may close what its commit already closed
            return
        try:
            self.flush()
        finally:
            self._free()
            self._f.close()

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
