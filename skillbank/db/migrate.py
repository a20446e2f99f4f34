"""Alembic, driven from code: create on first use, refuse an out-of-date schema, upgrade on request.

Every command opens the bank, and importing alembic (all its dialects) and parsing the migration
scripts costs a quarter of a second; so the common case, a database already at HEAD, is checked
with one SELECT and alembic is only imported when there is migrating or explaining to do.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from sqlalchemy import inspect, text

from skillbank.errors import SchemaError

# The newest migration's revision; tests/test_db.py checks it against the scripts.
HEAD = "0004"


def _location() -> str:
    return str(Path(str(resources.files("skillbank.migrations"))))


def _config(engine=None, connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", _location())
    cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=4)
def _scripts(location: str) -> tuple[str, frozenset[str]]:
    """(head revision, every known revision) of the migration scripts at `location`.

    Parsed once per process: the scripts do not change under it.
    """
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", location)
    scripts = ScriptDirectory.from_config(cfg)
    return scripts.get_current_head(), frozenset(s.revision for s in scripts.walk_revisions())


def head_revision() -> str:
    return _scripts(_location())[0]


def _known_revisions() -> frozenset[str]:
    return _scripts(_location())[1]


def current_revision(engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _state(engine) -> tuple[str | None, bool]:
    """(current revision, whether the database holds no skillbank tables), on one connection.

    An `alembic_version` table left empty by a downgrade to base does not count as a table."""
    from alembic.runtime.migration import MigrationContext

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
                from alembic import command

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


def _at_head(engine) -> bool:
    """One SELECT: is the database's recorded revision this skillbank's HEAD?"""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    except Exception:  # no such table (a new database) or anything odd: take the full path
        return False
    return [r[0] for r in rows] == [HEAD]


def ensure_current(engine) -> None:
    """New database: create it. Older schema: refuse, naming the command that fixes it."""
    if _at_head(engine):
        return
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
