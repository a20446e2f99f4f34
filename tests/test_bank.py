"""The Bank API against real databases: concurrent writers, garbage collection, fsck.

Concurrency runs real processes (multiprocessing, spawn) against the same bank. Each writer
waits on a shared barrier from inside its add-skill pass (through the progress callback, which
runs after the parent and the branch tip were read and before anything is committed), so the
writers are guaranteed to overlap: the race is not left to timing.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from conftest import (assert_within_one_ulp, make_finetuned, make_model, read_safetensors_np,
                      retain_np)
from click.testing import CliRunner

from skillbank.api import Bank
from skillbank.cli import cli
from skillbank.db import RefLog, Skill, TaskVector, Version
from skillbank.errors import BranchMoved, IntegrityError, RefError, SkillbankError

BARRIER_TIMEOUT = 120

# ----------------------------------------------------------------------------- worker processes

_barrier = None


def _init_worker(barrier) -> None:
    global _barrier
    _barrier = barrier


def _add_skill_in_process(root: str, db_url: str | None, name: str, finetuned: str, alpha: float,
                          branch: str | None) -> tuple:
    """Runs in a spawned process: open the bank, add a skill, meet the other writer mid-pass."""
    bank = Bank.open(root, db_url)
    met = []

    def progress(_n: int) -> None:
        if not met:
            met.append(True)
            _barrier.wait(timeout=BARRIER_TIMEOUT)

    try:
        r = bank.add_skill(name, finetuned, alpha, branch=branch, progress=progress)
        return ("ok", name, r["version"], r["branch"], r["digest"], os.getpid())
    except BranchMoved as e:
        return ("moved", name, str(e), os.getpid())
    except Exception as e:  # reported to the test, which fails with it
        return ("error", name, f"{type(e).__name__}: {e}", os.getpid())
    finally:
        bank.close()


@pytest.fixture(scope="module")
def writers():
    """Two spawned worker processes (started once: each imports torch) and their barrier."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    pool = ctx.Pool(2, initializer=_init_worker, initargs=(barrier,))
    try:
        yield pool, barrier
    finally:
        pool.terminate()
        pool.join()


def _race(writers, jobs: list[tuple]) -> list[tuple]:
    pool, barrier = writers
    barrier.reset()
    pending = [pool.apply_async(_add_skill_in_process, job) for job in jobs]
    results = [p.get(timeout=BARRIER_TIMEOUT + 60) for p in pending]
    assert len({r[-1] for r in results}) == len(jobs), "both jobs ran in the same process"
    errors = [r for r in results if r[0] == "error"]
    assert not errors, errors
    return results


def _count(bank: Bank, model) -> int:
    with bank.db.read() as s:
        return s.scalar(select(func.count()).select_from(model))


@pytest.fixture
def models(tmp_path):
    base = make_model(tmp_path / "models" / "base.safetensors", seed=0)
    fts = [make_finetuned(base, tmp_path / "models" / f"ft{i}.safetensors", seed=10 + i) for i in range(3)]
    return base, fts


# ----------------------------------------------------------------------------- concurrency

def test_concurrent_add_skill_on_one_branch_one_wins(tmp_path, db_url, models, writers):
    base, (ft_a, ft_b, _) = models
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(base), db_url)
    try:
        results = _race(writers, [(str(root), db_url, "skill-a", str(ft_a), 0.8, None),
                                  (str(root), db_url, "skill-b", str(ft_b), 0.8, None)])
        won = [r for r in results if r[0] == "ok"]
        lost = [r for r in results if r[0] == "moved"]
        assert len(won) == 1 and len(lost) == 1, results
        _, winner, version, branch, digest, _ = won[0]
        assert (version, branch) == ("v1", "main")
        assert "retry" in lost[0][2] and "main" in lost[0][2]

        # the branch points at the winner; nothing of the loser was committed
        assert bank.branches() == [{"name": "main", "version": "v1", "current": True}]
        log = bank.log("main")
        assert [(r["version"], r["skill"], r["digest"]) for r in log] == [("v1", winner, digest), ("v0", None, log[1]["digest"])]
        assert _count(bank, Version) == 2 and _count(bank, Skill) == 1 and _count(bank, TaskVector) == 1
        moves = bank.reflog("main")
        assert [(m["old"], m["new"], m["action"]) for m in moves] == [("v0", "v1", "add-skill"), (None, "v0", "init")]
        with pytest.raises(RefError):
            bank.resolve("v2")

        # what was committed is whole: it rebuilds to its digest and to the winner's merge
        assert bank.fsck()["ok"] is True
        out = tmp_path / "out"
        bank.checkout("main", out)
        ft = ft_a if winner == "skill-a" else ft_b
        _, want = retain_np(read_safetensors_np(base)[0], read_safetensors_np(ft)[0], lambda n: 0.8)
        assert_within_one_ulp(read_safetensors_np(out)[0], want)

        # the loser retries from the new tip and gets in
        r = bank.add_skill("skill-c", str(ft_a if winner != "skill-a" else ft_b), 0.5, force=True)
        assert (r["version"], r["parent"], r["branch"]) == ("v2", "v1", "main")
    finally:
        bank.close()


def test_concurrent_add_skill_on_two_branches_both_win(tmp_path, db_url, models, writers):
    base, (ft_a, ft_b, _) = models
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(base), db_url)
    try:
        bank.create_branch("arm-a", "v0")
        bank.create_branch("arm-b", "v0")
        results = _race(writers, [(str(root), db_url, "skill-a", str(ft_a), 0.8, "arm-a"),
                                  (str(root), db_url, "skill-b", str(ft_b), 0.7, "arm-b")])
        assert [r[0] for r in results] == ["ok", "ok"], results
        got = {r[3]: r[2] for r in results}  # branch -> version
        assert sorted(got.values()) == ["v1", "v2"]
        branches = {b["name"]: b["version"] for b in bank.branches()}
        assert branches == {"main": "v0", "arm-a": got["arm-a"], "arm-b": got["arm-b"]}
        for br, skill in (("arm-a", "skill-a"), ("arm-b", "skill-b")):
            log = bank.log(br)
            assert [r["version"] for r in log] == [got[br], "v0"]
            assert log[0]["skill"] == skill and log[0]["parent"] == "v0"
            assert [(m["old"], m["new"]) for m in bank.reflog(br)] == [("v0", got[br]), (None, "v0")]
        assert _count(bank, Version) == 3 and _count(bank, Skill) == 2 and _count(bank, TaskVector) == 2
        assert bank.fsck()["ok"] is True
    finally:
        bank.close()


def test_concurrent_add_skill_creating_one_new_branch(tmp_path, db_url, models, writers):
    """Two writers both create branch `feature`: one gets it, the other a one-line RefError."""
    base, (ft_a, ft_b, _) = models
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(base), db_url)
    try:
        pool, barrier = writers
        barrier.reset()
        jobs = [(str(root), db_url, "skill-a", str(ft_a), 0.8, "feature"),
                (str(root), db_url, "skill-b", str(ft_b), 0.8, "feature")]
        results = [p.get(timeout=BARRIER_TIMEOUT + 60)
                   for p in [pool.apply_async(_add_skill_in_process, job) for job in jobs]]
        won = [r for r in results if r[0] == "ok"]
        lost = [r for r in results if r[0] != "ok"]
        assert len(won) == 1 and len(lost) == 1, results
        assert "feature" in lost[0][2] and "\n" not in lost[0][2]
        assert "RefError" in lost[0][2] or lost[0][0] == "moved"
        branches = {b["name"]: b["version"] for b in bank.branches()}
        assert branches == {"main": "v0", "feature": won[0][2]}
        assert [r["skill"] for r in bank.log("feature")] == [won[0][1], None]
        assert _count(bank, Version) == 2 and _count(bank, Skill) == 1 and _count(bank, TaskVector) == 1
        assert [(m["old"], m["new"]) for m in bank.reflog("feature")] == [(None, won[0][2])]
        assert bank.fsck()["ok"] is True
    finally:
        bank.close()


def test_concurrent_threads_on_one_branch(tmp_path, db_url, models):
    """The same race between threads of one process, each with its own Bank (engine)."""
    base, fts = models
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(base), db_url)
    barrier = threading.Barrier(len(fts))
    results: dict[str, object] = {}

    def run(i: int) -> None:
        b = Bank.open(root, db_url)
        met = []

        def progress(_n):
            if not met:
                met.append(True)
                barrier.wait(timeout=BARRIER_TIMEOUT)

        try:
            results[f"s{i}"] = b.add_skill(f"s{i}", str(fts[i]), 0.8, progress=progress)
        except Exception as e:
            results[f"s{i}"] = e
        finally:
            b.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BARRIER_TIMEOUT + 60)
    try:
        won = {k: v for k, v in results.items() if isinstance(v, dict)}
        lost = {k: v for k, v in results.items() if not isinstance(v, dict)}
        assert len(won) == 1, results
        assert all(isinstance(e, BranchMoved) for e in lost.values()), lost
        assert len(lost) == len(fts) - 1
        (name, r), = won.items()
        assert r["version"] == "v1"
        assert [row["skill"] for row in bank.log("main")] == [name, None]
        assert _count(bank, Version) == 2 and _count(bank, Skill) == 1
        with bank.db.read() as s:
            assert s.scalar(select(func.count()).select_from(RefLog).where(RefLog.action == "add-skill")) == 1
    finally:
        bank.close()


# ----------------------------------------------------------------------------- gc

def _objects(bank: Bank) -> set[str]:
    return set(bank.store)


def test_gc_removes_what_a_failed_add_skill_left(tmp_path, db_url, models):
    base, (ft_winner, ft_loser, ft_next) = models
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(base), db_url)
    other = Bank.open(root, db_url)
    try:
        before = _objects(bank)
        moved = []

        def progress(_n):  # another writer moves main while this add-skill is mid-pass
            if not moved:
                moved.append(other.add_skill("winner", str(ft_winner), 0.8))

        with pytest.raises(BranchMoved, match="retry"):
            bank.add_skill("loser", str(ft_loser), 0.6, progress=progress, keyframe="always")
        assert moved and moved[0]["version"] == "v1"
        after_race = _objects(bank)
        referenced = bank.referenced_objects()
        orphans = after_race - referenced
        # the loser's task vector, manifest and keyframe were written, and nothing refers to them
        assert len(orphans) >= 3, orphans
        assert before <= referenced
        assert [r["version"] for r in bank.log("main")] == ["v1", "v0"]

        # young objects are protected by the grace period (a writer may be about to commit them)
        r = bank.gc()
        assert r["removed"] == 0 and _objects(bank) == after_race
        r = bank.gc(grace_seconds=0, dry_run=True)
        assert set(r["objects"]) == orphans and _objects(bank) == after_race

        r = bank.gc(grace_seconds=0)
        assert set(r["objects"]) == orphans and r["removed"] == len(orphans) and r["bytes_freed"] > 0
        assert _objects(bank) == referenced
        assert bank.gc(grace_seconds=0)["removed"] == 0
        fsck = bank.fsck()
        assert fsck["ok"] is True, fsck["problems"]
        bank.checkout("main", tmp_path / "out")

        # and the bank goes on: the loser retries from the new tip
        make_finetuned(tmp_path / "out", tmp_path / "models" / "retry.safetensors", seed=42)
        r = bank.add_skill("loser", str(tmp_path / "models" / "retry.safetensors"), 0.6)
        assert (r["version"], r["parent"]) == ("v2", "v1")
        assert bank.gc(grace_seconds=0)["removed"] == 0
        assert bank.fsck()["ok"] is True
    finally:
        other.close()
        bank.close()


def test_gc_keeps_every_referenced_object(tmp_path, db_url, models):
    base, fts = models
    root = tmp_path / "bank"
    policy = tmp_path / "policy"
    make_model(policy / "model.safetensors", seed=0)
    (policy / "config.json").write_text('{"type": "test"}\n')
    bank, _ = Bank.init(root, str(policy), db_url)
    try:
        for i, ft in enumerate(fts):
            bank.add_skill(f"s{i}", str(ft if i == 0 else _finetune_tip(bank, tmp_path, i)), 0.7)
        everything = _objects(bank)
        assert bank.gc(grace_seconds=0)["removed"] == 0
        assert _objects(bank) == everything
        bank.checkout("main", tmp_path / "out")
        assert (tmp_path / "out" / "config.json").read_text() == '{"type": "test"}\n'
        assert bank.fsck()["ok"] is True

        # a pinned version is kept whole (one more object), and gc keeps it while it is pinned
        v2 = bank.show("v2")["digest"]
        bank.pin("v2")
        assert _objects(bank) == everything | {v2}
        assert bank.gc(grace_seconds=0)["removed"] == 0
        bank.checkout("main", tmp_path / "out-pinned")
        assert (tmp_path / "out-pinned" / "model.safetensors").read_bytes() == \
            (tmp_path / "out" / "model.safetensors").read_bytes()
        # unpinned, it is garbage; the version still rebuilds from its chain
        bank.unpin("v2")
        assert bank.gc(grace_seconds=0)["objects"] == [v2]
        assert _objects(bank) == everything
        assert bank.fsck()["ok"] is True
    finally:
        bank.close()


def test_gc_refuses_while_a_manifest_cannot_be_read(tmp_path, models):
    """A damaged manifest hides which objects its version needs: collecting then could lose them."""
    base, (ft, _, _) = models
    bank, _ = Bank.init(tmp_path / "bank", str(base))
    try:
        bank.add_skill("s", str(ft), 0.7)
        tv = bank.show("v1")["task_vector"]["object"]
        manifest = bank.resolve("v1").manifest
        everything = _objects(bank)
        bank.store.remove(manifest)
        with pytest.raises(IntegrityError, match=f"gc refused: manifest {manifest}"):
            bank.gc(grace_seconds=0)
        assert _objects(bank) == everything - {manifest}
        assert bank.store.has(tv)
    finally:
        bank.close()


def _finetune_tip(bank: Bank, tmp: Path, i: int) -> Path:
    out = tmp / "tips" / str(i)
    bank.checkout("main", out)
    return make_finetuned(out, tmp / "models" / f"tip-ft{i}.safetensors", seed=100 + i)


# ----------------------------------------------------------------------------- fsck

def test_fsck_names_a_corrupted_task_vector(tmp_path, db_url, models):
    base, (ft, _, _) = models
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(base), db_url)
    try:
        r = bank.add_skill("s", str(ft), 0.8)
        assert bank.fsck()["ok"] is True
        tv = bank.show("v1")["task_vector"]["object"]
        path = bank.store.path(tv)
        assert path.stat().st_mode & 0o777 == 0o444  # objects are read-only: chmod to damage one
        os.chmod(path, 0o644)
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(data))
        os.chmod(path, 0o444)

        fresh = Bank.open(root, db_url)  # no verification cached from before
        try:
            report = fresh.fsck()
            assert report["ok"] is False
            by_object = {p["object"]: p["problem"] for p in report["problems"] if "object" in p}
            assert tv in by_object and "match" in by_object[tv]
            assert any(p.get("version") == "v1" for p in report["problems"])
            assert not any(p.get("version") == "v0" for p in report["problems"])
            with pytest.raises(Exception) as e:
                fresh.checkout("v1", tmp_path / "out")
            assert tv in str(e.value) and "corrupt" in str(e.value)
            assert not (tmp_path / "out" / "model.safetensors").exists()
            fresh.checkout("v0", tmp_path / "out-v0")  # the base is untouched
            assert r["digest"] != fresh.show("v0")["digest"]
        finally:
            fresh.close()
        # the command line says so too, and exits 1
        result = CliRunner().invoke(cli, ["--bank", str(root), "fsck"])
        assert result.exit_code == 1
        assert tv in result.stdout and "problem" in result.stdout
    finally:
        bank.close()


def test_fsck_reports_a_missing_object(tmp_path, db_url, models):
    base, (ft, _, _) = models
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(base), db_url)
    try:
        bank.add_skill("s", str(ft), 0.8)
        manifest = bank.show("v1")["manifest"]
        bank.store.path(manifest).unlink()
        report = Bank.open(root, db_url).fsck()
        assert report["ok"] is False
        entry = next(p for p in report["problems"] if p.get("object") == manifest)
        assert entry["problem"] == "missing" and entry["versions"] == ["v1"]
        assert any(p.get("version") == "v1" for p in report["problems"])
    finally:
        bank.close()


def test_init_killed_before_bank_json_is_finished_by_a_rerun(tmp_path, models):
    """Between init's commit and bank.json the directory is no bank; running init again completes it."""
    base, (ft, _, _) = models
    root = tmp_path / "bank"
    bank, first = Bank.init(root, str(base))
    bank.close()
    (root / "bank.json").unlink()  # where a SIGKILL after the commit leaves it
    (root / "HEAD").unlink()
    with pytest.raises(SkillbankError, match="already holds bank"):
        Bank.init(root, str(ft))  # another base: refused, nothing changed
    bank, again = Bank.init(root, str(base))
    try:
        assert again["bank"] == first["bank"] and again["digest"] == first["digest"]
        assert [r["version"] for r in bank.log()] == ["v0"]
        assert bank.fsck()["ok"] is True
    finally:
        bank.close()
