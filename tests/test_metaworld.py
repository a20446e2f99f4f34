"""Meta-World v3: expert demos, range guards, OOD placement, batched evaluation, suites.

Marked slow (MuJoCo simulation), still run in CI; the whole file takes well under a minute.
"""

from __future__ import annotations

import numpy as np
import pytest

from skillbank.errors import SkillbankError

pytest.importorskip("metaworld")

from skillbank.envs import metaworld as mw  # noqa: E402
from skillbank.train.demos import read_demos  # noqa: E402

pytestmark = pytest.mark.slow


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    assert isinstance(excinfo.value, SkillbankError)
    return msg


@pytest.fixture(scope="module")
def reach_demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("mw") / "reach"
    path, kept = mw.generate_demos("reach-v3", 3, out, seed=0)
    return path, kept


def test_every_task_has_an_instruction_and_an_expert():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.policies import ENV_POLICY_MAP

    assert set(mw.INSTRUCTIONS) == set(ALL_V3_ENVIRONMENTS) == set(ENV_POLICY_MAP)
    assert len(mw.INSTRUCTIONS) == 50
    assert len(set(mw.INSTRUCTIONS.values())) == 50  # one instruction names one task
    assert mw.INSTRUCTIONS["pick-place-v3"] == "pick up the puck and place it at the goal"
    assert set(mw.MIN_XY_DISTANCE) <= set(mw.INSTRUCTIONS) and set(mw.MT10) <= set(mw.INSTRUCTIONS)
    assert len(mw.STATE_NAMES) == 39


def test_expert_demos_round_trip(reach_demos):
    path, kept = reach_demos
    assert kept == 3
    ds = read_demos(path)
    assert ds.n_episodes == 3 and ds.fps == 80
    assert ds.obs.shape[1] == 39 and ds.action.shape[1] == 4
    assert ds.tasks == {0: mw.INSTRUCTIONS["reach-v3"]}
    assert np.abs(ds.action).max() <= 1.0
    for sl in ds.episode_slices():
        obs = ds.obs[sl]
        assert obs.shape == (sl.stop - sl.start, 39) and 5 < obs.shape[0] < 200
        # Success for reach: the hand ends within 5 cm of the goal (obs[:3] vs obs[-3:]).
        assert np.linalg.norm(obs[-1, :3] - obs[-1, -3:]) < 0.05
        assert np.linalg.norm(obs[0, :3] - obs[0, -3:]) > 0.05
    # Each episode starts from fresh positions.
    starts = np.stack([ds.obs[sl][0, -3:] for sl in ds.episode_slices()])
    assert len({tuple(np.round(s, 4)) for s in starts}) == 3


def test_expert_evaluates_as_solved_in_batches():
    calls = []
    expert = mw.expert_policy("reach-v3")

    def policy(obs, task):
        assert obs.dtype == np.float32 and obs.shape[1] == 39 and task == "reach-v3"
        calls.append(obs.shape[0])
        return expert(obs, task)

    r = mw.evaluate(policy, "reach-v3", episodes=5, seed=0)
    assert r["episodes"] == 5 and r["success_rate"] >= 0.8
    assert r["successes"] == round(r["success_rate"] * 5)
    assert max(calls) == 5  # five envs stepped in lockstep, one batched call per step
    # Episode i starts from the same positions whatever the batch size: results are identical.
    r1 = mw.evaluate(expert, "reach-v3", episodes=5, seed=0, n_envs=2)
    assert (r1["successes"], r1["steps"]) == (r["successes"], r["steps"])


def test_a_useless_policy_fails_and_bad_actions_are_reported():
    def still(obs, task):
        return np.zeros((obs.shape[0], 4))

    r = mw.evaluate(still, "reach-v3", episodes=2, seed=1, max_steps=20)
    assert r["success_rate"] == 0.0 and r["steps"] == 40
    with pytest.raises(mw.EnvError) as e:
        mw.evaluate(lambda obs, task: np.zeros((obs.shape[0], 3)), "reach-v3", 2, 0, max_steps=5)
    assert "expected (2, 4)" in _one_line(e)


def test_min_distance_guard_raises_cleanly():
    with pytest.raises(mw.EnvError) as e:
        mw.make_env("pick-place-v3", obj_range=((0.0, 0.8, 0.02), (0.05, 0.8, 0.02)),
                    goal_range=((0.0, 0.85, 0.1), (0.05, 0.85, 0.2)))
    assert "reset would redraw forever" in _one_line(e)
    with pytest.raises(mw.EnvError) as e:  # satisfiable, but almost never
        mw.make_env("push-v3", obj_range=((0.0, 0.7, 0.02), (0.05, 0.75, 0.02)),
                    goal_range=((0.0, 0.8, 0.01), (0.05, 0.85, 0.02)))
    assert "of object/goal draws are 0.15 apart" in _one_line(e)
    with pytest.raises(mw.EnvError) as e:  # sweep-into measures against its fixed goal
        mw.make_env("sweep-into-v3", obj_range=((-0.05, 0.8, 0.02), (0.05, 0.88, 0.02)))
    assert "0.15" in _one_line(e)


def test_runtime_guard_if_validation_is_bypassed(monkeypatch):
    monkeypatch.setattr(mw, "_check_distance", lambda task, lo, hi: None)
    monkeypatch.setattr(mw, "_MAX_DRAWS", 200)
    env = mw.make_env("reach-v3", obj_range=((0.0, 0.7, 0.02), (0.0, 0.7, 0.02)),
                      goal_range=((0.0, 0.8, 0.1), (0.0, 0.8, 0.1)))
    with pytest.raises(mw.EnvError) as e:
        env.reset()
    assert "redrew positions 200 times" in _one_line(e)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"obj_range": ((0.6, 0.6, 0.02), (0.7, 0.7, 0.02))}, "outside the arm's reach"),
    ({"obj_range": ((0.1, 0.6, 0.02), (0.0, 0.7, 0.02))}, "lo > hi on x"),
    ({"obj_range": ((0.1, 0.6), (0.2, 0.7))}, "got shape (2, 2)"),
    ({"goal_range": ((0.1, 0.8, float("nan")), (0.2, 0.9, 0.2))}, "non-finite"),
])
def test_range_validation(kwargs, fragment):
    with pytest.raises(mw.EnvError) as e:
        mw.make_env("pick-place-v3", **kwargs)
    assert fragment in _one_line(e)


def test_goal_range_refused_where_the_goal_follows_the_fixture():
    with pytest.raises(mw.EnvError) as e:
        mw.make_env("drawer-open-v3", goal_range=((0.0, 0.7, 0.1), (0.1, 0.8, 0.1)))
    assert "no goal_range" in _one_line(e)
    with pytest.raises(mw.EnvError) as e:
        mw.make_env("bin-picking-v3", goal_range=((0.1, 0.7, 0.0), (0.12, 0.7, 0.0)))
    assert "no goal_range" in _one_line(e)
    with pytest.raises(mw.EnvError) as e:
        mw.make_env("plate-slide-v3", obj_range=((0.1, 0.6, 0.0), (0.1, 0.6, 0.0)))
    assert "no obj_range" in _one_line(e)
    with pytest.raises(mw.EnvError) as e:
        mw.make_env("pick-plce-v3")
    assert "did you mean pick-place-v3" in _one_line(e)


def test_ood_ranges_place_objects_and_goals_there():
    obj_r, _ = mw.OOD_VARIATIONS["pick-place-v3"]["obj-x-shift"]
    _, goal_r = mw.OOD_VARIATIONS["pick-place-v3"]["goal-x-extrap"]
    env = mw.make_env("pick-place-v3", obj_range=obj_r, goal_range=goal_r, seed=3)
    lo_o, hi_o = np.array(obj_r)
    lo_g, hi_g = np.array(goal_r)
    xs = []
    for _ in range(8):
        obs, _ = env.reset()
        assert np.all(obs[4:6] >= lo_o[:2] - 1e-6) and np.all(obs[4:6] <= hi_o[:2] + 1e-6)
        # The observed goal is where the goal really is, not clipped to the default goal space
        # (its x range [-0.1, 0.1] lies entirely below this goal range).
        assert np.all(obs[-3:] >= lo_g - 1e-6) and np.all(obs[-3:] <= hi_g + 1e-6)
        xs.append(obs[-3])
        obs, *_ = env.step(np.zeros(4, dtype=np.float32))
        assert lo_g[0] - 1e-6 <= obs[-3] <= hi_g[0] + 1e-6
    assert np.ptp(xs) > 0.01  # fresh positions every reset
    # A fixture task: the drawer's x follows obj_range.
    obj_d, _ = mw.OOD_VARIATIONS["drawer-open-v3"]["obj-x-shift"]
    env = mw.make_env("drawer-open-v3", obj_range=obj_d, seed=0)
    for _ in range(3):
        obs, _ = env.reset()
        assert obj_d[0][0] - 0.01 <= env._last_rand_vec[0] <= obj_d[1][0] + 0.01


def test_ood_variations_are_valid_ranges():
    for task, variations in mw.OOD_VARIATIONS.items():
        for name, (obj_r, goal_r) in variations.items():
            env = mw.make_env(task, obj_range=obj_r, goal_range=goal_r)
            env.reset()  # validation passed and a reset terminates


def test_expert_solves_an_ood_variation():
    obj_r, goal_r = mw.OOD_VARIATIONS["reach-v3"]["goal-x-extrap"]
    r = mw.evaluate(mw.expert_policy("reach-v3"), "reach-v3", 4, seed=0, obj_range=obj_r,
                    goal_range=goal_r)
    assert r["success_rate"] >= 0.75


def test_parse_suite():
    splits = mw.parse_suite("metaworld:pick-place-v3")
    assert [s.label for s in splits] == ["ID", "OOD:obj-x-shift", "OOD:goal-x-extrap",
                                         "generalist"]
    assert splits[0].tasks == ("pick-place-v3",) and splits[0].obj_range is None
    assert "pick-place-v3" not in splits[-1].tasks and len(splits[-1].tasks) == 9
    id_range = ((-0.05, 0.6, 0.02), (0.05, 0.65, 0.02))
    splits = mw.parse_suite("metaworld:reach-v3?ood=goal-z-extrap&generalist=push-v3+door-open-v3",
                            id_obj_range=id_range)
    assert [s.label for s in splits] == ["ID", "OOD:goal-z-extrap", "generalist"]
    assert splits[0].obj_range == id_range and splits[-1].tasks == ("push-v3", "door-open-v3")
    assert [s.label for s in mw.parse_suite("metaworld:sweep-v3?generalist=none")] == ["ID"]
    for spec, fragment in [("libero:spatial", "unknown eval suite 'libero'"),
                           ("pick-place-v3", "not of the form"),
                           ("metaworld:", "names no task"),
                           ("metaworld:pick-place-v9", "unknown Meta-World v3 task"),
                           ("metaworld:push-v3?ood=nope", "no OOD variation 'nope'"),
                           ("metaworld:push-v3?foo=1", "unknown option 'foo'")]:
        with pytest.raises(mw.EnvError) as e:
            mw.parse_suite(spec)
        assert fragment in _one_line(e)


def test_evaluate_suite_reports_intervals():
    suite = [mw.EvalSplit("ID", ("reach-v3",)),
             mw.EvalSplit("OOD", ("reach-v3",), *mw.OOD_VARIATIONS["reach-v3"]["goal-z-extrap"],
                          variation="goal-z-extrap")]
    expert = mw.expert_policy("reach-v3")
    rows = mw.evaluate_suite(expert, suite, episodes=2, seeds=[0, 1])
    assert [r["label"] for r in rows] == ["ID", "OOD:goal-z-extrap"]
    for r in rows:
        assert r["ci_method"] == "t-over-seeds" and len(r["per_seed"]) == 2
        assert r["episodes"] == 4 and 0 <= r["ci95"][0] <= r["success_rate"] <= r["ci95"][1] <= 1
    one = mw.evaluate_suite(expert, suite[:1], episodes=3, seeds=[5])[0]
    assert one["ci_method"] == "wilson-pooled" and one["episodes"] == 3
    with pytest.raises(mw.EnvError):
        mw.EvalSplit("test", ("reach-v3",))
    mw.release_envs()  # the pooled envs are closed and dropped; the next evaluate rebuilds
    assert mw.evaluate(expert, "reach-v3", 1, seed=0)["episodes"] == 1


def test_intervals():
    lo, hi = mw.wilson_interval(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73  # 0.722 for 10/10
    lo, hi = mw.wilson_interval(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.31
    lo, hi = mw.t_interval([0.6, 0.8, 0.7])
    assert lo == pytest.approx(0.7 - 4.303 * 0.1 / 3 ** 0.5, abs=1e-9)
    assert hi == pytest.approx(0.7 + 4.303 * 0.1 / 3 ** 0.5, abs=1e-9)
    assert mw.t_interval([1.0, 1.0]) == (1.0, 1.0)
