"""`pip install .` (not only editable) must carry the migrations and the console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_migrations_and_entry_point(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(ROOT), "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("skillbank-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("skillbank/migrations/env.py", "skillbank/migrations/script.py.mako",
                   "skillbank/migrations/versions/0001_initial_schema.py", "skillbank/groups.py"):
        assert needed in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "skillbank = skillbank.entry:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_console_script_runs_with_the_collector_back_on(monkeypatch, capsys):
    import gc

    from skillbank import __version__
    from skillbank.entry import main

    monkeypatch.setattr(sys, "argv", ["skillbank", "--version"])
    try:
        main()
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    assert __version__ in capsys.readouterr().out
    assert gc.isenabled()
