"""The behaviour-cloning trainer and the finetune / external-trainer entry points.

Demos are synthetic (actions a fixed function of the observation, different per task) and the
text encoder is a hash-based stand-in, so every test here runs in a second or two."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from skillbank.errors import SkillbankError
from skillbank.policies import RefPolicy, RefPolicyConfig
from skillbank.train import trainer as trainer_mod
from skillbank.train.demos import DemoSet, read_demos, write_demos
from skillbank.train.finetune import finetune, pretrain, run_train_cmd
from skillbank.train.trainer import TrainSettings, train_bc

from fake_encoder import FAKE  # noqa: E402  (registers it)
SMALL = RefPolicyConfig(hidden=64, text_encoder=FAKE)
QUIET = dict(progress=False)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKILLBANK_CACHE_DIR", str(tmp_path / "cache"))


def synthetic_demos(tasks: dict[int, str], frames_per_task=400, seed=0, root="synthetic") -> DemoSet:
    """Meta-World-shaped demos: 39-d obs, 4-d actions in [-1, 1], a different linear map per task."""
    rng = np.random.default_rng(seed)
    obs, act, tix, eix = [], [], [], []
    for k, (task, _) in enumerate(sorted(tasks.items())):
        w = np.random.default_rng(1000 + task).standard_normal((39, 4)) / 4
        o = rng.standard_normal((frames_per_task, 39)).astype(np.float32)
        obs.append(o)
        act.append(np.tanh(o @ w).astype(np.float32))
        tix.append(np.full(frames_per_task, task))
        eix.append(k * 10 + np.arange(frames_per_task) // 50)
    return DemoSet(root=Path(root), obs=np.concatenate(obs), action=np.concatenate(act),
                   task_index=np.concatenate(tix).astype(np.int64),
                   episode_index=np.concatenate(eix).astype(np.int64), tasks=dict(tasks), fps=80)


PRETRAIN_TASKS = {0: "reach the goal", 1: "push the puck to the goal"}
NEW_TASK = {0: "open the drawer"}


def fresh_policy(seed=0, config=SMALL) -> RefPolicy:
    torch.manual_seed(seed)
    return RefPolicy(config)


def test_bc_reduces_the_loss():
    demos = synthetic_demos(PRETRAIN_TASKS)
    policy = fresh_policy(config=RefPolicyConfig(hidden=128, text_encoder=FAKE))
    s = TrainSettings(steps=200, batch_size=128, lr=2e-3, log_every=20, seed=0)
    m = train_bc(policy, demos, s, **QUIET)
    assert m["normalisation"] == "computed" and policy.config.has_stats
    assert m["loss_final"] < m["loss_first"] / 5, m["history"]
    assert m["samples"] == 200 * 128 and m["samples_per_s"] > 0
    json.dumps(m)  # goes into the lineage as is
    # The instruction matters: the same observation gets each task's own action.
    obs = demos.obs[:1]
    assert np.abs(policy.act(obs, PRETRAIN_TASKS[0]) - policy.act(obs, PRETRAIN_TASKS[1])).max() > 0.05


def test_same_seed_same_weights():
    demos = synthetic_demos(PRETRAIN_TASKS, frames_per_task=100)
    s = TrainSettings(steps=30, batch_size=32, seed=7)
    runs = []
    for seed in (7, 7, 8):
        policy = fresh_policy(0)
        train_bc(policy, demos, TrainSettings(**{**s.to_dict(), "seed": seed}), **QUIET)
        runs.append(policy.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_cofinetune_mix_is_respected(monkeypatch):
    own = synthetic_demos(NEW_TASK, frames_per_task=100, root="new")
    co = synthetic_demos(PRETRAIN_TASKS, frames_per_task=100, seed=1, root="pre")
    drawn: dict[int, int] = {}
    real_sample = trainer_mod._Frames.sample

    def counting(self, k, gen):
        drawn[self.n] = drawn.get(self.n, 0) + k
        return real_sample(self, k, gen)

    monkeypatch.setattr(trainer_mod._Frames, "sample", counting)
    policy = fresh_policy()
    s = TrainSettings(steps=25, batch_size=40, mix=0.25)
    m = train_bc(policy, own, s, cofinetune=co, **QUIET)
    assert drawn == {own.n_frames: 25 * 30, co.n_frames: 25 * 10}
    assert (m["samples_demos"], m["samples_cofinetune"]) == (750, 250)
    # Pretraining statistics come from the demos given first, never from the co-finetune set.
    np.testing.assert_allclose(policy.config.obs_mean, own.obs.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)

    drawn.clear()
    m = train_bc(policy, own, TrainSettings(steps=5, batch_size=40, mix=0.0), cofinetune=co, **QUIET)
    assert drawn == {own.n_frames: 200} and m["samples_cofinetune"] == 0 and m["normalisation"] == "reused"


@pytest.fixture
def parent_dir(tmp_path) -> Path:
    out = tmp_path / "base"
    result = pretrain(synthetic_demos(PRETRAIN_TASKS, frames_per_task=100), out, SMALL,
                      TrainSettings(steps=40, batch_size=64), **QUIET)
    assert result["metrics"]["normalisation"] == "computed"
    return out


def test_finetune_writes_a_checkpoint_shaped_like_its_parent(tmp_path, parent_dir):
    new = synthetic_demos(NEW_TASK, frames_per_task=100)
    s = TrainSettings(steps=40, batch_size=64, checkpoint_every=20)
    result = finetune(parent_dir, new, tmp_path / "ft", s, **QUIET)
    parent, child = load_file(str(parent_dir / "model.safetensors")), load_file(str(tmp_path / "ft/model.safetensors"))
    assert list(parent) == list(child)
    assert all(parent[k].shape == child[k].shape and parent[k].dtype == child[k].dtype for k in parent)
    assert any(not torch.equal(parent[k], child[k]) for k in parent)
    # The parent's normalisation is reused, so parent and child read observations alike.
    pcfg = json.loads((parent_dir / "config.json").read_text())
    assert json.loads((tmp_path / "ft/config.json").read_text()) == pcfg
    assert result["metrics"]["normalisation"] == "reused"
    assert result["settings"] == s.to_dict() and result["trainer"] == "skillbank-bc"
    json.dumps(result)
    assert sorted(p.name for p in (tmp_path / "ft/checkpoints").iterdir()) == ["step-000020", "step-000040"]
    RefPolicy.from_pretrained(tmp_path / "ft/checkpoints/step-000020")


def test_finetune_from_a_lerobot_dataset_with_cofinetuning(tmp_path, parent_dir):
    """The path-based entry point, through the real LeRobot v3 reader."""
    def episodes(demos):
        return [{"obs": demos.obs[s], "action": demos.action[s], "task": demos.tasks[int(demos.task_index[s][0])]}
                for s in demos.episode_slices()]

    write_demos(tmp_path / "new", episodes(synthetic_demos(NEW_TASK, frames_per_task=100)))
    write_demos(tmp_path / "pre", episodes(synthetic_demos(PRETRAIN_TASKS, frames_per_task=100, seed=3)))
    s = TrainSettings(steps=10, batch_size=32, cofinetune=str(tmp_path / "pre"), mix=0.5)
    result = finetune(parent_dir, tmp_path / "new", tmp_path / "ft", s, **QUIET)
    assert result["metrics"]["samples_cofinetune"] == 10 * 16
    assert result["demos"]["frames"] == read_demos(tmp_path / "new").n_frames
    assert result["demos"]["tasks"] == {"0": "open the drawer"}


def test_finetune_refuses_demos_of_another_shape(tmp_path, parent_dir):
    wrong = synthetic_demos(NEW_TASK, frames_per_task=10)
    wrong.obs = wrong.obs[:, :20]
    with pytest.raises(SkillbankError, match="20.*39"):
        finetune(parent_dir, wrong, tmp_path / "ft", TrainSettings(steps=1), **QUIET)


def test_settings_round_trip_and_validation():
    s = TrainSettings(steps=10, cofinetune=Path("/data/pre"), mix=0.3)
    assert s.cofinetune == "/data/pre"
    assert TrainSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(SkillbankError, match="mix"):
        TrainSettings(mix=1.5)
    with pytest.raises(SkillbankError, match="unknown training settings: bogus"):
        TrainSettings.from_dict({"bogus": 1})


def test_run_train_cmd_copies_the_parent(tmp_path, parent_dir):
    copy = ("import shutil, sys; shutil.copy(sys.argv[1] + '/model.safetensors', sys.argv[2] + '/model.safetensors');"
            " print('epoch {1}: done')")
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(copy)} {{parent}} {{out}} {{demos}}"
    out = tmp_path / "out dir with spaces"
    got = run_train_cmd(cmd, parent_dir, out, tmp_path / "demos", echo=False)
    assert got == out / "model.safetensors"
    assert got.read_bytes() == (parent_dir / "model.safetensors").read_bytes()


def test_run_train_cmd_failures_are_one_line(tmp_path, parent_dir):
    fail = "import sys; print('loading...', file=sys.stderr); sys.exit('CUDA out of memory')"
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(fail)}"
    with pytest.raises(SkillbankError) as err:
        run_train_cmd(cmd, parent_dir, tmp_path / "o1", tmp_path, echo=False)
    assert str(err.value) == "trainer command failed (exit 1): CUDA out of memory"

    with pytest.raises(SkillbankError, match="wrote no safetensors"):
        run_train_cmd(f"{shlex.quote(sys.executable)} -c pass", parent_dir, tmp_path / "o2", tmp_path, echo=False)
    with pytest.raises(SkillbankError, match="cannot run trainer"):
        run_train_cmd("no-such-trainer-xyz {out}", parent_dir, tmp_path / "o3", tmp_path, echo=False)
    with pytest.raises(SkillbankError, match="pickle"):
        run_train_cmd(f"{shlex.quote(sys.executable)} -c \"open('{{out}}/pytorch_model.bin', 'wb')\"",
                      parent_dir, tmp_path / "o4", tmp_path, echo=False)


def test_progress_callback_and_tty_bar(monkeypatch):
    demos = synthetic_demos(NEW_TASK, frames_per_task=20)
    seen = []
    train_bc(fresh_policy(), demos, TrainSettings(steps=3, batch_size=8), progress=lambda *a: seen.append(a))
    assert [(step, total) for step, total, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert set(seen[0][2]) == {"loss", "lr"}
    # On a terminal the default is a rich bar; it must start and stop cleanly.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    train_bc(fresh_policy(), demos, TrainSettings(steps=3, batch_size=8))
