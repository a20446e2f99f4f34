"""Revoking skills, rebuilding a chain without one, and merging two branches (issue 5, part 2-3).

Every expected weight is computed here with numpy from the checkpoints as read by the numpy-only
reader in conftest, never through skillbank's merge code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xxhash
from sqlalchemy import create_engine, inspect, text

from conftest import (assert_within_one_ulp, finetune_tensors, load_model, make_model, read_safetensors_np,
                      run_main, save_model)
from test_db import alembic_config, revision_of, script_dir
from alembic import command
from skillbank.api import Bank
from skillbank.db import migrate
from skillbank.errors import SkillbankError

FLOATS = ("F32", "F16", "BF16", "F64")


def _ft(bank: Bank, ref: str, tmp_path, name: str, seed: int):
    """Finetune (in the weights sense) the checkout of `ref`."""
    bank.checkout(ref, tmp_path / f"parent-{name}")
    bank.checkout("main")
    return save_model(tmp_path / f"ft-{name}.safetensors",
                      finetune_tensors(load_model(tmp_path / f"parent-{name}"), seed))


def _np(bank: Bank, ref: str, tmp_path) -> dict:
    out = tmp_path / f"co-{ref.replace('/', '_')}"
    bank.checkout(ref, out)
    return read_safetensors_np(out)[0]


@pytest.fixture
def chain_bank(tmp_path, db_url):
    """main: v0 -> v1 s1 (0.8) -> v2 s2 (0.6) -> v3 s3 (vision=1,language=0.7,action=0.5) -> v4 s4 (0.9)."""
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(make_model(tmp_path / "base.safetensors", seed=0)), db_url)
    fts = {}
    for i, (skill, alpha) in enumerate([("s1", 0.8), ("s2", 0.6), ("s3", "vision=1,language=0.7,action=0.5"),
                                        ("s4", 0.9)], start=1):
        fts[skill] = _ft(bank, f"v{i - 1}", tmp_path, skill, seed=10 + i)
        bank.add_skill(skill, str(fts[skill]), alpha)
    yield root, db_url, bank, fts
    bank.close()


ALPHA = {"s1": lambda n: 0.8, "s2": lambda n: 0.6, "s4": lambda n: 0.9,
         "s3": lambda n: {"vision": 1.0, "language": 0.7, "action": 0.5}[n.split(".", 1)[0]]}


# ----------------------------------------------------------------------------- revoke

def test_revoke_flags_audit_and_gates(chain_bank, tmp_path):
    root, db_url, bank, _ = chain_bank
    bank.checkout("v2", tmp_path / "deploy")
    bank.checkout("main")
    assert bank.audit(str(tmp_path / "deploy"))["revoked"] == []
    r = bank.revoke("s2", "trained on mislabelled demos")
    assert r["versions"] == ["v2"]
    with pytest.raises(SkillbankError, match="already revoked"):
        bank.revoke("s2", "again")
    with pytest.raises(SkillbankError, match="no skill named"):
        bank.revoke("nope", "x")
    report = bank.audit(str(tmp_path / "deploy"))
    assert report["match"] == "exact"
    assert [(x["name"], x["version"], x["reason"]) for x in report["revoked"]] == \
        [("s2", "v2", "trained on mislabelled demos")]
    assert [x["revoked"] for x in bank.log("v2")] == [True, False, False]
    assert bank.show("v2")["revoked_reason"] == "trained on mislabelled demos"

    args = ["--bank", root] + (["--db", db_url] if db_url else [])
    code, out, err = run_main(*args, "audit", tmp_path / "deploy", "--json")
    assert code == 0 and "revoked skill 's2'" in err and json.loads(out)["revoked"][0]["name"] == "s2"
    code, out, err = run_main(*args, "audit", tmp_path / "deploy", "--json", "--forbid-revoked")
    assert code == 3 and "revoked skill 's2'" in err
    assert json.loads(out)["gate"]["ok"] is False
    code, out, err = run_main(*args, "audit", tmp_path / "deploy", "--require-skill", "s1", "--json")
    assert code == 0  # --require-skill semantics unchanged
    bank.checkout("v1", tmp_path / "older")
    code, _, err = run_main(*args, "audit", tmp_path / "older", "--forbid-revoked")
    assert code == 0 and "revoked" not in err
    code, out, err = run_main(*args, "log", "v2")
    assert code == 0 and "s2 (revoked)" in out
    code, out, err = run_main(*args, "revoke", "s2", "--reason", "x")
    assert code == 1 and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- rebuild --without

def test_rebuild_without_reapplies_the_stored_task_vectors(chain_bank, tmp_path):
    root, db_url, bank, fts = chain_bank
    orig = {v: _np(bank, f"v{v}", tmp_path) for v in range(5)}
    ft = {k: read_safetensors_np(p)[0] for k, p in fts.items()}
    r = bank.rebuild_without("main", "s2")
    assert r["branch"] == "rebuild-without-s2" and r["kept_base"] == "v1"
    assert [(v["version"], v["skill"], v["rebuilt_from"]) for v in r["versions"]] == \
        [("v5", "s3", "v3"), ("v6", "s4", "v4")]
    assert [x["version"] for x in bank.log("rebuild-without-s2")] == ["v6", "v5", "v1", "v0"]
    show = bank.show("v5")
    assert show["rebuilt_from"] == "v3" and show["evals"] == [] and show["skill"] == "s3"
    assert "without s2" in show["message"]

    # each replayed version: the new parent + alpha * (finetuned - ORIGINAL parent), rounded once
    prev = orig[1]
    for new, (skill, orig_parent) in zip(("v5", "v6"), (("s3", 2), ("s4", 3))):
        got = _np(bank, new, tmp_path)
        expected = {}
        for name, (dtype, x) in prev.items():
            a = ALPHA[skill](name)
            if dtype in FLOATS:
                tau = ft[skill][name][1].astype(np.float64) - orig[orig_parent][name][1].astype(np.float64)
                expected[name] = (dtype, x.astype(np.float64) + a * tau, np.abs(x) + np.abs(a * tau))
            else:
                expected[name] = (dtype, ft[skill][name][1].copy(), None)
        assert_within_one_ulp(got, expected)
        prev = got
    # and the whole: base + sum over the kept skills of alpha_i * tau_i (original taus)
    for name, (dtype, b) in orig[0].items():
        if dtype not in FLOATS:
            continue
        acc = b.astype(np.float64)
        for skill, parent in (("s1", 0), ("s3", 2), ("s4", 3)):
            acc = acc + ALPHA[skill](name) * (ft[skill][name][1].astype(np.float64) - orig[parent][name][1])
        err = np.abs(prev[name][1] - acc) / (np.abs(acc) + 1e-3)
        assert float(err.max()) < 2e-2, name
    # the removed skill is really gone: the rebuild differs from the original tip
    assert any(not np.array_equal(prev[n][1], orig[4][n][1]) for n in prev if prev[n][0] in FLOATS)
    assert bank.fsck()["ok"]
    # an audit of the rebuilt tip: exact, with s1, s3, s4 only
    report = bank.audit(str(tmp_path / "co-v6"))
    assert report["match"] == "exact" and [s["name"] for s in report["skills"]] == ["s1", "s3", "s4"]
    # rebuilding the rebuilt chain again (nested delta steps) stays exact
    r2 = bank.rebuild_without("rebuild-without-s2", "s3", branch="only-s1-s4")
    assert [v["rebuilt_from"] for v in r2["versions"]] == ["v6"]
    got = _np(bank, "only-s1-s4", tmp_path)
    expected = {}
    for name, (dtype, x) in orig[1].items():
        if dtype in FLOATS:
            tau = ft["s4"][name][1].astype(np.float64) - orig[3][name][1].astype(np.float64)
            expected[name] = (dtype, x + 0.9 * tau, np.abs(x) + np.abs(0.9 * tau))
        else:
            expected[name] = (dtype, ft["s4"][name][1].copy(), None)
    assert_within_one_ulp(got, expected)
    assert bank.fsck()["ok"]
    with pytest.raises(SkillbankError, match="does not contain"):
        bank.rebuild_without("v1", "s3", branch="x")


def test_rebuild_cli(chain_bank, tmp_path):
    root, db_url, bank, _ = chain_bank
    args = ["--bank", root] + (["--db", db_url] if db_url else [])
    code, out, err = run_main(*args, "rebuild", "main", "--without", "s3", "--branch", "no-s3", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["branch"] == "no-s3" and [v["rebuilt_from"] for v in d["versions"]] == ["v4"]
    code, out, err = run_main(*args, "show", d["version"])
    assert code == 0 and "rebuilt from v4" in out
    code, out, err = run_main(*args, "rebuild", "main", "--without", "s3", "--branch", "no-s3")
    assert code == 1 and "already exists" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- merge

@pytest.fixture
def forked_bank(tmp_path, db_url):
    """v0 -> v1 s1 on main; arm: v1 -> v2 s2; main: v1 -> v3 s3 (ancestor v1)."""
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(make_model(tmp_path / "base.safetensors", seed=0)), db_url)
    bank.add_skill("s1", str(_ft(bank, "v0", tmp_path, "s1", 1)), 0.8)
    bank.add_skill("s2", str(_ft(bank, "v1", tmp_path, "s2", 2)), 0.7, from_ref="v1", branch="arm")
    bank.add_skill("s3", str(_ft(bank, "v1", tmp_path, "s3", 3)), 0.9, from_ref="v1", branch="main")
    yield root, db_url, bank
    bank.close()


def _fmix32(z):
    z = z ^ (z >> 16)
    z = (z * 0x85EBCA6B) & 0xFFFFFFFF
    z = z ^ (z >> 13)
    z = (z * 0xC2B2AE35) & 0xFFFFFFFF
    return z ^ (z >> 16)


def _dare_keep_np(seed, side, name, n, drop):
    key = xxhash.xxh32_intdigest(f"{seed}:{side}:{name}".encode())
    idx = np.arange(n, dtype=np.uint64)
    z = _fmix32((idx & np.uint64(0xFFFFFFFF)) ^ np.uint64(key))
    z = _fmix32(z ^ (idx >> np.uint64(32)))
    return z >= np.uint64(int(drop * 2**32))


def _expected_merge(method, anc, sides, weights, params):
    out = {}
    for name, (dtype, a) in anc.items():
        xs = [s[name][1] for s in sides]
        if dtype not in FLOATS:
            changed = [x for x in xs if not np.array_equal(x, a)]
            out[name] = (dtype, (changed[0] if changed else a).copy(), None)
            continue
        a64 = a.astype(np.float64)
        taus = [x.astype(np.float64) - a64 for x in xs]
        if method == "task-arithmetic":
            merged = sum(w * t for w, t in zip(weights, taus))
        elif method == "ties":
            trimmed = []
            for t, w in zip(taus, weights):
                flat = np.abs(t).ravel()
                k = max(1, math.ceil(params["density"] * flat.size))
                thresh = np.sort(flat)[-k]
                trimmed.append(np.where(np.abs(t) >= thresh, t, 0.0) * w)
            sign = np.sign(sum(trimmed))
            agree = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
            num = sum(np.where(g, t, 0.0) for g, t in zip(agree, trimmed))
            cnt = sum(g.astype(np.float64) for g in agree)
            merged = np.where(cnt > 0, num / np.maximum(cnt, 1), 0.0) * params["scale"]
        else:  # dare
            merged = 0.0
            for k, (t, w) in enumerate(zip(taus, weights)):
                keep = _dare_keep_np(params["seed"], k, name, t.size, params["drop"]).reshape(t.shape)
                merged = merged + w * np.where(keep, t / (1 - params["drop"]), 0.0)
        mag = np.abs(a64) + sum(np.abs(w * t) for w, t in zip(weights, taus))
        out[name] = (dtype, a64 + merged, mag * 2)
    return out


@pytest.mark.parametrize("method,params,weights", [
    ("task-arithmetic", {}, (1.0, 1.0)),
    ("task-arithmetic", {}, (0.5, 0.8)),
    ("ties", {"density": 0.3, "scale": 1.0}, (1.0, 1.0)),
    ("dare", {"drop": 0.4, "seed": 7}, (1.0, 0.9)),
])
def test_merge_matches_numpy(forked_bank, tmp_path, method, params, weights):
    root, db_url, bank = forked_bank
    anc, a, b = (_np(bank, v, tmp_path) for v in ("v1", "v3", "v2"))
    r = bank.merge_branches("main", "arm", method, weights=weights, params=params)
    assert (r["version"], r["parents"], r["ancestor"], r["branch"]) == ("v4", ["v3", "v2"], "v1", "main")
    assert r["skills"] == {"a": ["s3"], "b": ["s2"]}
    got = _np(bank, "v4", tmp_path)
    assert_within_one_ulp(got, _expected_merge(method, anc, [a, b], weights, {**r["params"]}))
    show = bank.show("v4")
    assert show["parent"] == "v3" and show["second_parent"] == "v2" and show["keyframe"]
    assert [x["version"] for x in bank.log("main")] == ["v4", "v3", "v1", "v0"]  # first parent
    report = bank.audit(str(tmp_path / "co-v4"))
    assert report["match"] == "exact" and [s["name"] for s in report["skills"]] == ["s1", "s2", "s3"]
    assert bank.fsck()["ok"]
    # a skill on top of the merge rebuilds from it
    ft = _ft(bank, "v4", tmp_path, "s5", 5)
    bank.add_skill("s5", str(ft), 0.5)
    bank.checkout("main", tmp_path / "after")
    assert bank.fsck()["ok"]


def test_merge_cli_and_errors(forked_bank, tmp_path):
    root, db_url, bank = forked_bank
    args = ["--bank", root] + (["--db", db_url] if db_url else [])
    code, out, err = run_main(*args, "merge", "main", "v1")
    assert code == 1 and "ancestor" in err and len(err.splitlines()) == 1
    code, out, err = run_main(*args, "merge", "v3", "arm")
    assert code == 1 and "--branch" in err
    code, out, err = run_main(*args, "merge", "main", "arm", "--method", "dare", "--drop", "1.5")
    assert code == 1 and "--drop" in err
    code, out, err = run_main(*args, "merge", "main", "arm", "--method", "ties", "--branch", "both", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["branch"] == "both" and d["params"]["density"] == 0.2
    code, out, err = run_main(*args, "log", "both")
    assert code == 0 and "(merge)" in out and "v3+v2" in out
    bank.revoke("s2", "unsafe")
    bank.checkout("both", tmp_path / "both")
    code, out, err = run_main(*args, "audit", tmp_path / "both", "--forbid-revoked", "--json")
    assert code == 3 and json.loads(out)["revoked"][0]["name"] == "s2"


# ----------------------------------------------------------------------------- migration 0003

def test_migration_0003_upgrades_a_bank_with_history(tmp_path, db_url):
    root = tmp_path / "bank"
    bank, _ = Bank.init(root, str(make_model(tmp_path / "base.safetensors")), db_url)
    bank.add_skill("s1", str(_ft(bank, "v0", tmp_path, "s1", 1)), 0.8)
    bank.close()
    engine = create_engine(db_url or f"sqlite:///{root / 'bank.db'}")
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0002")
        assert "revocations" not in inspect(engine).get_table_names()
        assert "second_parent_id" not in {c["name"] for c in inspect(engine).get_columns("versions")}
        migrate.upgrade(engine)  # skillbank's own runner, on a database with rows
        assert revision_of(engine) == script_dir().get_current_head()  # 0003 and every later one
        cols = {c["name"] for c in inspect(engine).get_columns("versions")}
        assert {"second_parent_id", "rebuilt_from_id"} <= cols
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM versions")).scalar_one() == 2
    finally:
        engine.dispose()
    bank = Bank.open(root, db_url)
    try:
        bank.revoke("s1", "test")
        assert bank.fsck()["ok"]
    finally:
        bank.close()
