"""Many writers at once, on SQLite and PostgreSQL: nothing lost, and losers told to retry.

Runs stress/concurrency.py at CI size (N=6). Its writers are long-lived spawned processes that
run the CLI's `main()` once per attempt, released together by one event, so each pays the torch
import once for the whole module. The larger run is documented in stress/README.md.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stress"))

from concurrency import Pool, classify, run

from skillbank.api import Bank
from skillbank.db import Database
from skillbank.lineage.head import Head, read_head, write_head

N = 6
READERS = 1


@pytest.fixture(scope="module")
def pool():
    """N writers and one reader, shared by the SQLite and the PostgreSQL run."""
    p = Pool(N + READERS)
    try:
        yield p
    finally:
        p.close()


def test_many_writers_nothing_lost(tmp_path, db_url, pool):
    s = run(tmp_path, N, rounds=1, db_url=db_url, readers=READERS, pool=pool)
    report = json.dumps(s, indent=1)
    same, branches = s["same_branch"], s["branches"]
    # one branch: every skill got in, each loss was the clean one-line "moved; retry"
    assert same["wins"] == N and same["gave_up"] == 0, report
    assert same["attempts"] == same["wins"] + same["clean_losses"], report
    assert same["clean_losses"] >= 1, "the writers never overlapped: the race was not exercised\n" + report
    assert same["attempts"] <= N * (N + 1) // 2, report  # each attempt round has a winner
    # own branches: nobody may lose
    assert branches["wins"] == branches["attempts"] == N, report
    assert s["unclear_errors"] == 0 and s["reader_errors"] == 0 and s["reader_ops"] > 0, report
    # nothing lost: 1 + 2N versions without gaps, every ref move in the reflog, all rebuild
    assert s["versions"] == 1 + 2 * N, report
    assert s["lost_versions"] == 0 and s["lost_ref_moves"] == 0 and s["fsck_ok"], report
    assert s["problems"] == [] and s["ok"], report


def test_real_cli_processes_one_branch(tmp_path):
    """The same race with a fresh `python -m skillbank.cli` process per attempt."""
    s = run(tmp_path, 3, rounds=1, exec_cli=True, scenarios=("same-branch",))
    assert s["same_branch"]["wins"] == 3 and s["unclear_errors"] == 0, s
    assert s["versions"] == 4 and s["lost_versions"] == 0 and s["lost_ref_moves"] == 0, s
    assert s["ok"], s


def test_a_second_writer_waits_for_the_first(tmp_path, db_url):
    """Write transactions are serialised on both backends (on PostgreSQL by an advisory lock), so
    concurrent writers never collide on the next version number."""
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(_tiny_model(tmp_path)), db_url)
    other = Database(db_url or Bank.default_db_url(root))
    entered = threading.Event()

    def second() -> None:
        with other.write() as s:
            s.connection()  # SQLite's BEGIN IMMEDIATE is sent with the first statement
            entered.set()

    try:
        with bank.db.write() as s:
            s.connection()
            t = threading.Thread(target=second)
            t.start()
            assert not entered.wait(1.0), "a second write transaction ran while the first was open"
        t.join(30)
        assert entered.is_set()
    finally:
        other.dispose()
        bank.close()


def test_concurrent_head_writes_never_corrupt_head(tmp_path):
    """Two checkouts in one bank directory write HEAD at once: each write is whole."""
    errors: list[str] = []

    def flip(i: int) -> None:
        for k in range(150):
            try:
                write_head(tmp_path, Head(branch="main") if i % 2 else Head(version=k), "checkout")
                read_head(tmp_path)
            except Exception as e:  # noqa: BLE001 - collected for the assertion
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=flip, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not list(tmp_path.glob(".HEAD*.partial"))


def test_classify_loser_messages():
    moved = "error: branch 'main' moved to v3 while this command ran (expected v2); nothing was changed: retry\n"
    assert classify({"rc": 1, "out": "", "err": moved}, "main") == ("loss", None)
    assert classify({"rc": 0, "out": '{"version": "v3"}', "err": ""}, "main") == ("win", "v3")
    assert classify({"rc": 1, "out": "", "err": moved}, "b1")[0] == "unclear"  # names another branch
    trace = "Traceback (most recent call last):\n  ...\nsqlalchemy.exc.IntegrityError: duplicate key\n"
    assert classify({"rc": 1, "out": "", "err": trace}, "main")[0] == "unclear"


def _tiny_model(tmp_path: Path) -> Path:
    from concurrency import make_base

    (tmp_path / "models").mkdir(exist_ok=True)
    return make_base(tmp_path / "models" / "base.safetensors")


def test_a_commit_between_reading_the_parent_and_the_tip_is_not_skipped(tmp_path, db_url, monkeypatch):
    """Forced interleaving: another writer commits while add-skill is still reading HEAD's branch.

    On PostgreSQL each statement of a read sees the latest commits, so a second read of the tip
    saw the other version while the parent was the older one; the branch then moved past the
    other version and dropped it from history. The move must expect the parent: a clean loss.
    """
    from concurrency import make_finetuned
    from safetensors.numpy import load_file

    from skillbank.errors import BranchMoved

    base_path = _tiny_model(tmp_path)
    base = load_file(str(base_path))
    fts = [make_finetuned(tmp_path / "models" / f"ft{i}.safetensors", base, i) for i in range(2)]
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(base_path), db_url)
    other = Bank.open(root, db_url)
    original = Bank._target_branch
    injected = []

    def target_branch_after_a_commit(self, *args, **kwargs):
        if not injected:
            injected.append("running")  # the other writer's own add-skill passes straight through
            injected[0] = other.add_skill("other", str(fts[1]), 0.5)["version"]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Bank, "_target_branch", target_branch_after_a_commit)
    try:
        with pytest.raises(BranchMoved, match="retry"):
            bank.add_skill("mine", str(fts[0]), 0.5)
        assert injected == ["v1"]
        assert [r["skill"] for r in bank.log("main")] == ["other", None]
        r = bank.add_skill("mine", str(fts[0]), 0.5)  # the retry builds on the other version
        assert (r["version"], r["parent"]) == ("v2", "v1")
        assert [r["skill"] for r in bank.log("main")] == ["mine", "other", None]
    finally:
        other.close()
        bank.close()
