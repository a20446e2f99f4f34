"""The fuzzers of stress/fuzz.py at CI size, and a check that the harness sees what it must.

The CI run is 300 hypothesis examples per target (safetensors reader, task-vector container,
codec decoders), about 20 s on a busy 2-core machine; `python stress/fuzz.py --examples 20000`
is the longer run (stress/README.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "stress"))  # fuzz.py imports fuzz_inputs as a sibling module

import fuzz  # noqa: E402

from skillbank.errors import IntegrityError  # noqa: E402

EXAMPLES = 300


def test_fuzz_targets_at_ci_size():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "stress" / "fuzz.py"), "--examples", str(EXAMPLES), "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    by_target = {r["target"]: r for r in report["results"]}
    assert set(by_target) == set(fuzz.TARGETS)
    for target, r in by_target.items():
        assert "crashed" not in r, f"{target}: {r.get('crashed')}"
        assert not r["unexpected"], f"{target}: {r['unexpected'][:5]}"
        # every example ran through the parser, and both outcomes occurred: inputs reach past the
        # first check (some decode cleanly) and the damage is seen (most are refused, in many ways)
        assert r["cases"] >= EXAMPLES and r["ops"] >= r["cases"], r
        assert r["clean"] > 0 and r["refused"] > 0 and r["distinct_errors"] >= 10, r
    assert report["ok"] and proc.returncode == 0
    assert time.perf_counter() - start < 300


# ----------------------------------------------------------------------------- the harness itself

def test_tally_counts_clean_refused_and_unexpected_outcomes():
    tally = fuzz.Tally("self-test", case_timeout=5, save=None)
    tally.case("input", b"x")
    assert tally.op(lambda: 42, IntegrityError) == 42
    tally.op(lambda: (_ for _ in ()).throw(IntegrityError("block 3 is truncated")), IntegrityError)
    tally.op(lambda: {}["missing"], IntegrityError)
    tally.op(lambda: (_ for _ in ()).throw(IntegrityError("two\nlines")), IntegrityError)
    s = tally.summary(0.0)
    assert (s["cases"], s["ops"], s["clean"], s["refused"]) == (1, 4, 1, 2)
    assert "block N is truncated" in s["errors"]
    assert [u["type"] for u in s["unexpected"]] == ["KeyError", "MultiLineMessage"]


def test_tally_reports_a_hang():
    previous = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(fuzz.CaseTimeout()))
    try:
        tally = fuzz.Tally("self-test", case_timeout=0.2, save=None)
        tally.case("input", b"")
        tally.op(lambda: time.sleep(5), IntegrityError)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert [u["type"] for u in tally.unexpected] == ["Hang"]


def test_bounds_refuse_reads_outside_the_file_or_the_accepted_region(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(100))
    fd = os.open(path, os.O_RDONLY)
    bounds = fuzz.Bounds()
    try:
        assert len(os.pread(fd, 8, 96)) == 4  # a short fixed-size probe past the end is fine
        with pytest.raises(fuzz.OutOfBounds):
            os.pread(fd, 2**40, 0)
        bounds.region[fd] = (10, 50)
        assert len(os.pread(fd, 40, 10)) == 40
        with pytest.raises(fuzz.OutOfBounds):
            os.pread(fd, 8, 48)
        with pytest.raises(fuzz.OutOfBounds):
            os.preadv(fd, [bytearray(4)], 5)
    finally:
        os.pread, os.preadv = bounds._pread, bounds._preadv
        os.close(fd)
