"""Remotes: where a bank's objects are pushed to and fetched from, through DVC's filesystem layer.

Any URL DVC understands works (a local directory, s3://, gs://, azure://, ssh://, ... with the usual
`dvc-s3` / `dvc-gs` / ... plugin installed). Objects keep the bank's own layout under the remote's
root, `ROOT/objects/ab/<rest of the xxh3-128 digest>` - not DVC's `files/md5/` cache - so a remote
can be shared with a DVC project without either touching the other's files.

A remote is never trusted: every fetched object is hashed before it is placed in the store, and
placed the way the store writes its own (temp file, fsync, rename), so a reader sees a whole,
verified object or none. The configuration lives in the bank directory's `bank.json` under
"remotes" (per clone, like git's `.git/config`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from skillbank.errors import IntegrityError, SkillbankError
from skillbank.store.objects import ObjectStore, hash_file
from skillbank.tensors.writer import fsync_dir, write_text_atomic

BANK_FILE = "bank.json"  # the bank directory's marker (api.BANK_FILE; not imported: no upward imports)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RemoteError(SkillbankError):
    """A remote cannot be used: unknown name, bad URL, missing plugin, unreachable."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def normalize_url(url: str) -> str:
    """Local paths become absolute (the config must not depend on the working directory)."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


# ----------------------------------------------------------------------------- configuration

def _read_info(root: Path) -> dict:
    marker = Path(root) / BANK_FILE
    try:
        info = json.loads(marker.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as e:
        raise RemoteError(f"{marker} is damaged ({e})") from None
    if not isinstance(info, dict):
        raise RemoteError(f"{marker} is damaged (not a JSON object)")
    return info


def load_remotes(root: Path) -> dict[str, dict]:
    """{name: {"url": ..., "default": bool}} in the order they were added."""
    remotes = _read_info(root).get("remotes") or {}
    if not isinstance(remotes, dict) or not all(
            isinstance(n, str) and isinstance(c, dict) and isinstance(c.get("url"), str) for n, c in remotes.items()):
        raise RemoteError(f"{Path(root) / BANK_FILE}: \"remotes\" must map names to {{\"url\": ...}}")
    return dict(remotes)


def save_remotes(root: Path, remotes: dict[str, dict]) -> None:
    marker = Path(root) / BANK_FILE
    info = json.loads(marker.read_text())
    info["remotes"] = remotes
    write_text_atomic(marker, json.dumps(info, indent=2) + "\n")


def default_name(remotes: dict[str, dict]) -> str | None:
    for name, conf in remotes.items():
        if conf.get("default"):
            return name
    return next(iter(remotes), None)


# ----------------------------------------------------------------------------- one remote

class Remote:
    def __init__(self, name: str, url: str):
        self.name = name
        self.url = url
        self._fs = None
        self._root = ""

    def __repr__(self) -> str:
        return f"Remote({self.name!r}, {self.url!r})"

    @property
    def fs(self):
        if self._fs is None:
            try:
                from dvc.fs import get_cloud_fs

                cls, conf, root = get_cloud_fs(None, url=self.url)
                self._fs = cls(**conf)
            except Exception as e:  # ConfigError (unknown scheme), ImportError (plugin), auth, ...
                raise RemoteError(f"remote {self.name!r} ({self.url}) cannot be used: {_first_line(e)}") from None
            self._root = root
        return self._fs

    def path(self, digest: str) -> str:
        fs = self.fs
        return fs.join(self._root, "objects", digest[:2], digest[2:])

    def _fail(self, what: str, e: BaseException) -> RemoteError:
        return RemoteError(f"remote {self.name!r} ({self.url}): cannot {what}: {_first_line(e)}")

    def size(self, digest: str) -> int | None:
        """The size of the remote's copy, or None when it has none."""
        try:
            info = self.fs.info(self.path(digest))
        except FileNotFoundError:
            return None
        except RemoteError:
            raise
        except Exception as e:
            raise self._fail(f"look up object {digest}", e) from None
        if info.get("type") == "directory":
            return None
        return info.get("size")

    def upload(self, store: ObjectStore, digest: str) -> int:
        """Copy a local object to the remote unless it holds one of the same size; bytes sent."""
        src = store.open_verified(digest)  # never spread a corrupt object
        size = src.stat().st_size
        if self.size(digest) == size:
            return 0
        rpath = self.path(digest)
        try:
            self.fs.makedirs(self.fs.parent(rpath), exist_ok=True)
            self.fs.put_file(str(src), rpath)  # local: temp + rename; object stores: atomic PUT
        except Exception as e:
            raise self._fail(f"upload object {digest}", e) from None
        return size

    def fetch(self, store: ObjectStore, digest: str) -> bool:
        """Place the remote's copy of `digest` in `store`, verified; False when the remote lacks it."""
        store.path(digest)  # a malformed digest fails here, before any I/O
        store.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=store.tmp, prefix="fetch-")
        os.close(fd)
        tmp: Path | None = Path(name)
        try:
            try:
                self.fs.get_file(self.path(digest), str(tmp))
            except FileNotFoundError:
                return False
            except RemoteError:
                raise
            except Exception as e:
                raise self._fail(f"fetch object {digest}", e) from None
            if not tmp.is_file():
                return False
            got = hash_file(tmp)
            if got != digest:
                raise IntegrityError(f"remote {self.name!r} served a corrupt copy of object {digest} "
                                     f"(its bytes hash to {got}); it was refused")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            dst = store.path(digest)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dst)
            tmp = None
            fsync_dir(dst.parent)
            return True
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def remotes_of(root: Path) -> list[Remote]:
    """The configured remotes, the default one first."""
    conf = load_remotes(root)
    first = default_name(conf)
    names = ([first] if first else []) + [n for n in conf if n != first]
    return [Remote(n, conf[n]["url"]) for n in names]


def fetch_missing(store: ObjectStore, digest: str) -> bool:
    """Lazy fetch: the store's read path calls this for an object it lacks.

    Tries the bank's remotes, default first. False when no remote is configured; an error naming
    the remotes when none has it, or when the only copies found were corrupt.
    """
    remotes = remotes_of(store.root)
    if not remotes:
        return False
    corrupt: IntegrityError | None = None
    for r in remotes:
        try:
            if r.fetch(store, digest):
                return True
        except IntegrityError as e:
            corrupt = corrupt or e
    if corrupt is not None:
        raise corrupt
    names = ", ".join(repr(r.name) for r in remotes)
    raise IntegrityError(f"object {digest} is missing from {store.objects} and from remote(s) {names}")
