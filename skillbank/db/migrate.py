"""Alembic, driven from code: create on first use, refuse an out-of-date schema, upgrade on request."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from skillbank.errors import SchemaError


def _location() -> str:
    return str(Path(str(resources.files("skillbank.migrations"))))


def _config(engine=None, connection=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _location())
    cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=4)
def _scripts(location: str) -> tuple[str, frozenset[str]]:
    """(head revision, every known revision) of the migration scripts at `location`.

    Parsed once per process: every command opens the bank, and the scripts do not change under it.
    """
    cfg = Config()
    cfg.set_main_option("script_location", location)
    scripts = ScriptDirectory.from_config(cfg)
    return scripts.get_current_head(), frozenset(s.revision for s in scripts.walk_revisions())


def head_revision() -> str:
    return _scripts(_location())[0]


def _known_revisions() -> frozenset[str]:
    return _scripts(_location())[1]


def current_revision(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _state(engine) -> tuple[str | None, bool]:
    """(current revision, whether the database holds no skillbank tables), on one connection.

    An `alembic_version` table left empty by a downgrade to base does not count as a table."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        tables = set(inspect(conn).get_table_names()) - {"alembic_version"}
    return current, current is None and not tables


def is_empty(engine) -> bool:
    return _state(engine)[1]


def _check_upgradable(engine) -> tuple[str | None, bool]:
    """(current revision, empty) if alembic can start from there; SchemaError with one line if not."""
    current, empty = _state(engine)
    if current is None and not empty:
        raise SchemaError("this database has tables but no skillbank schema version; is it a skillbank bank?")
    if current is not None and current not in _known_revisions():
        raise SchemaError(
            f"database schema {current} is newer than this skillbank knows ({head_revision()}); upgrade skillbank"
        )
    return current, empty


def upgrade(engine, revision: str = "head") -> tuple[str | None, str]:
    before, _ = _check_upgradable(engine)
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection if conn.dialect.name == "sqlite" else None
        if raw is not None:
            # SQLite batch migrations rebuild a table (copy, drop, rename); with foreign keys on,
            # dropping a table other rows point at fails. The pragma only works outside a
            # transaction, so it is set on the driver connection before alembic's begins, and the
            # keys are checked before the commit (SQLite's documented ALTER TABLE procedure).
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                command.upgrade(_config(connection=conn), revision)
                if raw is not None:
                    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if bad:
                        raise SchemaError(f"migration left {len(bad)} dangling foreign key(s) "
                                          f"(first in table {bad[0][0]!r}); nothing was changed")
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")
    return before, current_revision(engine)


def ensure_current(engine) -> None:
    """New database: create it. Older schema: refuse, naming the command that fixes it."""
    current, empty = _check_upgradable(engine)
    if empty:
        upgrade(engine)
        return
    head = head_revision()
    if current == head:
        return
    raise SchemaError(
        f"database schema is at {current}, this skillbank needs {head}: run `skillbank db upgrade`"
    )
