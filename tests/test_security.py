"""The trust boundary (docs/security.md): SHA-256 of every version, audit deciding on it,
`checkout --verify-sha256`, fsck, migration 0004 and its backfill, what the bank writes to disk.

Expected SHA-256 values are computed here from the checked-out safetensors files with json, struct
and hashlib alone (the canonical serialisation re-derived from its definition: tensors in name
order, a header without metadata, padded to 8 bytes), never through skillbank's WeightsDigest.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import stat
import struct
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from conftest import make_finetuned, make_model, run_main
from skillbank.api import Bank

FAKE = "0" * 64  # a SHA-256 no real checkpoint has


# ----------------------------------------------------------------------------- independent hashing

def _read_raw(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """{name: (dtype, shape, raw bytes)} of one safetensors file, metadata dropped."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    return {name: (e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]])
            for name, e in header.items()}


def canonical_sha256(checkout: Path) -> str:
    """SHA-256 of the canonical single-file form of a checkout (one file or HF shards)."""
    index = checkout / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    tensors: dict = {}
    for f in files:
        tensors.update(_read_raw(checkout / f))
    entries, offset = {}, 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256(struct.pack("<Q", len(head)) + head)
    for name in sorted(tensors):
        h.update(tensors[name][2])
    return h.hexdigest()


# ----------------------------------------------------------------------------- helpers



def cli_json(*args):
    code, out, err = run_main(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def one_line_error(code: int, err: str) -> str:
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def engine_of(root: Path, db_url: str | None):
    return create_engine(db_url or f"sqlite:///{root.resolve() / 'bank.db'}")


def set_sha256(root: Path, db_url: str | None, version: int, value: str | None) -> None:
    """What someone with write access to the database (only) can do."""
    engine = engine_of(root, db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE versions SET sha256 = :v WHERE id = :i"), {"v": value, "i": version})
    finally:
        engine.dispose()


@pytest.fixture
def history(tmp_path, db_url):
    """Every way a version is made: v0 init, v1 v2 add-skill on main, v3 add-skill on `side`,
    v4 a branch merge (main), v5 `rebuild v2 --without s1`. Yields (root, db_url, bank)."""
    root = tmp_path / "bank"
    base = make_model(tmp_path / "base.safetensors", seed=0)
    bank, _ = Bank.init(root, str(base), db_url)
    bank.add_skill("s1", str(make_finetuned(base, tmp_path / "ft1.safetensors", seed=1)), 0.8)
    bank.checkout("v1", tmp_path / "v1")
    bank.checkout("main")
    bank.add_skill("s2", str(make_finetuned(tmp_path / "v1", tmp_path / "ft2.safetensors", seed=2)), 0.7)
    bank.add_skill("s3", str(make_finetuned(tmp_path / "v1", tmp_path / "ft3.safetensors", seed=3)), 0.6,
                   from_ref="v1", branch="side")
    assert bank.merge_branches("main", "side")["version"] == "v4"
    assert bank.rebuild_without("v2", "s1")["version"] == "v5"
    try:
        yield root, db_url, bank
    finally:
        bank.close()


# ----------------------------------------------------------------------------- recorded digests

def test_every_kind_of_version_records_the_sha256_of_its_canonical_weights(history, tmp_path):
    root, _, bank = history
    shas = recorded_all(root)
    assert sorted(shas) == [f"v{i}" for i in range(6)]
    for label, sha in shas.items():
        out = tmp_path / f"co-{label}"
        r = cli_json("--bank", root, "checkout", label, "--out", out, "--verify-sha256")
        assert r["sha256"] == sha and r["sha256_verified"] is True
        assert canonical_sha256(out) == sha, label
        meta = json.loads((out / "model.safetensors").read_bytes()[8:8 + struct.unpack(
            "<Q", (out / "model.safetensors").read_bytes()[:8])[0]])["__metadata__"]
        assert meta["skillbank.sha256"] == sha and meta["skillbank.version"] == label
        assert cli_json("--bank", root, "show", label)["sha256"] == sha
    # v0's canonical form is the stored base object itself
    v0 = bank.show("v0")
    assert hashlib.sha256(bank.store.path(v0["digest"]).read_bytes()).hexdigest() == shas["v0"]
    # the layout of a checkout does not change it
    sharded = tmp_path / "sharded"
    bank.checkout("v4", sharded, max_shard_size=100_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert canonical_sha256(sharded) == shas["v4"]


# ----------------------------------------------------------------------------- checkout / fsck

def test_checkout_verify_sha256_refuses_a_mismatch_in_one_line(history, tmp_path):
    root, db_url, _ = history
    set_sha256(root, db_url, 2, FAKE)
    out = tmp_path / "forged"
    line = one_line_error(*run_main("--bank", root, "checkout", "v2", "--out", out, "--verify-sha256")[::2])
    assert "SHA-256" in line and FAKE in line
    assert not (out / "model.safetensors").exists()
    # a plain checkout stays cheap: it checks xxh3 only (that is the point of the flag)
    code, _, err = run_main("--bank", root, "checkout", "v2", "--out", out)
    assert code == 0, err
    # and the flag needs somewhere to rebuild to
    one_line_error(*run_main("--bank", root, "checkout", "v2", "--verify-sha256")[::2])


def test_fsck_checks_the_sha256_of_every_rebuild(history):
    root, db_url, bank = history
    r = bank.fsck()
    assert r["ok"] is True and r["rebuilt"] == 6 and r["sha256_missing"] == []
    set_sha256(root, db_url, 3, FAKE)
    r = bank.fsck()
    assert r["ok"] is False
    assert [p["version"] for p in r["problems"]] == ["v3"] and "SHA-256" in r["problems"][0]["problem"]
    code, out, _ = run_main("--bank", root, "fsck", "--json")
    assert code == 1 and json.loads(out)["problems"][0]["version"] == "v3"


# ----------------------------------------------------------------------------- audit

def test_audit_decides_on_sha256(history, tmp_path):
    root, db_url, bank = history
    out = tmp_path / "v2"
    bank.checkout("v2", out)
    want = canonical_sha256(out)
    r = cli_json("--bank", root, "audit", out)
    assert (r["match"], r["version"], r["verified_by"], r["sha256"]) == ("exact", "v2", "sha256", want)
    assert [s["name"] for s in r["skills"]] == ["s1", "s2"] and r["warnings"] == []

    # The database says v2's SHA-256 is something else: the checkpoint still collides with v2's
    # xxh3 but is not v2 - exactly what a forged checkpoint would look like.
    set_sha256(root, db_url, 2, FAKE)
    code, stdout, err = run_main("--bank", root, "audit", out, "--json")
    r = json.loads(stdout)
    assert code == 0, err  # audit's exit codes are unchanged: only a gate exits non-zero
    assert (r["match"], r["version"], r["skills"], r["verified_by"]) == ("none", None, [], None)
    assert r["collides_with"] == "v2" and r["digest"] == bank.show("v2")["digest"]
    assert "v2" in r["reason"] and "SHA-256" in r["reason"] and "xxh3" in r["reason"]
    code, _, err = run_main("--bank", root, "audit", out, "--require-skill", "s2")
    assert code == 3 and "s2" in err


def test_audit_of_a_version_without_sha256_says_it_rests_on_xxh3(history, tmp_path):
    root, db_url, bank = history
    out = tmp_path / "v1"
    bank.checkout("v1", out)
    set_sha256(root, db_url, 1, None)
    code, stdout, err = run_main("--bank", root, "audit", out, "--json")
    r = json.loads(stdout)
    assert code == 0
    assert (r["match"], r["version"], r["verified_by"]) == ("exact", "v1", "xxh3")
    assert "backfill-sha256" in r["warnings"][0] and "backfill-sha256" in err


# ----------------------------------------------------------------------------- migration 0004

def _alembic(conn) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(importlib.resources.files("skillbank.migrations")))
    cfg.attributes["connection"] = conn
    return cfg


def test_migration_0004_from_a_0003_bank_then_backfill(history, tmp_path):
    root, db_url, bank = history
    before = recorded_all(root)
    bank.close()
    engine = engine_of(root, db_url)
    try:
        with engine.begin() as conn:
            command.downgrade(_alembic(conn), "0003")
        assert "sha256" not in {c["name"] for c in inspect(engine).get_columns("versions")}
        one_line_error(*run_main("--bank", root, "log")[::2])  # an 0003 schema is refused ...

        r = cli_json("--bank", root, "db", "upgrade")  # ... until `db upgrade`
        assert (r["from"], r["to"], r["sha256_missing"]) == ("0003", "0004", 6)
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == "0004"
            assert conn.execute(text("SELECT count(*) FROM versions WHERE sha256 IS NULL")).scalar_one() == 6
    finally:
        engine.dispose()

    assert set(recorded_all(root).values()) == {None}
    assert cli_json("--bank", root, "fsck")["sha256_missing"] == [f"v{i}" for i in range(6)]
    line = one_line_error(*run_main("--bank", root, "checkout", "v2", "--out", tmp_path / "x",
                                   "--verify-sha256")[::2])
    assert "backfill-sha256" in line

    r = cli_json("--bank", root, "db", "backfill-sha256")
    assert r["ok"] and r["missing"] == 6 and len(r["filled"]) == 6
    assert recorded_all(root) == before  # the same values the writes recorded
    again = cli_json("--bank", root, "db", "backfill-sha256")
    assert (again["missing"], again["filled"]) == (0, [])


def test_backfill_records_nothing_for_a_version_that_does_not_rebuild_to_its_digest(history):
    root, db_url, bank = history
    set_sha256(root, db_url, 1, None)
    engine = engine_of(root, db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE versions SET digest = :d WHERE id = 1"), {"d": "f" * 32})
    finally:
        engine.dispose()
    code, out, _ = run_main("--bank", root, "db", "backfill-sha256", "--json")
    r = json.loads(out)
    assert code == 1 and r["filled"] == [] and r["problems"][0]["version"] == "v1"
    assert bank.show("v1")["sha256"] is None


def recorded_all(root: Path) -> dict[str, str | None]:
    """Every version's recorded SHA-256 (both branches' histories)."""
    return {r["version"]: r["sha256"] for ref in ("main", "side", "v5")
            for r in cli_json("--bank", root, "log", ref)}


# ----------------------------------------------------------------------------- on disk

def test_objects_are_read_only(history):
    root, _, _ = history
    mode = {stat.S_IMODE(p.stat().st_mode) for p in (root / "objects").rglob("*") if p.is_file()}
    assert mode == {0o444}


@pytest.mark.postgres
def test_bank_json_holds_no_password(pg_url, tmp_path):
    # A password given with --db is used, never written down (it comes from --db, the
    # environment or ~/.pgpass next time). The test server trusts local connections.
    user, rest = pg_url.split("://", 1)[1].split("@", 1)
    with_password = f"postgresql+psycopg://{user}:s3cret-pw@{rest}"
    other = tmp_path / "pwbank"
    b, _ = Bank.init(other, str(make_model(tmp_path / "b.safetensors", seed=5)), with_password)
    b.close()
    saved = (other / "bank.json").read_text()
    url = make_url(json.loads(saved)["db_url"])
    assert "s3cret-pw" not in saved and url.password is None and url == make_url(pg_url)
    Bank.open(other).close()
    # nor does a clone of that database
    clone, _ = Bank.clone(tmp_path / "clone", with_password)
    clone.close()
    assert "s3cret-pw" not in (tmp_path / "clone" / "bank.json").read_text()


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_new_bank_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        bank, _ = Bank.init(tmp_path / "bank", str(make_model(tmp_path / "b.safetensors", seed=6)))
        bank.close()
    finally:
        os.umask(old)
    root = tmp_path / "bank"
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    for name in ("bank.json", "bank.db"):
        assert stat.S_IMODE((root / name).stat().st_mode) & 0o007 == 0, name


@pytest.mark.postgres
def test_postgresql_roles_of_the_security_doc(pg_server, pg_url, tmp_path):
    """The grants docs/security.md recommends: writers add history, cannot rewrite it; readers read."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    sql = doc.split("```sql\n", 1)[1].split("```", 1)[0]
    suffix = make_url(pg_url).database
    sql = sql.replace("sb_writer", f"w_{suffix}").replace("sb_reader", f"r_{suffix}")
    root = tmp_path / "bank"
    base = make_model(tmp_path / "base.safetensors", seed=0)
    Bank.init(root, str(base), pg_url)[0].close()  # the owning role creates the schema
    pg_server.psql(sql, suffix)
    as_role = {k: pg_url.replace("skillbank@", f"{k}_{suffix}@", 1) for k in ("w", "r")}

    ft = make_finetuned(base, tmp_path / "ft.safetensors", seed=1)
    writer = ["--bank", root, "--db", as_role["w"]]
    for args in (["add-skill", "s", "--finetuned", ft, "--alpha", "0.8"], ["tag", "t", "v1"],
                 ["rollback", "v0"], ["pin", "v1"], ["pin", "v1", "--unpin"], ["revoke", "s", "--reason", "x"]):
        code, _, err = run_main(*writer, *args)
        assert code == 0, (args, err)
    engine = create_engine(as_role["w"])
    try:
        for stmt in ("UPDATE versions SET sha256 = NULL", "DELETE FROM reflog", "UPDATE versions SET digest = 'x'"):
            with pytest.raises(Exception, match="permission denied"), engine.begin() as conn:
                conn.execute(text(stmt))
    finally:
        engine.dispose()

    reader = ["--bank", root, "--db", as_role["r"]]
    assert cli_json(*reader, "audit", tmp_path / "base.safetensors")["verified_by"] == "sha256"
    line = one_line_error(*run_main(*reader, "add-skill", "s2", "--finetuned", ft, "--alpha", "0.5",
                                   "--from", "v0", "--branch", "b2")[::2])
    assert "permission denied" in line
