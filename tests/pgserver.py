"""Throwaway PostgreSQL server for the test suite (standard library only).

A :class:`PgServer` is a private cluster in a temporary directory.  It
listens on 127.0.0.1 only, on a free port, with its unix socket in the
temporary directory, trust authentication and a ``skillbank`` superuser.
Durability is switched off (``fsync``, ``synchronous_commit`` and
``full_page_writes`` off, ``initdb --no-sync``) because the data is thrown
away.

PostgreSQL refuses to run as root.  When this process is root (CI), the
temporary directory is chowned to the ``postgres`` system user and the
server binaries run through ``runuser -u postgres --``; otherwise they run
directly as the current user.

Typical pytest use::

    from pgserver import PgServer, pg_available

    @pytest.fixture(scope="session")
    def pg():
        ok, reason = pg_available()
        if not ok:
            pytest.skip(reason)
        with PgServer() as server:
            yield server

    def test_something(pg):
        url = pg.create_database("t_something")   # postgresql+psycopg://...

The server is also stopped by an ``atexit`` hook, so a test run that dies
with an exception does not leave it running (SIGKILL still can).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse

__all__ = ["PgServer", "PgServerError", "find_pg_bin", "pg_available", "as_pg_user"]

HOST = "127.0.0.1"          # loopback only, ever
SUPERUSER = "skillbank"
SYSTEM_USER = "postgres"    # unprivileged user the server runs as when we are root
_SOCKET_PATH_MAX = 100      # sun_path is 108 bytes on Linux; keep a margin

# Variables that could point libpq / the server somewhere else.
_SCRUB_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER",
              "PGPASSWORD", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE",
              "PGDATA", "PGOPTIONS", "PGSSLMODE", "PGCLUSTER")


class PgServerError(RuntimeError):
    """Starting or using the throwaway server failed."""


# --------------------------------------------------------------------------
# binary discovery
# --------------------------------------------------------------------------

def _version_key(path: str) -> tuple:
    # /usr/lib/postgresql/<version>/bin/<name>
    ver = path.split(os.sep)[-3]
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[._-]", ver))


def find_pg_bin(name: str) -> str | None:
    """Path of PostgreSQL binary *name*: PATH first, then the highest
    version under /usr/lib/postgresql/*/bin.  None when not found."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [p for p in glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
                  if os.path.isfile(p) and os.access(p, os.X_OK)]
    if candidates:
        return max(candidates, key=_version_key)
    return None


def _pg_tool(name: str) -> str | None:
    """Prefer the binary sitting next to the real initdb (same version and
    no Debian pg_wrapper indirection), else fall back to find_pg_bin."""
    initdb = find_pg_bin("initdb")
    if initdb:
        sibling = os.path.join(os.path.dirname(os.path.realpath(initdb)), name)
        if os.path.isfile(sibling) and os.access(sibling, os.X_OK):
            return sibling
    return find_pg_bin(name)


def _is_root() -> bool:
    return os.geteuid() == 0


def _system_user():
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        return None


def pg_available() -> tuple[bool, str]:
    """(True, "") when a server can be started here, else (False, reason)."""
    for name in ("initdb", "pg_ctl", "postgres", "psql"):
        if _pg_tool(name) is None:
            return False, f"no {name} binary found (PATH or /usr/lib/postgresql/*/bin)"
    if _is_root():
        if _system_user() is None:
            return False, (f"running as root and there is no {SYSTEM_USER!r} "
                           "system user to run the server as")
    return True, ""


def as_pg_user(argv: list[str]) -> list[str]:
    """*argv* prefixed so that it runs as the server's user: through
    ``runuser -u postgres --`` when we are root, unchanged otherwise."""
    if not _is_root():
        return list(argv)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", SYSTEM_USER, "--", *argv]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------

class PgServer:
    """A private PostgreSQL cluster in a temp dir, listening on 127.0.0.1 on
    a free port, unix sockets in the temp dir."""

    host = HOST
    user = SUPERUSER

    def __init__(self, base_dir: str | None = None):
        self.base_dir = base_dir      # parent of the temp dir (None: system default)
        self.tmpdir: str | None = None
        self.data_dir: str | None = None
        self.socket_dir: str | None = None
        self.log_path: str | None = None       # server log (pg_ctl -l)
        self.cmd_log_path: str | None = None   # output of initdb / pg_ctl / psql
        self.port: int | None = None
        self._extra_socket_dir: str | None = None
        self._running = False
        self._owner_pid = os.getpid()

    # ---- helpers --------------------------------------------------------

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
        env.setdefault("LC_ALL", "C")
        return env

    def _run(self, argv: list[str], timeout: float, check: bool = True
             ) -> subprocess.CompletedProcess:
        """Run a PostgreSQL binary as the server's user.  Output goes to the
        command log file, never to a pipe (pg_ctl start leaves a daemon
        behind, and a pipe it inherited would never reach EOF)."""
        full = as_pg_user(argv)
        with open(self.cmd_log_path, "ab") as log:
            log.write(("$ " + " ".join(full) + "\n").encode())
            log.flush()
            proc = subprocess.run(full, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=self.tmpdir,
                                  env=self._env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise PgServerError(
                f"{os.path.basename(argv[0])} exited with {proc.returncode}\n"
                f"--- command log ({self.cmd_log_path}) ---\n{_tail(self.cmd_log_path)}"
                f"--- server log ({self.log_path}) ---\n{_tail(self.log_path)}")
        return proc

    def _tool(self, name: str) -> str:
        path = _pg_tool(name)
        if path is None:
            raise PgServerError(f"no {name} binary found")
        return path

    # ---- lifecycle ------------------------------------------------------

    def start(self) -> "PgServer":
        if self._running:
            return self
        ok, reason = pg_available()
        if not ok:
            raise PgServerError(reason)
        try:
            self._prepare_dirs()
            self._run([self._tool("initdb"), "-D", self.data_dir, "-U", SUPERUSER,
                       "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                      timeout=180)
            atexit.register(self._atexit_stop)
            self._running = True     # from here on stop() has something to do
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare_dirs(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="pgserver-", dir=self.base_dir)
        self.data_dir = os.path.join(self.tmpdir, "data")
        self.log_path = os.path.join(self.tmpdir, "postgres.log")
        self.cmd_log_path = os.path.join(self.tmpdir, "commands.log")
        open(self.cmd_log_path, "ab").close()
        self.socket_dir = self.tmpdir
        # a socket path must fit in sun_path; fall back to a short dir
        if len(os.path.join(self.socket_dir, ".s.PGSQL.65535.lock")) > _SOCKET_PATH_MAX:
            self._extra_socket_dir = tempfile.mkdtemp(prefix="pgsock-", dir="/tmp")
            self.socket_dir = self._extra_socket_dir
        if _is_root():
            pw = _system_user()
            for d in filter(None, (self.tmpdir, self._extra_socket_dir)):
                os.chown(d, pw.pw_uid, pw.pw_gid)
                os.chmod(d, 0o700)

    def _start_server(self, attempts: int = 3) -> None:
        pg_ctl = self._tool("pg_ctl")
        for attempt in range(attempts):
            self.port = _free_port()
            opts = (f"-p {self.port} -k {self.socket_dir} "
                    f"-c listen_addresses={HOST} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off")
            proc = self._run([pg_ctl, "start", "-w", "-t", "60", "-D", self.data_dir,
                              "-l", self.log_path, "-o", opts],
                             timeout=120, check=False)
            if proc.returncode == 0:
                return
            log = _tail(self.log_path)
            # lost the race for the port to someone else: try another one
            if "could not bind" in log or "already in use" in log:
                if attempt + 1 < attempts:
                    continue
            raise PgServerError(
                f"pg_ctl start failed (exit {proc.returncode}, port {self.port})\n"
                f"--- server log ({self.log_path}) ---\n{log}"
                f"--- command log ({self.cmd_log_path}) ---\n{_tail(self.cmd_log_path)}")

    def stop(self) -> None:
        """Stop the server (pg_ctl stop -m fast) and remove the temp dir.
        Safe to call more than once, and after a failed start."""
        try:
            atexit.unregister(self._atexit_stop)
        except Exception:
            pass
        if self._running and self.data_dir and os.path.exists(
                os.path.join(self.data_dir, "postmaster.pid")):
            try:
                self._run([self._tool("pg_ctl"), "stop", "-m", "fast", "-w",
                           "-t", "30", "-D", self.data_dir], timeout=60, check=False)
            except Exception:
                pass
            self._kill_leftover()
        self._running = False
        for d in (self.tmpdir, self._extra_socket_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        self.tmpdir = self._extra_socket_dir = None

    def _kill_leftover(self) -> None:
        """If the postmaster is still there after pg_ctl stop, kill it."""
        pidfile = os.path.join(self.data_dir, "postmaster.pid")
        try:
            with open(pidfile) as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return
        import signal
        for sig, wait in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            except PermissionError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)

    def _atexit_stop(self) -> None:
        if os.getpid() == self._owner_pid:   # not in a forked child
            self.stop()

    def __enter__(self) -> "PgServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- use ------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL for *dbname* (psycopg 3 driver)."""
        if self.port is None:
            raise PgServerError("server not started")
        return (f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self.port}/"
                f"{urllib.parse.quote(dbname, safe='')}")

    def psql_argv(self, dbname: str = "postgres", *args: str) -> list[str]:
        """psql command line (TCP to 127.0.0.1) as the server's user."""
        if not self._running:
            raise PgServerError("server not running")
        return as_pg_user([self._tool("psql"), "-X", "-q", "-h", HOST, "-p",
                           str(self.port), "-U", SUPERUSER, "-d", dbname,
                           "-v", "ON_ERROR_STOP=1", *args])

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run *sql* with psql; return its unaligned, tuples-only output."""
        proc = subprocess.run(self.psql_argv(dbname, "-At", "-c", sql),
                              stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, cwd=self.tmpdir, env=self._env(),
                              timeout=120)
        if proc.returncode != 0:
            raise PgServerError(f"psql failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def create_database(self, name: str) -> str:
        """CREATE DATABASE *name* and return url(name)."""
        ident = '"' + name.replace('"', '""') + '"'
        self.psql(f"CREATE DATABASE {ident}")
        return self.url(name)
