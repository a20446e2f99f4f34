"""Engines and sessions: SQLite embedded (WAL, foreign keys, busy timeout) or PostgreSQL."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from skillbank.errors import SkillbankError

SQLITE_BUSY_MS = 30_000
PG_WRITE_LOCK = 0x736B696C6C62616E  # "skillban": the advisory lock that serialises writers


def make_engine(url: str) -> Engine:
    """An engine for `url`; a URL that cannot be used (malformed, unknown dialect, driver not
    installed) is the user's to fix, so it fails with one line, not a traceback."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})
            _sqlite_setup(engine)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError) as e:
        raise SkillbankError(f"cannot use database URL {_shown(url)}: {str(e).strip().splitlines()[0]}") from None
    except ImportError as e:
        raise SkillbankError(f"database URL {_shown(url)} needs the Python module {e.name!r}, "
                             "which is not installed") from None


def _shown(url: str) -> str:
    """The URL for a message, without its password."""
    try:
        return repr(make_url(url).render_as_string(hide_password=True))
    except Exception:
        return repr(url)


def _sqlite_setup(engine: Engine) -> None:
    """Take transactions from pysqlite so writers can ask for BEGIN IMMEDIATE.

    A deferred transaction that later writes can fail with 'database is locked' without waiting;
    BEGIN IMMEDIATE takes the write lock up front and so honours the busy timeout.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        # A read that looks twice (a ref, then the rows it points at) must see one bank: SQLite's
        # read transaction is a snapshot already; PostgreSQL's default reads each statement anew.
        reads = (self.engine.execution_options(isolation_level="REPEATABLE READ")
                 if self.engine.dialect.name == "postgresql" else self.engine)
        self._sessions = sessionmaker(reads, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; loaded rows stay usable after it closes (it is never expired)."""
        with self._sessions() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One short transaction that commits on success and rolls back on any error.

        Writers go one at a time, as SQLite's BEGIN IMMEDIATE makes them: on PostgreSQL the
        transaction first takes an advisory lock (released by its commit or rollback). Otherwise
        concurrent writers all allocate the same `max(id) + 1` and all but one fail on the unique
        key, again and again: with 20+ of them some ran out of retries with a raw IntegrityError.
        """
        bind = self.engine.execution_options(sqlite_immediate=True) if self.is_sqlite else self.engine
        with Session(bind, expire_on_commit=False) as s:
            with s.begin():
                if self.engine.dialect.name == "postgresql":
                    s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_WRITE_LOCK})
                yield s

    def dispose(self) -> None:
        self.engine.dispose()
