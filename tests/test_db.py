"""The database layer on SQLite and PostgreSQL: schema creation, pragmas, migrations, packaging."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy import exc as sa_exc

from conftest import make_finetuned, make_model, run_main
from skillbank.api import Bank
from skillbank.db import Base, Ref
from skillbank.db import migrate
from skillbank.errors import SchemaError, SkillbankError

REPO = Path(__file__).resolve().parents[1]
BANK_TABLES = {"meta", "versions", "skills", "task_vectors", "refs", "reflog", "evals"}


def script_dir() -> ScriptDirectory:
    """The migrations as shipped in the package, read by alembic directly (not through skillbank)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(importlib.resources.files("skillbank.migrations")))
    return ScriptDirectory.from_config(cfg)


def alembic_config(connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(importlib.resources.files("skillbank.migrations")))
    cfg.attributes["connection"] = connection
    return cfg


def revision_of(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def url_of(root: Path, db_url: str | None) -> str:
    return db_url or f"sqlite:///{root.resolve() / 'bank.db'}"




def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 1, (code, out, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture
def bank_with_history(tmp_path, db_url):
    """A bank with v0 and v1 on main; yields (root, db_url, engine on its database)."""
    root = tmp_path / "bank"
    base = make_model(tmp_path / "base.safetensors", seed=0)
    ft = make_finetuned(base, tmp_path / "ft.safetensors", seed=1)
    bank, _ = Bank.init(root, str(base), db_url)
    bank.add_skill("s", str(ft), 0.8)
    bank.close()
    engine = create_engine(url_of(root, db_url))
    try:
        yield root, db_url, engine
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- creation

def test_fresh_database_is_created_at_head(tmp_path, db_url):
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(make_model(tmp_path / "base.safetensors")), db_url)
    bank.close()
    engine = create_engine(url_of(root, db_url))
    try:
        assert revision_of(engine) == script_dir().get_current_head() == migrate.head_revision() == migrate.HEAD
        assert BANK_TABLES | {"alembic_version"} <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            bank_id = conn.execute(text("SELECT value FROM meta WHERE key = 'bank_id'")).scalar_one()
        assert bank_id == json.loads((root / "bank.json").read_text())["bank_id"]
    finally:
        engine.dispose()
    if db_url is None:
        assert (root / "bank.db").is_file()
        assert "db_url" not in json.loads((root / "bank.json").read_text())
    else:
        assert not (root / "bank.db").exists()
        assert json.loads((root / "bank.json").read_text())["db_url"] == db_url
    Bank.open(root).close()  # the URL is remembered by the bank


def test_open_on_an_empty_database_creates_the_schema_and_says_so(bank_with_history, tmp_path, request):
    root, db_url, _ = bank_with_history
    if db_url is None:
        # A SQLite URL naming no file is refused before connecting: only `init` creates one.
        missing = tmp_path / "other.db"
        with pytest.raises(SkillbankError, match="no SQLite database at .*only at `init`"):
            Bank.open(root, f"sqlite:///{missing}")
        assert not missing.exists()
        sqlite3.connect(missing).execute("VACUUM").connection.close()  # an empty database file
        other = f"sqlite:///{missing}"
    else:
        other = request.getfixturevalue("pg_url")
    with pytest.raises(SkillbankError, match="holds no bank.*skillbank init"):
        Bank.open(root, other)
    engine = create_engine(other)
    try:
        assert revision_of(engine) == migrate.head_revision()
    finally:
        engine.dispose()
    code, out, err = run_main("--bank", root, "--db", other, "log")
    assert "holds no bank" in one_line_error(code, out, err)


def test_sqlite_pragmas(tmp_path):
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(make_model(tmp_path / "base.safetensors")))
    try:
        assert bank.db.is_sqlite
        with bank.db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar().lower() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    finally:
        bank.close()
    # WAL is a property of the file: a plain sqlite3 connection sees it too
    with sqlite3.connect(root / "bank.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


def test_foreign_keys_are_enforced(tmp_path, db_url):
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(make_model(tmp_path / "base.safetensors")), db_url)
    try:
        with pytest.raises(sa_exc.IntegrityError):
            with bank.db.write() as s:
                s.add(Ref(name="dangling", kind="branch", version_id=999))
        assert [b["name"] for b in bank.branches()] == ["main"]
    finally:
        bank.close()


BAD_URLS = {
    "malformed": "not a url",
    "unknown-driver": "postgresql+nodriver://user:s3cret@127.0.0.1/db",
    "driver-not-installed": "mysql+mysqldb://user:s3cret@127.0.0.1/db",
    "refused": "postgresql+psycopg://user:s3cret@127.0.0.1:1/db",
    "sqlite-in-missing-dir": "sqlite:////nonexistent-skillbank-dir/bank.db",
}


@pytest.mark.parametrize("url", list(BAD_URLS.values()), ids=list(BAD_URLS))
def test_unusable_database_url_is_one_line(tmp_path, url):
    base = make_model(tmp_path / "base.safetensors")
    # init: nothing is left behind
    line = one_line_error(*run_main("--bank", tmp_path / "new", "--db", url, "init", "--base", base))
    assert "s3cret" not in line
    assert not (tmp_path / "new").exists()
    # an existing bank opened with a URL that cannot work
    Bank.init(tmp_path / "bank", str(base))[0].close()
    line = one_line_error(*run_main("--bank", tmp_path / "bank", "--db", url, "log"))
    assert "s3cret" not in line
    code, out, err = run_main("--bank", tmp_path / "bank", "log", "--json")
    assert code == 0 and json.loads(out)[0]["version"] == "v0"


# ----------------------------------------------------------------------------- schema versions

def test_out_of_date_schema_is_refused_until_db_upgrade(bank_with_history, tmp_path):
    root, db_url, engine = bank_with_history
    head = migrate.head_revision()
    older = script_dir().get_revision(head).down_revision
    if older is None:
        pytest.skip("only one migration: there is no older schema to hold a bank")
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), older)
    assert revision_of(engine) == older

    with pytest.raises(SchemaError, match="skillbank db upgrade"):
        Bank.open(root, db_url)
    line = one_line_error(*run_main("--bank", root, "log"))
    assert "skillbank db upgrade" in line and older in line and head in line

    code, out, err = run_main("--bank", root, "db", "upgrade", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["from"], r["to"]) == (older, head)
    assert revision_of(engine) == head

    bank = Bank.open(root, db_url)
    try:
        assert [r["version"] for r in bank.log("main")] == ["v1", "v0"]
        bank.checkout("main", tmp_path / "out")
        assert bank.fsck()["ok"] is True
    finally:
        bank.close()
    code, out, err = run_main("--bank", root, "db", "upgrade", "--json")  # already current: a no-op
    r = json.loads(out)
    assert code == 0 and (r["from"], r["to"]) == (head, head)


def test_schema_from_a_newer_skillbank_is_refused(bank_with_history):
    root, db_url, engine = bank_with_history
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff0000ffff'"))
    with pytest.raises(SchemaError, match="newer"):
        Bank.open(root, db_url)
    line = one_line_error(*run_main("--bank", root, "log"))
    assert "ffff0000ffff" in line and "upgrade skillbank" in line
    # `db upgrade` cannot go forward from a revision it does not know: one line, nothing changed
    line = one_line_error(*run_main("--bank", root, "db", "upgrade"))
    assert "ffff0000ffff" in line
    assert revision_of(engine) == "ffff0000ffff"


def test_database_without_a_schema_version_is_refused(bank_with_history):
    root, db_url, engine = bank_with_history
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
    with pytest.raises(SchemaError, match="no skillbank schema version"):
        Bank.open(root, db_url)
    one_line_error(*run_main("--bank", root, "log"))
    # `db upgrade` must not try to create tables over the existing ones
    line = one_line_error(*run_main("--bank", root, "db", "upgrade"))
    assert "schema version" in line
    assert BANK_TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM versions")).scalar_one() == 2


def test_downgraded_to_base_is_refused_with_one_line(bank_with_history):
    root, db_url, engine = bank_with_history
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert not BANK_TABLES & set(inspect(engine).get_table_names())
    with pytest.raises(SkillbankError):
        Bank.open(root, db_url)
    one_line_error(*run_main("--bank", root, "log"))


# ----------------------------------------------------------------------------- migrations

def _fresh_engine(tmp_path, db_url):
    if db_url is None:
        return create_engine(f"sqlite:///{tmp_path / 'migrations.db'}")
    return create_engine(db_url)


def _schema_diff(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_migrations_upgrade_downgrade_upgrade(tmp_path, db_url):
    engine = _fresh_engine(tmp_path, db_url)
    scripts = script_dir()
    revisions = [r.revision for r in reversed(list(scripts.walk_revisions()))]  # oldest first
    try:
        for _ in range(2):
            # one step at a time up ...
            for rev in revisions:
                with engine.begin() as conn:
                    command.upgrade(alembic_config(conn), rev)
                assert revision_of(engine) == rev
            assert BANK_TABLES <= set(inspect(engine).get_table_names())
            # the migrations build exactly the schema the models describe
            assert _schema_diff(engine) == []
            # ... and all the way down, one step at a time
            for rev in reversed(revisions):
                with engine.begin() as conn:
                    command.downgrade(alembic_config(conn), "-1")
                assert revision_of(engine) == scripts.get_revision(rev).down_revision
            assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        # skillbank's own runner does the same from an empty database
        before, after = migrate.upgrade(engine)
        assert (before, after) == (None, revisions[-1])
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- packaging

def test_migrations_are_package_resources():
    files = importlib.resources.files("skillbank.migrations")
    for name in ("env.py", "script.py.mako", "__init__.py"):
        assert files.joinpath(name).is_file(), name
    assert files.joinpath("versions").joinpath("0001_initial_schema.py").is_file()
    shipped = {p.name for p in files.joinpath("versions").iterdir() if p.name.endswith(".py")}
    in_repo = {p.name for p in (REPO / "migrations" / "versions").glob("*.py")}
    assert shipped == in_repo


def test_wheel_carries_the_migrations(tmp_path):
    """Build a wheel the way `pip install .` does (setuptools' PEP 517 backend, no network) from a
    clean copy of the project, install it into a directory, and use its migrations from there."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("skillbank", "migrations"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for extra in ("LICENSE", "MANIFEST.in", "setup.cfg", "setup.py"):
        if (REPO / extra).exists():
            shutil.copy(REPO / extra, src / extra)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))",
         str(dist)], cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = dist / build.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in ("skillbank/migrations/env.py", "skillbank/migrations/script.py.mako",
                  "skillbank/migrations/versions/0001_initial_schema.py"):
            assert f in names, f
        shipped = {n.rsplit("/", 1)[1] for n in names
                   if n.startswith("skillbank/migrations/versions/") and n.endswith(".py")}
        assert shipped == {p.name for p in (REPO / "migrations" / "versions").glob("*.py")}
        assert not any(n.startswith("migrations/") for n in names)  # only inside the package
        z.extractall(tmp_path / "site")

    probe = (
        "import importlib.resources, json, skillbank.migrations as m\n"
        "from alembic.config import Config\n"
        "from alembic.script import ScriptDirectory\n"
        "files = importlib.resources.files('skillbank.migrations')\n"
        "cfg = Config(); cfg.set_main_option('script_location', str(files))\n"
        "print(json.dumps({'file': m.__file__, 'head': ScriptDirectory.from_config(cfg).get_current_head()}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert Path(got["file"]).resolve().is_relative_to((tmp_path / "site").resolve())
    assert got["head"] == migrate.head_revision()
