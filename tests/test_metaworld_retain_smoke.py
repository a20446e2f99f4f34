"""Smoke check of the Meta-World RETAIN benchmark: `run.py --smoke` (1 target, 2 pretraining
tasks, 3 demos each, 100 training steps, 3 episodes) runs every stage end to end, records every
result in the bank, and writes the metrics, table and sweep data the full run writes."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "examples" / "metaworld_retain" / "run.py"


@pytest.mark.slow
def test_metaworld_retain_smoke(tmp_path):
    out = tmp_path / "mw"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(RUN), "--smoke", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, check=False)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert elapsed < 120, f"smoke run took {elapsed:.0f} s"  # ~20-30 s on 2 cores

    for rel in ("demos/pretrain/meta/info.json", "demos/pick-place-v3/meta/info.json",
                "pretrain/base/model.safetensors", "pretrain/base/config.json", "bank/bank.db",
                "compare/results.json", "continual/results.json", "metrics.json", "results.md",
                "alpha_sweep.csv"):
        assert (out / rel).is_file(), rel
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "alpha_sweep.png").stat().st_size > 0

    m = json.loads((out / "metrics.json").read_text())
    assert {"mode", "targets", "methods", "per_target", "alpha_sweep", "continual", "episodes",
            "timings_s"} <= set(m)
    assert m["mode"] == "smoke" and m["targets"] == ["pick-place-v3"]
    methods = {"base", "task_ft", "co_ft", "retain_task_ft", "retain_co_ft", "retain_task_ft_lang", "expert"}
    assert set(m["methods"]) == methods
    for method in methods:
        for split in ("ID", "OOD_val", "OOD_test", "generalist"):
            cell = m["methods"][method][split]
            assert 0.0 <= cell["lo"] <= cell["mean"] <= cell["hi"] <= 1.0
    assert set(m["alpha_sweep"]["pick-place-v3"]) == {"task", "co"}
    assert set(m["alpha_sweep"]["pick-place-v3"]["task"]) == {"0.5", "1"}
    assert m["per_target"]["pick-place-v3"]["alpha"]["retain_task_ft"] in (0.5, 1.0)
    assert set(m["continual"]) == {"retain", "seq_ft"}
    assert set(m["timings_s"]) >= {"demos", "pretrain", "compare", "continual", "total"}

    # Every evaluated model is a bank version with its results attached.
    log = subprocess.run([sys.executable, "-c", "from skillbank.cli import main; main()", "--bank",
                          str(out / "bank"), "log", "continual/retain", "--json"],
                         capture_output=True, text=True, check=False)
    assert log.returncode == 0, log.stderr
    chain = json.loads(log.stdout)
    assert [v["skill"] for v in chain] == ["pick-place-v3", None]
    show = subprocess.run([sys.executable, "-c", "from skillbank.cli import main; main()", "--bank",
                           str(out / "bank"), "show", chain[0]["version"], "--json"],
                          capture_output=True, text=True, check=False)
    assert show.returncode == 0, show.stderr
    splits = {e["split"] for e in json.loads(show.stdout)["evals"]}
    assert {"ID", "generalist"} <= splits
    assert "| RETAIN-co-FT |" in (out / "results.md").read_text()
