"""Smoke check of the merge benchmark: `--quick --no-peers` runs end to end and prints its table."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_bench.py"


@pytest.mark.slow
def test_merge_bench_quick(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--no-peers", "--workdir", str(tmp_path / "work")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| run " in r.stdout and "| wall s |" in r.stdout and "| peak RSS MB |" in r.stdout
    assert "skillbank checkout" in r.stdout
    assert "## codecs on a realistic task vector" in r.stdout
    assert not (tmp_path / "work" / "base").exists()  # generated models are cleaned up
