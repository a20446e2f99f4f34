"""add-skill --demos end to end: Meta-World expert demos, the reference policy, the trainer, eval."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

pytest.importorskip("metaworld")

from skillbank.cli import cli  # noqa: E402
from skillbank.envs.metaworld import generate_demos  # noqa: E402
from skillbank.train.finetune import pretrain  # noqa: E402
from skillbank.train.trainer import TrainSettings  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    pre, _ = generate_demos(["reach-v3", "push-v3"], 3, root / "pretrain", seed=0)
    skill, _ = generate_demos("reach-wall-v3", 3, root / "reach_wall", seed=1)
    pretrain(pre, root / "base", settings=TrainSettings(steps=60, batch_size=64, threads=1))
    runner = CliRunner()
    bank = ["--bank", str(root / "bank")]
    r = runner.invoke(cli, [*bank, "init", "--base", str(root / "base")])
    assert r.exit_code == 0, r.output
    return root, runner, bank, skill


def test_add_skill_from_demos_records_lineage(lab):
    root, runner, bank, skill = lab
    r = runner.invoke(cli, [*bank, "add-skill", "reach-wall", "--demos", str(skill), "--alpha", "0.8",
                            "--steps", "40", "--batch-size", "64", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["version"] == "v1" and out["skill"] == "reach-wall" and len(out["demos_digest"]) == 32
    show = json.loads(runner.invoke(cli, [*bank, "show", "v1", "--json"]).stdout)
    detail = show["skill_detail"]
    assert detail["demos"]["digest"] == out["demos_digest"]
    assert detail["trainer"] == "skillbank-bc" or detail["trainer"].startswith("skillbank")
    assert detail["trainer_settings"]["settings"]["steps"] == 40
    # the config of a LeRobot-style base travels with every checkout
    runner.invoke(cli, [*bank, "checkout", "v1", "--out", str(root / "v1")])
    assert json.loads((root / "v1" / "config.json").read_text())["type"] == "skillbank_ref"


def test_eval_records_success_rates(lab):
    root, runner, bank, _ = lab
    r = runner.invoke(cli, [*bank, "eval", "v0", "--suite", "metaworld:reach-wall-v3?ood=none&generalist=reach-v3",
                            "--episodes", "2", "--seeds", "0", "--json"])
    assert r.exit_code == 0, r.output
    labels = {x["label"] for x in json.loads(r.stdout)["results"]}
    assert labels == {"ID", "generalist"}
    evals = json.loads(runner.invoke(cli, [*bank, "show", "v0", "--json"]).stdout)["evals"]
    assert {e["split"] for e in evals} >= {"ID", "generalist"}
    assert all(0.0 <= e["value"] <= 1.0 for e in evals)


def test_alpha_auto_sweeps_and_plots(lab):
    root, runner, bank, skill = lab
    plot = root / "sweep.png"
    r = runner.invoke(cli, [*bank, "add-skill", "reach-wall-auto", "--demos", str(skill), "--alpha", "auto",
                            "--val-suite", "metaworld:reach-wall-v3?generalist=none", "--episodes", "1",
                            "--steps", "20", "--batch-size", "32", "--plot", str(plot), "--json",
                            "--branch", "auto", "--from", "v0"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    sweep = out["alpha_sweep"]
    assert [p["alpha"] for p in sweep["points"]] == [0.25, 0.5, 0.75, 1.0]
    assert float(out["alpha"]) == sweep["chosen"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_cmd_runs_the_users_trainer(lab):
    root, runner, bank, skill = lab
    script = root / "trainer.py"
    script.write_text(
        "import sys, shutil, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "parent, out = sys.argv[1], sys.argv[2]\n"
        "sd = load_file(parent + '/model.safetensors')\n"
        "save_file({k: (v + 0.001 * torch.ones_like(v)) if v.is_floating_point() else v for k, v in sd.items()},"
        " out + '/model.safetensors')\n")
    cmd = f"{sys.executable} {script} {{parent}} {{out}}"
    r = runner.invoke(cli, [*bank, "add-skill", "external", "--demos", str(skill), "--train-cmd", cmd,
                            "--alpha", "0.5", "--branch", "ext", "--from", "v0", "--json"])
    assert r.exit_code == 0, r.output
    show = json.loads(runner.invoke(cli, [*bank, "show", json.loads(r.stdout)["version"], "--json"]).stdout)
    assert show["skill_detail"]["trainer"] == "external-command"
    bad = runner.invoke(cli, [*bank, "add-skill", "broken", "--demos", str(skill), "--train-cmd",
                              f"{sys.executable} -c 'import sys; sys.exit(3)'", "--branch", "b2", "--from", "v0"])
    assert bad.exit_code == 1
