"""Alembic, driven from code: create on first use, refuse an out-of-date schema, upgrade on request."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from skillbank.errors import SchemaError


def _config(engine=None, connection=None) -> Config:
    location = Path(str(resources.files("skillbank.migrations")))
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_empty(engine) -> bool:
    return not inspect(engine).get_table_names()


def upgrade(engine, revision: str = "head") -> tuple[str | None, str]:
    before = current_revision(engine)
    with engine.begin() as conn:
        command.upgrade(_config(connection=conn), revision)
    return before, current_revision(engine)


def ensure_current(engine) -> None:
    """New database: create it. Older schema: refuse, naming the command that fixes it."""
    if is_empty(engine):
        upgrade(engine)
        return
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    known = {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}
    if current is None:
        raise SchemaError("this database has tables but no skillbank schema version; is it a skillbank bank?")
    if current not in known:
        raise SchemaError(
            f"database schema {current} is newer than this skillbank knows ({head}); upgrade skillbank"
        )
    raise SchemaError(
        f"database schema is at {current}, this skillbank needs {head}: run `skillbank db upgrade`"
    )
