"""Crash safety: SIGKILL and injected ENOSPC / EIO in add-skill, checkout, gc and db upgrade.

The harness (stress/crash_harness.py) kills or fails the real CLI at write-path events and after
random delays, then checks that fsck is clean, every logged version checks out to its digest,
nothing half-written is visible, a failed command left the bank as it was, and a re-run succeeds.
This runs it at CI size; stress/README.md gives the command for a larger run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "stress" / "crash_harness.py"
COMMANDS = {"add-skill", "checkout", "gc", "db upgrade"}
KILLS = ("kill point", "random delay")
FAULTS = ("ENOSPC", "EIO")


def run_harness(*args: str) -> dict:
    r = subprocess.run([sys.executable, str(HARNESS), "--json", *args], capture_output=True, text=True,
                       timeout=900, cwd=REPO, check=False)
    assert r.stdout, r.stderr[-3000:]
    report = json.loads(r.stdout)
    failed = [rec for rec in report["records"] if rec["problems"]]
    assert not failed, json.dumps(failed, indent=1)[:6000]
    assert r.returncode == 0, r.stderr[-3000:]
    return report


def assert_really_injected(report: dict) -> None:
    """Every command met every kind of injection, and each one did what it says."""
    assert set(report["commands"]) == COMMANDS
    assert report["survived"] == report["injections"] == len(report["records"])
    for name, t in report["commands"].items():
        assert t["events"] > 0, name
        got = t["injections"]
        assert got["kill point"] >= 2 and got["random delay"] >= 1 and got["EIO"] >= 1, (name, got)
        if name != "gc":  # gc only unlinks: nothing it does can fill a disk
            assert got["ENOSPC"] >= 1, (name, got)
    records = report["records"]
    kills = [x for x in records if x["category"] in KILLS]
    faults = [x for x in records if x["category"] in FAULTS]
    assert kills and all(x["rc"] == -9 for x in kills)  # really died by SIGKILL
    assert faults and all(x["rc"] == 1 and x["event"] is not None for x in faults)
    for name in COMMANDS:
        # kills landed on both sides of the command's point of no return (COMMIT, rename, unlink)
        assert {x["landed"] for x in kills if x["command"] == name} == {True, False}, name
        # a fault never leaves a half-done command: rows, refs, HEAD and schema are as they were
        assert not any(x["landed"] for x in faults if x["command"] == name and name != "gc"), name


def test_crash_injections_sqlite():
    report = run_harness("--injections", "40", "--seed", "1")
    assert report["db"] == "sqlite" and report["injections"] >= 36
    assert_really_injected(report)


@pytest.mark.slow
@pytest.mark.postgres
def test_crash_injections_postgresql(pg_server):
    report = run_harness("--injections", "20", "--seed", "2", "--db-url", pg_server.url("postgres"))
    assert report["db"] == "postgresql" and report["injections"] >= 18
    assert_really_injected(report)
