"""Damaged objects: flipped bits, truncation, missing objects, database rows naming absent objects.

Each case damages one object of a three-version bank (v0 base with a config, v1 tagged `stable`,
v2 the tip of `main`) whose objects were pushed to a local directory remote, then checks the whole
story through the command line: the read path fails in one line naming the object, what is wrong
and the versions affected, and changes nothing; an unaffected version still checks out; `fsck`
lists the object with its versions; `fsck --repair` without a remote says it cannot help (exit 1)
and leaves the bank as it was; with the remote configured again it restores the object (the
damaged copy kept in lost+found/), after which fsck is clean and the checkout is bit-identical
to the one made before the damage. Cases run on SQLite, and those where the database
matters on PostgreSQL too.
"""

from __future__ import annotations

import json
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash
from click.testing import CliRunner
from sqlalchemy import update

from conftest import make_finetuned, make_model, objects_snapshot, run_main
from skillbank.api import Bank
from skillbank.cli import cli
from skillbank.db import TaskVector, Version
from skillbank.lineage.uses import ObjectUses
from skillbank.store.damage import LOST_AND_FOUND

NOWHERE = "ab" * 16  # a well-formed digest no object has


class SB:
    """`skillbank --bank DIR [--db URL] ...`."""

    def __init__(self, bank: Path, db: str | None):
        self.bank, self.db = Path(bank), db

    def argv(self, args) -> list[str]:
        return ["--bank", str(self.bank), *(["--db", self.db] if self.db else []), *map(str, args)]

    def run(self, *args, code: int = 0) -> str:
        result = CliRunner().invoke(cli, self.argv(args))
        if result.exit_code != code:
            tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
            raise AssertionError(f"skillbank {' '.join(map(str, args))} exited {result.exit_code}, expected "
                                 f"{code}\nstdout: {result.stdout}\nstderr: {result.stderr}\n{tb}")
        return result.stdout

    def json(self, *args, code: int = 0):
        return json.loads(self.run(*args, "--json", code=code))

    def fail(self, *args) -> str:
        """Through the console entry point: exit 1, exactly one line on stderr, no traceback."""
        got, stdout, stderr = run_main(*self.argv(args))
        assert got == 1, f"exit {got}\nstdout: {stdout}\nstderr: {stderr}"
        lines = stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        return lines[0]


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def obj_path(bank: Path, digest: str) -> Path:
    return bank / "objects" / digest[:2] / digest[2:]


def flip_bit(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    os.chmod(path, 0o444)


def truncate(path: Path) -> None:
    os.chmod(path, 0o644)
    os.truncate(path, path.stat().st_size // 2)
    os.chmod(path, 0o444)


@dataclass
class Built:
    sb: SB
    remote: Path
    ids: dict  # "base", "config", "tv1", "tv2", "m1", "m2", "kf1" -> digest
    outs: dict  # version -> checkout made before any damage


def build(tmp_path: Path, db_url: str | None, pin_v1: bool) -> Built:
    policy = tmp_path / "policy"
    make_model(policy / "model.safetensors", seed=0)
    (policy / "config.json").write_text(json.dumps({"type": "act", "chunk_size": 4}))
    sb = SB(tmp_path / "bank", db_url)
    sb.json("init", "--base", policy)
    sb.json("add-skill", "stack", "--finetuned",
            make_finetuned(policy / "model.safetensors", tmp_path / "ft1.safetensors", seed=1), "--alpha", "0.8")
    sb.run("checkout", "v1", "--out", tmp_path / "v1")
    sb.run("checkout", "main")
    sb.json("add-skill", "wipe", "--finetuned",
            make_finetuned(tmp_path / "v1" / "model.safetensors", tmp_path / "ft2.safetensors", seed=2),
            "--alpha", "0.6")
    sb.json("tag", "stable", "v1")
    if pin_v1:
        sb.json("pin", "v1")
    shows = {v: sb.json("show", v) for v in ("v0", "v1", "v2")}
    manifest0 = json.loads(obj_path(sb.bank, shows["v0"]["manifest"]).read_bytes())
    ids = {"base": shows["v0"]["digest"], "config": manifest0["config"],
           "tv1": shows["v1"]["task_vector"]["object"], "tv2": shows["v2"]["task_vector"]["object"],
           "m1": shows["v1"]["manifest"], "m2": shows["v2"]["manifest"], "kf1": shows["v1"]["digest"]}
    outs = {}
    for v in ("v0", "v1", "v2"):
        outs[v] = tmp_path / f"good-{v}"
        sb.run("checkout", v, "--out", outs[v])
    sb.run("checkout", "main")
    remote = tmp_path / "remote"
    sb.json("remote", "add", "origin", remote)
    assert sb.json("push")["uploaded"] > 0
    sb.json("remote", "remove", "origin")  # the read path cannot fetch; --repair has no remote yet
    return Built(sb, remote, ids, outs)


def edit_row(sb: SB, stmt) -> None:
    bank = Bank.open(sb.bank, sb.db)
    try:
        with bank.db.write() as s:
            s.execute(stmt)
    finally:
        bank.close()


@dataclass
class Case:
    obj: str  # which object (a key of Built.ids), or NOWHERE for a row edited to name nothing
    damage: Callable[[Built], None]
    kind: str  # "corrupt" | "truncated" | "missing"
    affects: str  # as the error line says it
    broken: str | None  # a version whose checkout fails (None: the read path does not use the object)
    healthy: str | None  # a version that still checks out
    pin_v1: bool = False
    without_remote: str = "unrepairable"  # what --repair does with no remote configured
    with_remote: str = "repaired"


def _damage(key: str, how: Callable[[Path], None]) -> Callable[[Built], None]:
    return lambda b: how(obj_path(b.sb.bank, b.ids[key]))


def _remove(key: str) -> Callable[[Built], None]:
    return lambda b: obj_path(b.sb.bank, b.ids[key]).unlink()


CASES = {
    "flipped-bit-base": Case("base", _damage("base", flip_bit), "corrupt",
                             "v0, v1 (stable), v2 (main)", "v1", None),
    "flipped-bit-task-vector": Case("tv2", _damage("tv2", flip_bit), "corrupt", "v2 (main)", "v2", "v1"),
    "flipped-bit-manifest": Case("m2", _damage("m2", flip_bit), "corrupt", "v2 (main)", "v2", "v1"),
    "flipped-bit-keyframe": Case("kf1", _damage("kf1", flip_bit), "corrupt", "v1 (stable), v2 (main)", "v2",
                                 "v0", pin_v1=True, without_remote="repaired"),
    "flipped-bit-config": Case("config", _damage("config", flip_bit), "corrupt",
                               "v0, v1 (stable), v2 (main)", "v2", None),
    "truncated-task-vector": Case("tv1", _damage("tv1", truncate), "truncated", "v1 (stable), v2 (main)",
                                  "v1", "v0"),
    "truncated-base": Case("base", _damage("base", truncate), "truncated", "v0, v1 (stable), v2 (main)",
                           "v0", None),
    "missing-task-vector": Case("tv2", _remove("tv2"), "missing", "v2 (main)", "v2", "v1"),
    "missing-manifest": Case("m1", _remove("m1"), "missing", "v1 (stable), v2 (main)", "v2", "v0"),
    "row-manifest-names-nothing": Case(
        NOWHERE, lambda b: edit_row(b.sb, update(Version).where(Version.id == 2).values(manifest=NOWHERE)),
        "missing", "v2 (main)", "v2", "v1", with_remote="unrepairable"),
    "row-task-vector-names-nothing": Case(
        NOWHERE, lambda b: edit_row(b.sb, update(TaskVector).where(TaskVector.object == b.ids["tv2"])
                                    .values(object=NOWHERE)),
        "missing", "v2 (main)", None, "v2", with_remote="unrepairable"),
}


# PostgreSQL runs the cases where the database is more than the index's source: rows edited to
# name nothing, and one of each kind of damage (the rest would only repeat them, slowly).
ON_POSTGRES = ("flipped-bit-task-vector", "truncated-task-vector", "missing-manifest",
               "row-manifest-names-nothing", "row-task-vector-names-nothing")
BACKENDS = ([pytest.param(n, "sqlite", id=f"sqlite-{n}") for n in CASES]
            + [pytest.param(n, "postgresql", id=f"postgresql-{n}", marks=pytest.mark.postgres)
               for n in ON_POSTGRES])


@pytest.mark.parametrize("name,backend", BACKENDS)
def test_damage_is_named_listed_and_repaired(tmp_path, request, name, backend):
    case = CASES[name]
    db_url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    b = build(tmp_path, db_url, case.pin_v1)
    sb = b.sb
    digest = b.ids.get(case.obj, case.obj)
    versions = [v.split(" ")[0] for v in case.affects.split(", ")]
    path = obj_path(sb.bank, digest)
    case.damage(b)
    damaged = path.read_bytes() if path.exists() else None
    before = objects_snapshot(sb.bank)

    # The read path: one line naming the object, the damage and the versions; nothing changes.
    if case.broken:
        out = tmp_path / "out-broken"
        line = sb.fail("checkout", case.broken, "--out", out)
        assert line.startswith("error: ") and digest in line, line
        assert case.kind in line and f"affects {case.affects}" in line, line
        assert "fsck --repair" in line
        assert not (out / "model.safetensors").exists()
        assert objects_snapshot(sb.bank) == before
        assert (path.read_bytes() if path.exists() else None) == damaged
        if case.kind == "truncated":
            assert f"is truncated ({len(damaged)} of " in line
    if case.healthy:
        sb.run("checkout", case.healthy, "--out", tmp_path / "out-healthy")
        assert tree_bytes(tmp_path / "out-healthy") == tree_bytes(b.outs[case.healthy])

    # fsck lists it, with the versions it breaks.
    report = sb.json("fsck", code=1)
    entry = next(p for p in report["problems"] if p.get("object") == digest)
    assert entry["kind"] == case.kind and entry["versions"] == versions, entry
    if case.kind == "truncated":
        m = re.fullmatch(rf"truncated \({len(damaged)} of (\d+) bytes\)", entry["problem"])
        assert m and int(m[1]) >= 2 * len(damaged), entry
    if case.obj == NOWHERE:
        assert entry["rows"], entry  # the database row that names the absent object
    human = sb.run("fsck", code=1)
    assert digest in human and "affects" in human

    # --repair with no remote: says so, exit 1, the bank as it was (except a rebuilt keyframe).
    first = sb.json("fsck", "--repair", code=0 if case.without_remote == "repaired" else 1)
    fixed = next(r for r in first["repairs"] if r["object"] == digest)
    assert fixed["result"] == case.without_remote, fixed
    if case.without_remote == "unrepairable":
        assert "no remote" in fixed["detail"]
        assert any(p.get("object") == digest for p in first["problems"])
        assert objects_snapshot(sb.bank) == before
        assert (path.read_bytes() if path.exists() else None) == damaged
        sb.json("remote", "add", "origin", b.remote)
        second = sb.json("fsck", "--repair", code=0 if case.with_remote == "repaired" else 1)
        fixed = next(r for r in second["repairs"] if r["object"] == digest)
        assert fixed["result"] == case.with_remote, fixed
        if case.with_remote == "unrepairable":
            assert "'origin' has no copy" in fixed["detail"]
            assert second["problems"]
            return
        assert fixed["source"] == "remote 'origin'"
    else:
        assert fixed["source"] == "rebuilt from v1's chain"
    if damaged is not None:  # the damaged copy is kept, not deleted
        kept = Path(fixed["moved_to"])
        assert kept.parent == sb.bank / LOST_AND_FOUND and kept.name.startswith(digest)
        assert kept.read_bytes() == damaged
    else:
        assert fixed["moved_to"] is None
    assert xxhash.xxh3_128_hexdigest(path.read_bytes()) == digest
    clean = sb.json("fsck")
    assert clean["ok"] and clean["problems"] == []
    for v in versions:
        out = tmp_path / f"after-{v}"
        got = sb.json("checkout", v, "--out", out)
        assert got["verified"] and tree_bytes(out) == tree_bytes(b.outs[v])


def test_a_corrupt_copy_on_the_remote_is_refused_by_repair(tmp_path):
    b = build(tmp_path, None, pin_v1=False)
    sb, tv = b.sb, b.ids["tv2"]
    flip_bit(obj_path(sb.bank, tv))
    flip_bit(obj_path(b.remote, tv))
    damaged = obj_path(sb.bank, tv).read_bytes()
    sb.json("remote", "add", "origin", b.remote)
    report = sb.json("fsck", "--repair", code=1)
    fixed = next(r for r in report["repairs"] if r["object"] == tv)
    assert fixed["result"] == "unrepairable" and "corrupt copy" in fixed["detail"]
    assert obj_path(sb.bank, tv).read_bytes() == damaged  # put back: the bank is as it was
    assert not list((sb.bank / LOST_AND_FOUND).glob("*"))
    line = sb.fail("checkout", "v2", "--out", tmp_path / "out")
    assert tv in line and "corrupt" in line and "affects v2 (main)" in line


def test_add_skill_on_a_damaged_parent_fails_and_records_nothing(tmp_path, db_url):
    b = build(tmp_path, db_url, pin_v1=False)
    sb = b.sb
    flip_bit(obj_path(sb.bank, b.ids["tv2"]))
    before = objects_snapshot(sb.bank)
    ft = make_finetuned(b.outs["v2"] / "model.safetensors", tmp_path / "ft3.safetensors", seed=3)
    line = sb.fail("add-skill", "fold", "--finetuned", ft, "--alpha", "0.5")
    assert b.ids["tv2"] in line and "corrupt" in line and "affects v2 (main)" in line
    assert objects_snapshot(sb.bank) == before
    assert [r["version"] for r in sb.json("log")] == ["v2", "v1", "v0"]


def test_an_unneeded_damaged_object_is_moved_aside(tmp_path):
    b = build(tmp_path, None, pin_v1=False)
    sb = b.sb
    bank = Bank.open(sb.bank)
    try:
        stray = bank.store.put_bytes(b"left behind by an interrupted add-skill")
    finally:
        bank.close()
    flip_bit(obj_path(sb.bank, stray))
    entry = next(p for p in sb.json("fsck", code=1)["problems"] if p.get("object") == stray)
    assert entry["versions"] == [] and entry["kind"] == "corrupt"
    fixed = next(r for r in sb.json("fsck", "--repair")["repairs"] if r["object"] == stray)
    assert fixed["result"] == "moved aside" and Path(fixed["moved_to"]).is_file()
    assert not obj_path(sb.bank, stray).exists()


# ----------------------------------------------------------------------------- the index itself

def test_affected_versions_follow_delta_chains_and_stop_at_merges(tmp_path, db_url):
    """rebuild --without re-applies a task vector against the version it was encoded on, so that
    version's objects affect the replayed one; a branch merge is kept whole, so the objects of the
    branches it combined do not affect it."""
    b = build(tmp_path, db_url, pin_v1=False)
    sb = b.sb
    rebuilt = sb.json("rebuild", "main", "--without", "stack")  # v3: wipe replayed onto v0
    assert rebuilt["version"] == "v3"
    sb.json("branch", "side", "v1")
    sb.run("checkout", "side")
    sb.json("add-skill", "pour", "--finetuned",
            make_finetuned(b.outs["v1"] / "model.safetensors", tmp_path / "ft4.safetensors", seed=4),
            "--alpha", "0.5")  # v4 on side
    merged = sb.json("merge", "main", "side")
    assert merged["version"] == "v5"
    bank = Bank.open(sb.bank, sb.db)
    try:
        with bank.db.read() as s:
            uses = ObjectUses.build(s, bank.store)
        tv4 = bank.show("v4")["task_vector"]["object"]
        assert uses.affected(b.ids["tv1"]) == [1, 2, 3, 4]  # v3's delta parent is v1
        assert uses.affected(b.ids["tv2"]) == [2, 3]
        assert uses.affected(tv4) == [4]  # not the merge v5: it rebuilds from its own object
        assert uses.affected(b.ids["base"]) == [0, 1, 2, 3, 4]
        assert uses.affected(merged["digest"]) == [5]
        # with a manifest unreadable, the database rows still give its versions and descendants
        flip_bit(obj_path(sb.bank, b.ids["m1"]))
        with bank.db.read() as s:
            blind = ObjectUses.build(s, bank.store)
        assert blind.affected(b.ids["m1"]) == [1, 2, 3, 4]
        assert blind.affected(b.ids["tv1"]) == [1, 2, 3, 4]
    finally:
        bank.close()


def test_recorded_sizes_match_the_objects(tmp_path):
    """The sizes the index expects (rows, manifests) are the real ones, so "truncated" is exact."""
    b = build(tmp_path, None, pin_v1=True)
    bank = Bank.open(b.sb.bank)
    try:
        with bank.db.read() as s:
            uses = ObjectUses.build(s, bank.store)
        for key in ("base", "tv1", "tv2", "kf1"):
            d = b.ids[key]
            assert uses.sizes[d] == bank.store.size(d), key
    finally:
        bank.close()
