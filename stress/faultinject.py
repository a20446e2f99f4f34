"""Run the real skillbank CLI with a fault injected into its write path, from outside its code.

Every call that changes durable state is a *write-path event*: opening a file for writing, a
write to such a file, fsync, rename, unlink, mkdir, and at the database driver every statement
that changes rows or schema (INSERT, UPDATE, DELETE, CREATE, ALTER, DROP) and the COMMIT. A plan
picks one event by its number and says what happens there:

    count           run normally and record every event (kind, file name, time): the dry run
    kill-before:K   SIGKILL this process just before event K
    kill-after:K    SIGKILL it just after event K
    enospc:K        event K fails with ENOSPC, and so does every later write: the disk stays full
    eio:K           event K fails with EIO, once (a retry would succeed, as after fsync's EIO)

The hooks wrap `os`, `io.open`/`open` and SQLAlchemy's `DefaultDialect.do_*` in the child
process only; skillbank has no hooks of its own. Two ways to run a command:

    python stress/faultinject.py --plan kill-before:7 [--events FILE] -- --bank B add-skill ...

starts a fresh interpreter (about two seconds of imports), and `serve()` is a zygote that imports
skillbank once and forks a child per command, so a run costs what the command itself costs.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

ACTIONS = ("count", "kill-before", "kill-after", "enospc", "eio")
FULL_DISK_KINDS = {"open", "write", "rename", "mkdir", "sql", "commit"}  # what fails on a full disk
WRITE_SQL = {"INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP"}

_real_open = io.open
_real = {name: getattr(os, name) for name in ("open", "fsync", "replace", "rename", "unlink", "remove",
                                              "mkdir", "ftruncate")}


@dataclass(frozen=True)
class Plan:
    action: str
    at: int = 0

    @classmethod
    def parse(cls, spec: str) -> Plan:
        action, _, at = spec.partition(":")
        if action not in ACTIONS or (action != "count") != bool(at):
            raise ValueError(f"bad plan {spec!r}: count, or one of {ACTIONS[1:]} with :EVENT")
        return cls(action, int(at or 0))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    while True:  # pragma: no cover - the signal is delivered before this returns
        time.sleep(1)


class Injector:
    """Numbers the events and carries out the plan at its event."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.events: list[list] = []
        self.fired: list | None = None  # the event the fault was injected at
        self.disk_full = False
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def before(self, kind: str, detail: str = "") -> int:
        with self._lock:
            self.events.append([kind, detail, round(time.monotonic() - self._t0, 4)])
            k = len(self.events)
        p = self.plan
        if p.action == "kill-before" and k == p.at:
            _die()
        if self.disk_full and kind in FULL_DISK_KINDS:
            raise _oserror(errno.ENOSPC, detail)
        if k == p.at and p.action in ("enospc", "eio"):
            self.fired = [kind, detail, k]
            self.disk_full = p.action == "enospc"
            raise _oserror(errno.ENOSPC if p.action == "enospc" else errno.EIO, detail)
        return k

    def after(self, k: int) -> None:
        if self.plan.action == "kill-after" and k == self.plan.at:
            _die()

    def around(self, kind: str, detail: str, call, *args, **kwargs):
        k = self.before(kind, detail)
        result = call(*args, **kwargs)
        self.after(k)
        return result


def _oserror(code: int, detail: str) -> OSError:
    return OSError(code, os.strerror(code), detail or None)


def _name(path) -> str:
    return os.path.basename(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else str(path)


def _fd_name(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return f"fd{fd}"


class _WriteFile:
    """A file opened for writing: each write is an event. While the disk is full, data still
    buffered when the file is flushed or closed fails with ENOSPC, as a real BufferedWriter does
    (close still closes the descriptor)."""

    def __init__(self, inj: Injector, f, name: str):
        self._inj, self._f, self._name = inj, f, name
        self._dirty = False

    def write(self, data):
        k = self._inj.before("write", self._name)
        n = self._f.write(data)
        self._dirty = True
        self._inj.after(k)
        return n

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._inj.disk_full and self._dirty:
            raise _oserror(errno.ENOSPC, self._name)
        self._f.flush()
        self._dirty = False

    def close(self) -> None:
        if self._f.closed:
            return
        lost = self._inj.disk_full and self._dirty
        self._f.close()
        self._dirty = False
        if lost:
            raise _oserror(errno.ENOSPC, self._name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def install(plan: Plan) -> Injector:
    """Wrap the write path of this process (call it in the child, never in the harness)."""
    inj = Injector(plan)
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def open_(file, mode="r", *args, **kwargs):
        if not any(c in mode for c in "wax+"):
            return _real_open(file, mode, *args, **kwargs)
        if isinstance(file, int):  # os.fdopen of a descriptor that was already counted
            return _WriteFile(inj, _real_open(file, mode, *args, **kwargs), _fd_name(file))
        name = _name(file)
        return _WriteFile(inj, inj.around("open", name, _real_open, file, mode, *args, **kwargs), name)

    def os_open(path, flags, *args, **kwargs):
        if not flags & writes:
            return _real["open"](path, flags, *args, **kwargs)
        return inj.around("open", _name(path), _real["open"], path, flags, *args, **kwargs)

    def wrap(kind: str, name: str, detail):
        real = _real[name]
        return lambda *a, **kw: inj.around(kind, detail(a), real, *a, **kw)

    def mkdir(path, *args, **kwargs):
        if os.path.exists(path) or kwargs.get("dir_fd") is not None:
            return _real["mkdir"](path, *args, **kwargs)  # exists: nothing changes on disk
        return inj.around("mkdir", _name(path), _real["mkdir"], path, *args, **kwargs)

    builtins.open = io.open = open_
    os.open = os_open
    os.fsync = wrap("fsync", "fsync", lambda a: _fd_name(a[0]) if isinstance(a[0], int) else _name(a[0]))
    os.replace = wrap("rename", "replace", lambda a: _name(a[1]))
    os.rename = wrap("rename", "rename", lambda a: _name(a[1]))
    os.unlink = wrap("unlink", "unlink", lambda a: _name(a[0]))
    os.remove = wrap("unlink", "remove", lambda a: _name(a[0]))
    os.ftruncate = wrap("write", "ftruncate", lambda a: _fd_name(a[0]))
    os.mkdir = mkdir
    _hook_sql(inj)
    return inj


def _hook_sql(inj: Injector) -> None:
    """Writing statements and COMMIT at the driver. A fault is raised as the driver's own error,
    so SQLAlchemy wraps it as it would a real 'database or disk is full'."""
    from sqlalchemy.engine.default import DefaultDialect

    messages = {errno.ENOSPC: "database or disk is full", errno.EIO: "disk I/O error"}

    def guarded(dialect, kind: str, detail: str, call):
        try:
            k = inj.before(kind, detail)
        except OSError as e:
            raise dialect.loaded_dbapi.OperationalError(messages[e.errno]) from None
        result = call()
        inj.after(k)
        return result

    def hook(name: str):
        real = getattr(DefaultDialect, name)

        def do(self, cursor, statement, *args, **kwargs):
            words = statement.split()
            if not words or words[0].upper() not in WRITE_SQL:
                return real(self, cursor, statement, *args, **kwargs)
            return guarded(self, "sql", " ".join(words[:3]),
                           lambda: real(self, cursor, statement, *args, **kwargs))

        setattr(DefaultDialect, name, do)

    for name in ("do_execute", "do_execute_no_params", "do_executemany"):
        hook(name)
    real_commit = DefaultDialect.do_commit
    DefaultDialect.do_commit = lambda self, conn: guarded(self, "commit", self.name, lambda: real_commit(self, conn))


def run_cli(argv: list[str], plan: str, events_path: str | None = None) -> int:
    """skillbank's console entry point under `plan`; returns its exit code."""
    inj = install(Plan.parse(plan))
    from skillbank.cli import main

    sys.argv = ["skillbank", *argv]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a traceback breaks the CLI contract: the harness sees it in stderr
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        if events_path:
            with _real_open(events_path, "w") as f:
                json.dump({"events": inj.events, "fired": inj.fired}, f)
    return code


# ----------------------------------------------------------------------------- zygote

def _child(req: dict) -> None:
    os.chdir(req.get("cwd") or ".")
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.update(req.get("env") or {})
    os._exit(run_cli(req["argv"], req["plan"], req.get("events")))


def _wait(pid: int, kill_after: float | None) -> int:
    """Wait for the child; SIGKILL it `kill_after` seconds in if it still runs. It is not reaped
    before the kill, so the pid cannot have been recycled."""
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while deadline is not None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def serve() -> None:
    """Read one JSON request a line, fork a child to run it, answer {"rc", "elapsed"}.

    The imports happen here, once; a forked child starts with them done (and no threads, no
    database connection, no torch work yet, so forking is safe)."""
    import skillbank.cli  # noqa: F401 - the expensive part, paid once

    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                _child(req)
            finally:
                os._exit(70)
        rc = _wait(pid, req.get("kill_after"))
        sys.stdout.write(json.dumps({"rc": rc, "elapsed": time.monotonic() - t0}) + "\n")
        sys.stdout.flush()


def main(args: list[str]) -> int:
    if args[:1] == ["--serve"]:
        serve()
        return 0
    plan, events = "count", None
    while args and args[0] != "--":
        opt, value, args = args[0], args[1], args[2:]
        if opt == "--plan":
            plan = value
        elif opt == "--events":
            events = value
        else:
            print("usage: faultinject.py [--plan SPEC] [--events FILE] -- SKILLBANK ARGS | --serve",
                  file=sys.stderr)
            return 2
    return run_cli(args[1:], plan, events)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
