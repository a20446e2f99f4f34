"""End-to-end tests of the `skillbank` command line, on SQLite and on PostgreSQL.

Successful commands go through click's CliRunner on `skillbank.cli.cli`; failing ones through
`skillbank.cli.main` (the console-script entry point, which turns user errors into one line on
stderr and an exit code) inside the same CliRunner isolation; a few run the installed `skillbank`
executable in a subprocess to check the real exit codes and stderr of a fresh process.

Weights are checked against an independent numpy computation of the RETAIN merge
(conftest.retain_np), never against skillbank's own arithmetic.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from sqlalchemy import create_engine, text

from conftest import (SMALL_SPECS, assert_within_one_ulp, finetune_tensors, group_of, load_model,
                      make_finetuned, make_model, make_tensors, objects_snapshot, read_safetensors_np,
                      retain_np, run_main, save_model)
from skillbank.cli import cli


# ----------------------------------------------------------------------------- driving the CLI

class SB:
    """`skillbank --bank DIR [--db URL] ...` for one bank."""

    def __init__(self, bank: Path, db: str | None):
        self.bank = Path(bank)
        self.db = db
        self._engine = None

    def argv(self, args, with_db: bool) -> list[str]:
        pre = ["--bank", str(self.bank)]
        if with_db and self.db:
            pre += ["--db", self.db]
        return pre + [str(a) for a in args]

    def ok(self, *args, with_db: bool = False) -> str:
        """Run through CliRunner on `cli`; the command must succeed. Returns stdout."""
        result = CliRunner().invoke(cli, self.argv(args, with_db))
        if result.exit_code != 0:
            tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
            raise AssertionError(f"skillbank {' '.join(map(str, args))} exited {result.exit_code}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}\n{tb}")
        return result.stdout

    def json(self, *args, with_db: bool = False):
        return json.loads(self.ok(*args, "--json", with_db=with_db))

    def run_main(self, *args, with_db: bool = False) -> tuple[int, str, str]:
        """Run the console entry point `main()` in-process; (exit code, stdout, stderr).

        An exception that main() does not turn into an exit code escapes here and fails the test,
        traceback and all: exactly what a user must never see."""
        return run_main(*self.argv(args, with_db))

    def fail(self, *args, code: int = 1, with_db: bool = False) -> str:
        """The command must fail with `code` and exactly one line on stderr; returns that line."""
        got, stdout, stderr = self.run_main(*args, with_db=with_db)
        assert got == code, f"exit {got}, expected {code}\nstdout: {stdout}\nstderr: {stderr}"
        if code == 1:
            lines = stderr.splitlines()
            assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {stderr!r}"
            assert "Traceback" not in stderr
            assert stdout == ""
            return lines[0]
        return stderr

    def init(self, base, *extra) -> dict:
        return self.json("init", "--base", base, *extra, with_db=True)

    def add(self, name, finetuned, alpha, *extra) -> dict:
        return self.json("add-skill", name, "--finetuned", finetuned, "--alpha", alpha, *extra)

    def rows(self) -> dict[str, int]:
        """Row counts of the immutable tables, read straight from the bank's database."""
        if self._engine is None:
            info = json.loads((self.bank / "bank.json").read_text())
            self._engine = create_engine(info.get("db_url") or f"sqlite:///{self.bank.resolve() / 'bank.db'}")
        with self._engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in ("versions", "skills", "task_vectors", "refs", "reflog")}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def snapshot(self) -> dict:
        """Everything a failed command must leave as it was."""
        return {
            "branches": self.json("branch"),
            "log": self.json("log"),
            "reflog": self.json("reflog"),
            "rows": self.rows(),
            "objects": objects_snapshot(self.bank),
            "head": (self.bank / "HEAD").read_text(),
            "bank.json": (self.bank / "bank.json").read_text(),
        }


def versions_of(rows) -> list[str]:
    return [r["version"] for r in rows]


@pytest.fixture
def sb(tmp_path, db_url) -> SB:
    bank = SB(tmp_path / "bank", db_url)
    yield bank
    bank.close()


def np_model(path):
    return read_safetensors_np(path)[0]


# ----------------------------------------------------------------------------- the session from the issue

def test_end_to_end_session(tmp_path, sb, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = make_model(tmp_path / "base" / "model.safetensors", seed=0)
    ft1 = make_finetuned(base, tmp_path / "ft" / "stack-cups.safetensors", seed=1)

    info = sb.init("base/model.safetensors")  # relative paths, as a user types them
    assert info["version"] == "v0" and info["branch"] == "main"
    assert info["tensors"] == len(SMALL_SPECS)
    assert [{k: b[k] for k in ("name", "version", "current")} for b in sb.json("branch")] == \
        [{"name": "main", "version": "v0", "current": True}]

    r1 = sb.add("stack-cups", "ft/stack-cups.safetensors", "0.8")
    assert {k: r1[k] for k in ("version", "parent", "skill", "branch")} == \
        {"version": "v1", "parent": "v0", "skill": "stack-cups", "branch": "main"}

    # Finetune the next skill from v1 (checking out the branch keeps HEAD attached to it).
    sb.ok("checkout", "main", "--out", tmp_path / "work" / "v1")
    ft2 = make_finetuned(tmp_path / "work" / "v1", tmp_path / "ft" / "wipe-board.safetensors", seed=2)
    r2 = sb.add("wipe-board", ft2, "vision=1,language=0.7,action=1")
    assert {k: r2[k] for k in ("version", "parent", "skill", "branch")} == \
        {"version": "v2", "parent": "v1", "skill": "wipe-board", "branch": "main"}

    log = sb.json("log")
    assert versions_of(log) == ["v2", "v1", "v0"]
    for row in log:
        assert {"version", "parent", "skill", "alpha", "digest", "created_at"} <= set(row)
    assert [r["parent"] for r in log] == ["v1", "v0", None]
    assert [r["skill"] for r in log] == ["wipe-board", "stack-cups", None]
    assert float(log[1]["alpha"]) == 0.8 and log[2]["alpha"] is None
    assert log[0]["alphas"] == {"vision": 1.0, "language": 0.7, "action": 1.0}
    assert log[0]["digest"] == r2["digest"] and log[1]["digest"] == r1["digest"]
    assert log[2]["digest"] == info["digest"]
    assert len({r["digest"] for r in log}) == 3
    times = [datetime.fromisoformat(r["created_at"].replace("Z", "+00:00")) for r in log]
    assert times == sorted(times, reverse=True)

    # checkout v1 twice: bit-identical files, digest verified, HEAD detached
    out_a, out_b = tmp_path / "deploy" / "v1", tmp_path / "deploy" / "v1-again"
    co = sb.json("checkout", "v1", "--out", out_a)
    assert co["version"] == "v1" and co["digest"] == r1["digest"] and co["verified"] is True
    sb.ok("checkout", "v1", "--out", out_b)
    first = (out_a / "model.safetensors").read_bytes()
    assert first == (out_b / "model.safetensors").read_bytes()
    sb.ok("checkout", "v1", "--out", out_a)  # again, over the same directory
    assert (out_a / "model.safetensors").read_bytes() == first
    assert not any(p.name.endswith(".partial") for p in out_a.iterdir())
    assert all(not b["current"] for b in sb.json("branch"))

    # a branch from v1, checked out: the next skill lands on it
    br = sb.json("branch", "experiment", "v1")
    assert {k: br[k] for k in ("name", "version", "current")} == \
        {"name": "experiment", "version": "v1", "current": False}
    sb.ok("checkout", "experiment")
    assert {b["name"]: b["current"] for b in sb.json("branch")} == {"experiment": True, "main": False}
    ft3 = make_finetuned(out_a, tmp_path / "ft" / "open-drawer.safetensors", seed=3)
    r3 = sb.add("open-drawer", ft3, "0.9")
    assert {k: r3[k] for k in ("version", "parent", "skill", "branch")} == \
        {"version": "v3", "parent": "v1", "skill": "open-drawer", "branch": "experiment"}
    assert {b["name"]: b["version"] for b in sb.json("branch")} == {"experiment": "v3", "main": "v2"}
    assert versions_of(sb.json("log")) == ["v3", "v1", "v0"]

    # rollback main to v1: history is kept
    rb = sb.json("rollback", "v1", "--branch", "main")
    assert rb == {"branch": "main", "from": "v2", "to": "v1"}
    assert {b["name"]: b["version"] for b in sb.json("branch")} == {"experiment": "v3", "main": "v1"}
    assert versions_of(sb.json("log", "main")) == ["v1", "v0"]
    assert versions_of(sb.json("log", "v2")) == ["v2", "v1", "v0"]
    shown = sb.json("show", "v2")
    assert shown["version"] == "v2" and shown["skill"] == "wipe-board" and shown["digest"] == r2["digest"]
    assert shown["task_vector"]["rel_error"] == 0.0
    main_moves = [(m["old"], m["new"], m["action"]) for m in sb.json("reflog", "main")]
    assert main_moves == [("v2", "v1", "rollback"), ("v1", "v2", "add-skill"),
                          ("v0", "v1", "add-skill"), (None, "v0", "init")]

    fsck = sb.json("fsck")
    assert fsck["ok"] is True and fsck["problems"] == [] and fsck["versions"] == 4 and fsck["rebuilt"] == 4
    assert "ok" in sb.ok("fsck")

    # The weights, against an independent numpy computation of the chain.
    sb.ok("checkout", "v2", "--out", tmp_path / "deploy" / "v2")
    sb.ok("checkout", "v3", "--out", tmp_path / "deploy" / "v3")
    base_np, ft1_np, ft2_np, ft3_np = (np_model(p) for p in (base, ft1, ft2, ft3))
    v1_r, v1_x = retain_np(base_np, ft1_np, lambda n: 0.8)
    per_group = {"vision": 1.0, "language": 0.7, "action": 1.0}
    _, v2_x = retain_np(v1_r, ft2_np, lambda n: per_group[group_of(n)])
    _, v3_x = retain_np(v1_r, ft3_np, lambda n: 0.9)
    assert_within_one_ulp(np_model(out_a), v1_x)
    assert_within_one_ulp(np_model(tmp_path / "deploy" / "v2"), v2_x)
    assert_within_one_ulp(np_model(tmp_path / "deploy" / "v3"), v3_x)
    # alpha 1 groups are the finetuned bytes exactly; integer buffers are copied
    v2_np = np_model(tmp_path / "deploy" / "v2")
    np.testing.assert_array_equal(v2_np["vision.enc.weight"][1], ft2_np["vision.enc.weight"][1])
    np.testing.assert_array_equal(v2_np["action.head.weight"][1], ft2_np["action.head.weight"][1])
    for v, ft in ((out_a, ft1_np), (tmp_path / "deploy" / "v2", ft2_np), (tmp_path / "deploy" / "v3", ft3_np)):
        np.testing.assert_array_equal(np_model(v)["action.steps"][1], ft["action.steps"][1])
    # the merge really moved the weights towards the finetuned model, by alpha
    lang_b, lang_f = base_np["language.proj.weight"][1], ft1_np["language.proj.weight"][1]
    lang_v1 = np_model(out_a)["language.proj.weight"][1]
    moved = np.sum((lang_v1 - lang_b) * (lang_f - lang_b)) / np.sum((lang_f - lang_b) ** 2)
    assert moved == pytest.approx(0.8, abs=1e-5)


# ----------------------------------------------------------------------------- a bank to break

class Env:
    """A bank with main: v0 -> v1 (stack-cups) and side: v0 -> v2 (wipe-board); HEAD on main."""

    def __init__(self, tmp: Path, sb: SB):
        self.tmp, self.sb = tmp, sb
        self.base = make_model(tmp / "models" / "base.safetensors", seed=0)
        self.ft1 = make_finetuned(self.base, tmp / "models" / "ft1.safetensors", seed=1)
        self.info = sb.init(self.base)
        self.r1 = sb.add("stack-cups", self.ft1, "0.8")
        sb.ok("checkout", "main", "--out", tmp / "work" / "v1")
        self.v1_dir = tmp / "work" / "v1"
        self.ft_v1 = make_finetuned(self.v1_dir, tmp / "models" / "ft-from-v1.safetensors", seed=5)
        self.ft2 = make_finetuned(self.base, tmp / "models" / "ft2.safetensors", seed=2)
        sb.ok("branch", "side", "v0")
        self.r2 = sb.add("wipe-board", self.ft2, "0.5", "--from", "v0", "--branch", "side")
        assert self.r2["version"] == "v2" and self.r2["branch"] == "side"
        sb.ok("tag", "rel", "v1")

    def variant(self, name: str, edit) -> Path:
        """A copy of the checkpoint finetuned from v1 (main's tip), edited by `edit(tensors)`."""
        tensors = load_model(self.ft_v1)
        edit(tensors)
        return save_model(self.tmp / "models" / f"{name}.safetensors", tensors)


@pytest.fixture
def env(tmp_path, sb, monkeypatch) -> Env:
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, sb)


def _drop(t):
    del t["action.head.bias"]


def _extra(t):
    t["action.extra.weight"] = torch.zeros(8, 8)


def _shape(t):
    t["language.proj.weight"] = t["language.proj.weight"].reshape(256, 128).contiguous()


def _dtype(t):
    t["language.proj.weight"] = t["language.proj.weight"].to(torch.float16)


def _nan(t):
    t["language.proj.weight"][3, 7] = float("nan")


def _inf(t):
    t["vision.enc.weight"][0, 0] = float("inf")


def _unrelated(t):
    t.update(make_tensors(seed=99))  # same architecture, random re-init


def _pickle(env: Env, suffix: str) -> Path:
    path = env.tmp / "models" / f"weights{suffix}"
    torch.save(load_model(env.ft_v1), path)
    return path


def _truncated(env: Env) -> Path:
    raw = Path(env.ft_v1).read_bytes()
    path = env.tmp / "models" / "truncated.safetensors"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _garbage(env: Env) -> Path:
    path = env.tmp / "models" / "garbage.safetensors"
    path.write_bytes(os.urandom(4096))
    return path


def _add(path_of, alpha="0.8", *extra):
    return lambda env: ["add-skill", "bad", "--finetuned", path_of(env), "--alpha", alpha, *extra]


def _variant(name, edit):
    return lambda env: env.variant(name, edit)


BAD_INPUTS = {
    "alpha-above-1": (_add(lambda e: e.ft_v1, "1.5"), "outside [0, 1]"),
    "alpha-negative": (_add(lambda e: e.ft_v1, "-0.1"), "outside [0, 1]"),
    "alpha-nan": (_add(lambda e: e.ft_v1, "nan"), "outside [0, 1]"),
    "alpha-inf": (_add(lambda e: e.ft_v1, "inf"), "outside [0, 1]"),
    "alpha-not-a-number": (_add(lambda e: e.ft_v1, "lots"), "not a number"),
    "alpha-unknown-group": (_add(lambda e: e.ft_v1, "vision=1,gripper=0.5,language=1,action=1"), "unknown group"),
    "alpha-group-out-of-range": (_add(lambda e: e.ft_v1, "vision=1,language=1.2,action=1"), "outside [0, 1]"),
    "alpha-group-missing": (_add(lambda e: e.ft_v1, "vision=1,language=0.7"), "action"),
    "alpha-group-twice": (_add(lambda e: e.ft_v1, "vision=1,vision=0.5,language=1,action=1"), "twice"),
    "missing-tensor": (_add(_variant("missing", _drop)), "action.head.bias"),
    "extra-tensor": (_add(_variant("extra", _extra)), "action.extra.weight"),
    "wrong-shape": (_add(_variant("shape", _shape)), "shape"),
    "wrong-dtype": (_add(_variant("dtype", _dtype)), "dtype"),
    "nan-weights": (_add(_variant("nan", _nan)), "NaN"),
    "inf-weights": (_add(_variant("inf", _inf)), "Inf"),
    "unrelated-checkpoint": (_add(_variant("unrelated", _unrelated)), "does not look finetuned"),
    "identical-to-parent": (_add(lambda e: e.v1_dir), "identical"),
    "pickle-bin": (_add(lambda e: _pickle(e, ".bin")), "safetensors only"),
    "pickle-pt": (_add(lambda e: _pickle(e, ".pt")), "safetensors only"),
    "truncated-safetensors": (_add(_truncated), "truncated"),
    "garbage-safetensors": (_add(_garbage), "not a valid safetensors file"),
    "missing-file": (_add(lambda e: e.tmp / "nope.safetensors"), "no such file"),
    "unknown-codec": (_add(lambda e: e.ft_v1, "0.8", "--codec", "magic"), "unknown codec"),
    "bad-skill-name": (lambda e: ["add-skill", "../x", "--finetuned", e.ft_v1], "invalid skill name"),
    "demos-not-a-dataset": (lambda e: ["add-skill", "x", "--demos", e.tmp / "models"], "dataset"),
    "add-from-unknown-ref": (_add(lambda e: e.ft_v1, "0.8", "--from", "nope"), "unknown ref"),
    "add-on-tag": (lambda e: ["add-skill", "x", "--finetuned", e.ft_v1, "--branch", "rel"], "tag"),
    "add-onto-branch-elsewhere": (_add(lambda e: e.ft_v1, "0.8", "--branch", "side"), "side"),
    "checkout-unknown-ref": (lambda e: ["checkout", "nope"], "unknown ref"),
    "checkout-unknown-version": (lambda e: ["checkout", "v99", "--out", e.tmp / "o"], "unknown version"),
    "show-unknown-ref": (lambda e: ["show", "v1~5"], "past the base"),
    "log-unknown-ref": (lambda e: ["log", "no-such-branch"], "unknown ref"),
    "short-digest-prefix": (lambda e: ["show", e.r1["digest"][:4]], "unknown ref"),
    "rollback-to-non-ancestor": (lambda e: ["rollback", "v2", "--branch", "main"], "not an ancestor"),
    "rollback-unknown-branch": (lambda e: ["rollback", "v0", "--branch", "nope"], "no branch"),
    "branch-exists": (lambda e: ["branch", "side", "v1"], "already exists"),
    "branch-bad-name": (lambda e: ["branch", "v7", "v1"], "invalid branch name"),
    "branch-at-unknown-ref": (lambda e: ["branch", "new", "nope"], "unknown ref"),
    "tag-exists": (lambda e: ["tag", "rel", "v2"], "already exists"),
    "tag-unknown-ref": (lambda e: ["tag", "newtag", "v42"], "unknown version"),
    "branch-named-like-a-tag": (lambda e: ["branch", "rel", "v2"], "already exists"),
    "init-over-existing-bank": (lambda e: ["init", "--base", e.base], "already exists"),
}


def test_bad_input_fails_with_one_line_and_changes_nothing(env):
    """Every case: exit 1, one line on stderr, and the bank exactly as it was (refs, history,
    reflog, objects, HEAD). All cases run against one bank, which must survive all of them."""
    failures = []
    before = env.sb.snapshot()
    for case, (make_args, message) in BAD_INPUTS.items():
        args = make_args(env)
        try:
            line = env.sb.fail(*args)
            assert line.startswith("error: "), line
            assert message in line, f"{message!r} not in {line!r}"
            after = env.sb.snapshot()
            for key in before:
                assert after[key] == before[key], f"{key} changed"
            assert not any((env.sb.bank / "tmp").iterdir()), "temp files left behind"
        except AssertionError as e:
            failures.append(f"{case}: {e}")
    assert not failures, "\n".join(failures)


def test_missing_bank(tmp_path, db_url):
    missing = SB(tmp_path / "no-bank", db_url)
    for args in (["log"], ["branch"], ["checkout", "v0"], ["fsck"], ["db", "upgrade"]):
        line = missing.fail(*args, with_db=True)
        assert "no bank" in line
    assert not missing.bank.exists()


def test_init_into_a_database_that_holds_a_bank(tmp_path, db_url):
    base = make_model(tmp_path / "base.safetensors")
    first = SB(tmp_path / "first", db_url)
    first.init(base)
    url = db_url or f"sqlite:///{(tmp_path / 'first' / 'bank.db').resolve()}"
    second = SB(tmp_path / "second", url)
    line = second.fail("init", "--base", base, with_db=True)
    assert "already holds bank" in line
    assert not second.bank.exists()
    assert versions_of(first.json("log")) == ["v0"]


def test_init_with_bad_base_leaves_nothing(tmp_path, db_url):
    sb = SB(tmp_path / "bank", db_url)
    make_model(tmp_path / "base.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "base.pt")
    (tmp_path / "empty").mkdir()
    assert "safetensors only" in sb.fail("init", "--base", tmp_path / "base.pt", with_db=True)
    assert "no such file" in sb.fail("init", "--base", tmp_path / "nope.safetensors", with_db=True)
    assert "model.safetensors" in sb.fail("init", "--base", tmp_path / "empty", with_db=True)
    assert not sb.bank.exists()
    sb.init(tmp_path / "base.safetensors")  # and the database is still free for a bank


def test_force_accepts_extra_tensors_and_unrelated_checkpoints(env):
    sb = env.sb
    extra = env.variant("extra", _extra)
    r = sb.add("with-extra", extra, "0.8", "--force")
    assert r["version"] == "v3" and r["parent"] == "v1" and r["branch"] == "main"
    out = env.tmp / "deploy" / "v3"
    sb.ok("checkout", "main", "--out", out)
    got = np_model(out)
    assert set(got) == set(SMALL_SPECS)  # the extra tensor is ignored, not added
    v1 = np_model(env.v1_dir)
    _, want = retain_np(v1, {k: v for k, v in np_model(extra).items() if k in v1}, lambda n: 0.8)
    assert_within_one_ulp(got, want)

    unrelated = env.variant("unrelated", _unrelated)
    r = sb.add("reinit", unrelated, "0.3", "--force")
    assert r["version"] == "v4" and r["parent"] == "v3" and r["rel_norm"] > 0.5
    sb.ok("checkout", "main", "--out", env.tmp / "deploy" / "v4")
    _, want = retain_np(got, np_model(unrelated), lambda n: 0.3)
    assert_within_one_ulp(np_model(env.tmp / "deploy" / "v4"), want)
    assert sb.json("fsck")["ok"] is True


def test_rollback_force_moves_to_a_non_ancestor(env):
    sb = env.sb
    r = sb.json("rollback", "v2", "--branch", "main", "--force")
    assert r == {"branch": "main", "from": "v1", "to": "v2"}
    assert versions_of(sb.json("log", "main")) == ["v2", "v0"]
    assert versions_of(sb.json("log", "v1")) == ["v1", "v0"]  # v1 is still there


def test_usage_errors_exit_2(env):
    sb = env.sb
    before = sb.snapshot()
    for args in (["add-skill"], ["add-skill", "x"], ["add-skill", "x", "--finetuned", env.ft_v1, "--demos", env.tmp],
                 ["checkout"], ["tag", "only-a-name"], ["no-such-command"], ["log", "--no-such-option"],
                 ["checkout", "v1", "--max-shard-size", "lots"], ["checkout", "v1", "--out", env.ft1], ["gc", "--grace", "soon"]):
        stderr = sb.fail(*args, code=2)
        assert "Usage" in stderr or "Error" in stderr
        result = CliRunner().invoke(cli, sb.argv(args, False))
        assert result.exit_code == 2, args
    assert sb.snapshot() == before


# ----------------------------------------------------------------------------- refs and HEAD

def test_detached_head_needs_a_branch(env):
    sb = env.sb
    co = sb.json("checkout", "v1")
    assert co["head"] == "v1 (detached)"
    assert all(not b["current"] for b in sb.json("branch"))
    before = sb.snapshot()
    line = sb.fail("add-skill", "lift", "--finetuned", env.ft_v1, "--alpha", "0.8")
    assert "detached" in line and "--branch" in line
    assert sb.snapshot() == before

    r = sb.add("lift", env.ft_v1, "0.8", "--branch", "lifting")
    assert {k: r[k] for k in ("version", "parent", "skill", "branch")} == \
        {"version": "v3", "parent": "v1", "skill": "lift", "branch": "lifting"}
    branches = {b["name"]: b for b in sb.json("branch")}
    assert branches["lifting"]["version"] == "v3"
    assert branches["main"]["version"] == "v1"  # main did not move
    assert [(m["old"], m["new"]) for m in sb.json("reflog", "lifting")] == [(None, "v3")]

    # checking out a branch attaches HEAD again: the next add-skill advances that branch
    sb.ok("checkout", "lifting", "--out", env.tmp / "work" / "v3")
    assert {b["name"]: b["current"] for b in sb.json("branch")}["lifting"] is True
    ft = make_finetuned(env.tmp / "work" / "v3", env.tmp / "models" / "ft-v3.safetensors", seed=7)
    r = sb.add("lift-more", ft, "0.5")
    assert (r["version"], r["parent"], r["branch"]) == ("v4", "v3", "lifting")

    # checking out HEAD materialises it and leaves HEAD where it is (attached, here)
    co = sb.json("checkout", "HEAD", "--out", env.tmp / "work" / "head")
    assert co["version"] == "v4" and co["head"] == "branch 'lifting'"
    assert {b["name"]: b["current"] for b in sb.json("branch")}["lifting"] is True

    # a tag detaches HEAD too
    sb.ok("checkout", "rel")
    assert all(not b["current"] for b in sb.json("branch"))
    before = sb.snapshot()
    assert "--branch" in sb.fail("add-skill", "x", "--finetuned", env.ft_v1)
    assert "--branch" in sb.fail("rollback", "v0")  # which branch? HEAD is on none
    assert sb.snapshot() == before
    assert sb.json("checkout", "HEAD")["head"] == "v1 (detached)"


def test_from_ref_semantics(env):
    sb = env.sb  # main: v0 -> v1, side: v0 -> v2, HEAD on main
    # --from the tip of HEAD's branch: lands on that branch
    r = sb.add("a", env.ft_v1, "0.8", "--from", "main")
    assert (r["version"], r["parent"], r["branch"]) == ("v3", "v1", "main")
    # --from an older version of HEAD's branch, no --branch: refused, nothing changes
    before = sb.snapshot()
    line = sb.fail("add-skill", "b", "--finetuned", env.ft_v1, "--from", "v1")
    assert "not the tip" in line and "--branch" in line
    assert sb.snapshot() == before
    # ... with a new branch: it is created at the new version, parent is --from
    r = sb.add("b", env.ft_v1, "0.8", "--from", "v1", "--branch", "retry-b")
    assert (r["version"], r["parent"], r["branch"]) == ("v4", "v1", "retry-b")
    assert versions_of(sb.json("log", "retry-b")) == ["v4", "v1", "v0"]
    # ... with an existing branch whose tip is --from (a tag names the parent here)
    r = sb.add("c", env.ft2, "0.6", "--from", "v2", "--branch", "side")
    assert (r["version"], r["parent"], r["branch"]) == ("v5", "v2", "side")
    r = sb.add("d", env.ft_v1, "0.6", "--from", "rel", "--branch", "from-tag")
    assert (r["version"], r["parent"], r["branch"]) == ("v6", "v1", "from-tag")
    # ... with an existing branch whose tip is not --from: refused
    before = sb.snapshot()
    line = sb.fail("add-skill", "e", "--finetuned", env.ft_v1, "--from", "v1", "--branch", "side")
    assert "side" in line and "v5" in line
    assert sb.snapshot() == before
    # HEAD did not move through any of this
    assert {b["name"]: b["current"] for b in sb.json("branch")}["main"] is True
    branches = {b["name"]: b["version"] for b in sb.json("branch")}
    assert branches == {"main": "v3", "side": "v5", "retry-b": "v4", "from-tag": "v6"}


def test_tags_ancestors_and_digest_prefixes(env):
    sb = env.sb
    t = sb.json("tag", "release-1", "main")
    assert t == {"name": "release-1", "version": "v1"}
    assert sb.json("tag") == [{"name": "rel", "version": "v1"}, {"name": "release-1", "version": "v1"}]
    r = sb.add("next", env.ft_v1, "0.8")  # main moves on, the tag stays
    assert r["version"] == "v3"
    assert sb.json("show", "release-1")["version"] == "v1"
    assert versions_of(sb.json("log", "release-1")) == ["v1", "v0"]
    assert "release-1" in sb.json("show", "v1")["refs"]

    def version(ref):
        return sb.json("show", ref)["version"]

    assert version("main~1") == "v1"
    assert version("main~") == "v1"
    assert version("main~2") == "v0"
    assert version("v3~0") == "v3"
    assert version("release-1~1") == "v0"
    assert version("side~1") == "v0"
    assert version("HEAD") == "v3" and version("HEAD~2") == "v0"
    assert "past the base" in sb.fail("show", "main~3")

    for row in sb.json("log", "main"):
        for n in (6, 12, 32):
            assert version(row["digest"][:n]) == row["version"]
    d = sb.json("show", "v3")["digest"]
    assert sb.json("log", d[:10])[0]["version"] == "v3"
    sb.ok("checkout", d[:8], "--out", env.tmp / "by-digest")
    meta = read_safetensors_np(env.tmp / "by-digest")[1]
    assert meta["skillbank.version"] == "v3"
    digests = {row["digest"] for row in sb.json("log", "main")} | {sb.json("show", "side")["digest"]}
    absent = next(p for p in ("0123456789ab", "ba9876543210") if not any(x.startswith(p) for x in digests))
    assert "unknown ref" in sb.fail("show", absent)


# ----------------------------------------------------------------------------- checkouts

def test_sharded_checkout_equals_single_file(env):
    sb = env.sb
    single, sharded = env.tmp / "single", env.tmp / "sharded"
    sb.ok("checkout", "main", "--out", single)
    r = sb.json("checkout", "main", "--out", sharded, "--max-shard-size", "100KB")
    assert len(r["files"]) >= 3
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(Path(f).name for f in r["files"])
    assert not (sharded / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(SMALL_SPECS)
    assert index["metadata"]["total_size"] == sum(
        (sharded / s).stat().st_size for s in shards) - sum(_header_len(sharded / s) for s in shards)

    whole = load_model(single)
    seen = {}
    for shard in shards:
        path = sharded / shard
        assert path.stat().st_size <= 100_000 or len(_names(path)) == 1
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["skillbank.version"] == "v1"
            for name in f.keys():
                assert index["weight_map"][name] == shard
                seen[name] = f.get_tensor(name)
    assert set(seen) == set(whole)
    for name, t in whole.items():
        assert seen[name].dtype == t.dtype
        assert torch.equal(seen[name].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), name

    # re-sharding into the same directory replaces the old layout, and back again
    sb.ok("checkout", "main", "--out", sharded)
    assert (sharded / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()
    assert not (sharded / "model.safetensors.index.json").exists()
    assert not list(sharded.glob("model-*.safetensors"))


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _names(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_checkout_metadata_and_model_card(env):
    yaml = pytest.importorskip("yaml")
    sb = env.sb
    out = env.tmp / "deploy"
    sb.ok("checkout", "v1", "--out", out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["skillbank.version"] == "v1"
    assert meta["skillbank.digest"] == env.r1["digest"]
    assert meta["skillbank.bank"] == env.info["bank"]
    lineage = json.loads(meta["skillbank.lineage"])
    assert [e["version"] for e in lineage] == ["v0", "v1"]
    assert lineage[1]["skill"] == "stack-cups" and float(lineage[1]["alpha"]) == 0.8

    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == str(env.base) or Path(front["base_model"]).name == "base.safetensors"
    skills = front["skillbank"]["skills"]
    assert [(s["name"], s["version"]) for s in skills] == [("stack-cups", "v1")]
    assert float(skills[0]["alpha"]) == 0.8
    assert front["skillbank"]["digest"] == env.r1["digest"]
    assert front["skillbank"]["version"] == "v1"

    sb.ok("checkout", "side", "--out", out)  # a second checkout rewrites the card
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert [(s["name"], s["version"]) for s in front["skillbank"]["skills"]] == [("wipe-board", "v2")]
    sb.ok("checkout", "v0", "--out", out)
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["skillbank"]["skills"] == [] or front["skillbank"]["skills"] is None


def test_lerobot_base_directory_keeps_its_config(tmp_path, sb):
    policy = tmp_path / "pretrained_model"
    make_model(policy / "model.safetensors", seed=0)
    config = {"type": "smolvla", "n_action_steps": 50, "chunk_size": 50, "input_features": {"state": [7]}}
    config_text = json.dumps(config, indent=4) + "\n"
    (policy / "config.json").write_text(config_text)
    sb.init(policy)
    ft_dir = tmp_path / "ft" / "pretrained_model"
    make_finetuned(policy, ft_dir / "model.safetensors", seed=1)
    (ft_dir / "config.json").write_text(config_text)
    r = sb.add("pick", ft_dir, "0.8")
    assert r["version"] == "v1"
    for ref in ("v0", "v1"):
        out = tmp_path / "deploy" / ref
        sb.ok("checkout", ref, "--out", out)
        assert (out / "config.json").read_text() == config_text
        assert (out / "model.safetensors").is_file()
    _, want = retain_np(np_model(policy), np_model(ft_dir), lambda n: 0.8)
    assert_within_one_ulp(np_model(tmp_path / "deploy" / "v1"), want)


def test_sharded_base_directory_import(tmp_path, db_url):
    tensors = make_tensors(seed=0)
    single = save_model(tmp_path / "single" / "model.safetensors", tensors)
    base = tmp_path / "sharded-base"
    layout = {"model-00001-of-00002.safetensors": ["action.head.bias", "action.head.weight", "action.steps",
                                                   "language.proj.weight"],
              "model-00002-of-00002.safetensors": ["vision.enc.weight"]}
    weight_map = {}
    for shard, names in layout.items():
        save_model(base / shard, {n: tensors[n] for n in names}, metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))

    sb = SB(tmp_path / "bank", db_url)
    info = sb.init(base)
    other = SB(tmp_path / "bank-single", None)
    assert other.init(single)["digest"] == info["digest"]  # the digest does not depend on sharding

    out = tmp_path / "deploy" / "v0"
    r = sb.json("checkout", "main", "--out", out)
    assert len(r["files"]) == 2  # checkouts keep the base's sharding by default
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    got = np_model(out)
    want = np_model(single)
    for name in tensors:
        assert got[name][0] == want[name][0]
        np.testing.assert_array_equal(got[name][1], want[name][1])

    ft = make_finetuned(single, tmp_path / "ft.safetensors", seed=3)
    assert sb.add("s", ft, "0.75")["version"] == "v1"
    sb.ok("checkout", "main", "--out", tmp_path / "deploy" / "v1", "--max-shard-size", "10GB")
    _, want = retain_np(np_model(single), np_model(ft), lambda n: 0.75)
    assert_within_one_ulp(np_model(tmp_path / "deploy" / "v1" / "model.safetensors"), want)


def test_large_tensor_spans_several_blocks(tmp_path, db_url):
    """A tensor of more than 2**20 elements goes through several task-vector blocks."""
    specs = {"vision.big.weight": ("BF16", (1100, 1000)), "language.proj.weight": ("F32", (1030, 1024)),
             "action.head.weight": ("F16", (8, 8)), "action.steps": ("I64", (1,))}
    sb = SB(tmp_path / "bank", db_url)
    base = make_model(tmp_path / "base.safetensors", seed=0, specs=specs)
    ft = save_model(tmp_path / "ft.safetensors", finetune_tensors(load_model(base), seed=1))
    sb.init(base)
    sb.add("big", ft, "vision=0.6,language=0.9,action=0.3")
    sb.ok("checkout", "main", "--out", tmp_path / "out")
    alphas = {"vision": 0.6, "language": 0.9, "action": 0.3}
    _, want = retain_np(np_model(base), np_model(ft), lambda n: alphas[group_of(n)])
    assert_within_one_ulp(np_model(tmp_path / "out"), want)
    assert sb.json("fsck")["ok"] is True


def test_bank_and_database_from_the_environment(tmp_path, db_url, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k in ("SKILLBANK_BANK", "SKILLBANK_DB_URL"):
        monkeypatch.delenv(k, raising=False)
    base = make_model(tmp_path / "base.safetensors")
    runner = CliRunner()
    env = {"SKILLBANK_BANK": str(tmp_path / "from-env")}
    if db_url:
        env["SKILLBANK_DB_URL"] = db_url
    r = runner.invoke(cli, ["init", "--base", str(base), "--json"], env=env)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "from-env" / "bank.json").is_file()
    r = runner.invoke(cli, ["log", "--json"], env=env)
    assert r.exit_code == 0 and [row["version"] for row in json.loads(r.stdout)] == ["v0"]
    if db_url is None:
        # neither --bank nor the environment: ./.skillbank
        r = runner.invoke(cli, ["init", "--base", str(base)])
        assert r.exit_code == 0, r.output
        assert (tmp_path / ".skillbank" / "bank.json").is_file() and (tmp_path / ".skillbank" / "bank.db").is_file()


# ----------------------------------------------------------------------------- the real executable

def _skillbank(*args, env=None) -> subprocess.Popen:
    exe = shutil.which("skillbank")
    argv = [exe] if exe else [sys.executable, "-c", "from skillbank.cli import main; main()"]
    return subprocess.Popen([*argv, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_executable_exit_codes_and_stderr(tmp_path):
    """The installed `skillbank` in fresh processes, run side by side (each one imports torch, so
    this runs on the default SQLite only; the in-process tests cover both databases)."""
    db_url = None
    base = make_model(tmp_path / "base.safetensors", seed=0)
    ft = make_finetuned(base, tmp_path / "ft.safetensors", seed=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLBANK_")}
    env["SKILLBANK_BANK"] = str(tmp_path / "bank")  # the bank and its database from the environment
    if db_url:
        env["SKILLBANK_DB_URL"] = db_url
    result = CliRunner().invoke(cli, ["init", "--base", str(base), "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "bank" / "bank.json").read_text()).get("db_url") == db_url

    procs = {
        "bad-alpha": _skillbank("add-skill", "s", "--finetuned", ft, "--alpha", "1.5", env=env),
        "no-bank": _skillbank("--bank", tmp_path / "nowhere", "log", env=env),
        "usage": _skillbank("checkout", env=env),
        "ok": _skillbank("add-skill", "s", "--finetuned", ft, "--alpha", "0.8", "--json", env=env),
    }
    got = {name: _wait(p) for name, p in procs.items()}

    code, out, err = got["bad-alpha"]
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "alpha" in err
    code, out, err = got["no-bank"]
    assert code == 1 and out == "" and err.count("\n") == 1 and "no bank" in err
    code, out, err = got["usage"]
    assert code == 2 and "Usage" in err and "Traceback" not in err
    code, out, err = got["ok"]
    assert code == 0 and err == "", err
    r = json.loads(out)
    assert (r["version"], r["parent"], r["branch"]) == ("v1", "v0", "main")
    assert not (tmp_path / "nowhere").exists()


def test_a_checkout_into_a_directory_another_checkout_is_writing_is_refused(env):
    """Two checkouts into one --out must not interleave their bytes in one temp file."""
    import fcntl

    sb = env.sb
    out = env.tmp / "shared-out"
    out.mkdir()
    head = (sb.bank / "HEAD").read_text()
    busy = out / ".model.safetensors.partial"
    with open(busy, "wb") as f:  # what a checkout still running holds
        f.write(b"in progress")
        f.flush()
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        line = sb.fail("checkout", "v1", "--out", out)
        assert "another checkout is writing" in line and str(out) in line
        assert busy.read_bytes() == b"in progress"
    assert (sb.bank / "HEAD").read_text() == head
    assert not (out / "model.safetensors").exists()
    sb.ok("checkout", "v1", "--out", out)  # free again: the temp file is reused and renamed
    assert (out / "model.safetensors").exists() and not busy.exists()


@pytest.mark.parametrize("where", [".", "objects", "objects/ab", "tmp/x", "deeper/still"])
def test_checkout_and_export_refuse_an_out_inside_the_bank(env, where):
    sb = env.sb
    before = sorted(str(p.relative_to(sb.bank)) for p in sb.bank.rglob("*"))
    head = (sb.bank / "HEAD").read_text()
    out = sb.bank / where
    line = sb.fail("checkout", "v1", "--out", out)
    assert "inside the bank" in line
    line = sb.fail("export", "v1", "--out", out)
    assert "inside the bank" in line
    assert sorted(str(p.relative_to(sb.bank)) for p in sb.bank.rglob("*")) == before
    assert (sb.bank / "HEAD").read_text() == head
