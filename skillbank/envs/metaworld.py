"""Meta-World v3 (state-based, headless): expert demonstrations, OOD variations and evaluation.

Why not `gym.make('Meta-World/MT1', ...)`: the official benchmarks draw every reset from 50
pre-sampled positions per task, so "in distribution" would mean "one of 50 configurations". Here
each task class is built directly with fresh, seeded positions on every reset, and the object and
goal ranges can be replaced, which is what an OOD split needs.

Seeding: episode i of a run with seed s always starts from the same positions (the env is reseeded
from (s, i, purpose) before each reset), whatever the batch size; demos and evaluation use
different purposes, so `evaluate(seed=0)` never replays the configurations `generate_demos(seed=0)`
trained on.
"""

from __future__ import annotations

import difflib
import math
import re
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import parse_qs

import numpy as np

from skillbank.errors import SkillbankError

Range = tuple[tuple[float, float, float], tuple[float, float, float]]
PolicyFn = Callable[[np.ndarray, str], np.ndarray]

OBS_DIM = 39
ACTION_DIM = 4
FPS = 80  # frame_skip 5 x MuJoCo timestep 0.0025 s


class EnvError(SkillbankError):
    """A Meta-World task, range or suite cannot be used as asked."""


# One instruction per v3 task, for language-conditioned policies (the pretrained policy learns a
# new task from related instructions, where a one-hot task id would carry nothing).
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the basketball and dunk it into the hoop",
    "bin-picking-v3": "pick up the cube and place it into the target bin",
    "box-close-v3": "pick up the box lid and place it on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top, behind a wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button from the front, behind a wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "rotate the dial 180 degrees",
    "disassemble-v3": "pick the nut off the peg",
    "door-close-v3": "close the door with a revolving joint",
    "door-lock-v3": "lock the door by rotating the lock clockwise",
    "door-open-v3": "open the door with a revolving joint",
    "door-unlock-v3": "unlock the door by rotating the lock counter-clockwise",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "rotate the faucet handle counter-clockwise to open it",
    "faucet-close-v3": "rotate the faucet handle clockwise to close it",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down sideways",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up sideways",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the cabinet",
    "peg-insert-side-v3": "insert the peg sideways into the hole",
    "peg-unplug-side-v3": "unplug the peg sideways",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal around the wall",
    "push-back-v3": "push the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position over the wall",
    "shelf-place-v3": "pick up the block and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "push the window open",
    "window-close-v3": "push the window closed",
}
TASK_BY_INSTRUCTION: dict[str, str] = {v: k for k, v in INSTRUCTIONS.items()}

MT10: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
)

# Tasks whose reset redraws positions while the xy distance between the object (vector[0:2])
# and the goal (vector[3:5]) is below this (read from each task's reset_model in metaworld 3.1).
# A range that cannot satisfy it would make reset() loop forever.
MIN_XY_DISTANCE: dict[str, float] = {
    "assembly-v3": 0.1, "basketball-v3": 0.15, "box-close-v3": 0.25, "coffee-pull-v3": 0.15,
    "coffee-push-v3": 0.15, "disassemble-v3": 0.1, "hand-insert-v3": 0.15,
    "peg-insert-side-v3": 0.1, "pick-out-of-hole-v3": 0.15, "pick-place-v3": 0.15,
    "pick-place-wall-v3": 0.15, "push-back-v3": 0.15, "push-v3": 0.15, "push-wall-v3": 0.15,
    "reach-v3": 0.15, "reach-wall-v3": 0.15, "shelf-place-v3": 0.1, "soccer-v3": 0.15,
    "stick-pull-v3": 0.1, "stick-push-v3": 0.1, "sweep-into-v3": 0.15,
}
# sweep-into compares the object with its fixed goal, not with the drawn goal part.
_FIXED_GOAL_XY: dict[str, tuple[float, float]] = {"sweep-into-v3": (0.0, 0.84)}
# Parts of the drawn vector a task ignores (checked by shifting each range and watching the
# observation): a range for them would silently change nothing, so it is refused.
_GOAL_NOT_DRAWN = frozenset({"sweep-into-v3", "bin-picking-v3", "disassemble-v3"})
_OBJ_NOT_DRAWN = frozenset({"plate-slide-v3", "plate-slide-side-v3", "plate-slide-back-v3",
                            "plate-slide-back-side-v3"})
_MIN_ACCEPT = 0.01  # a range whose draws are accepted less often than this is refused
_MAX_DRAWS = 10_000  # belt and braces: a reset that redraws this often raises instead of hanging

# Named OOD variations: (object range, goal range), None keeping the task's default. Each is
# disjoint from (or extrapolates beyond) the default range, and the scripted expert still solves it
# (success measured over 20 episodes, seed 0, 200 steps, in the comment), so failures there are the
# policy's, not the task's.
OOD_VARIATIONS: dict[str, dict[str, tuple[Range | None, Range | None]]] = {
    "reach-v3": {
        "goal-x-extrap": (None, ((0.15, 0.8, 0.05), (0.3, 0.9, 0.3))),  # expert 1.00
        "goal-z-extrap": (None, ((-0.1, 0.8, 0.3), (0.1, 0.9, 0.4))),  # expert 1.00
    },
    "push-v3": {
        "obj-x-shift": (((0.12, 0.6, 0.02), (0.22, 0.7, 0.02)), None),  # expert 1.00
        "goal-x-extrap": (None, ((0.15, 0.8, 0.01), (0.25, 0.9, 0.02))),  # expert 0.95
    },
    "pick-place-v3": {
        "obj-x-shift": (((0.12, 0.6, 0.02), (0.22, 0.7, 0.02)), None),  # expert 1.00
        "goal-x-extrap": (None, ((0.15, 0.8, 0.05), (0.25, 0.9, 0.3))),  # expert 1.00
    },
    "drawer-open-v3": {"obj-x-shift": (((0.12, 0.9, 0.0), (0.2, 0.9, 0.0)), None)},  # 1.00
    "drawer-close-v3": {"obj-x-shift": (((0.12, 0.9, 0.0), (0.2, 0.9, 0.0)), None)},  # 1.00
    "button-press-topdown-v3": {
        "obj-x-shift": (((0.12, 0.8, 0.115), (0.2, 0.9, 0.115)), None),  # expert 1.00
    },
    "door-open-v3": {"obj-x-shift": (((0.12, 0.85, 0.15), (0.2, 0.95, 0.15)), None)},  # 1.00
    "window-open-v3": {"obj-x-shift": (((0.12, 0.7, 0.16), (0.2, 0.9, 0.16)), None)},  # 1.00
    "window-close-v3": {"obj-x-shift": (((0.1, 0.75, 0.2), (0.15, 0.9, 0.2)), None)},  # 1.00
    # The peg further right; the expert gets 0.90 on the default range.
    "peg-insert-side-v3": {"obj-x-shift": (((0.2, 0.5, 0.02), (0.3, 0.7, 0.02)), None)},  # 0.85
}


def _env_dict():
    try:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    except ImportError as e:  # pragma: no cover - metaworld is a dependency
        raise EnvError(f"Meta-World is not importable ({e}); pip install metaworld packaging") from None
    return ALL_V3_ENVIRONMENTS


def check_task(task: str) -> str:
    """The task name, or a one-line error that suggests the nearest name."""
    if task in INSTRUCTIONS:
        return task
    close = difflib.get_close_matches(str(task), list(INSTRUCTIONS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise EnvError(f"unknown Meta-World v3 task '{task}'{hint}")


def instruction(task: str) -> str:
    return INSTRUCTIONS[check_task(task)]


# ----------------------------------------------------------------------------- environments

_GUARDED: dict[str, type] = {}


def _guarded_class(task: str) -> type:
    """The task's class, with a redraw counter so an unsatisfiable range raises instead of hanging."""
    cls = _GUARDED.get(task)
    if cls is not None:
        return cls
    base = _env_dict()[task]

    def _get_state_rand_vec(self):
        self._skillbank_draws += 1
        if self._skillbank_draws > _MAX_DRAWS:
            raise EnvError(f"{task}: reset redrew positions {_MAX_DRAWS} times without meeting "
                           "the task's object-goal distance; widen the ranges")
        return base._get_state_rand_vec(self)

    def reset(self, seed=None, options=None):
        self._skillbank_draws = 0
        return base.reset(self, seed=seed, options=options)

    cls = type(base.__name__ + "Skillbank", (base,),
               {"_get_state_rand_vec": _get_state_rand_vec, "reset": reset,
                "_skillbank_draws": 0, "__module__": __name__})
    _GUARDED[task] = cls
    return cls


def _as_range(value, what: str, task: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise EnvError(f"{task}: {what} must be ((lo x, y, z), (hi x, y, z)), got {value!r}") from None
    if arr.shape != (2, 3):
        raise EnvError(f"{task}: {what} must be ((lo x, y, z), (hi x, y, z)), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise EnvError(f"{task}: {what} has a non-finite bound")
    if (arr[0] > arr[1]).any():
        axis = "xyz"[int(np.flatnonzero(arr[0] > arr[1])[0])]
        raise EnvError(f"{task}: {what} has lo > hi on {axis}")
    return arr


def _max_xy_distance(a_lo, a_hi, b_lo, b_hi) -> float:
    """The largest xy distance between a point of box a and a point of box b (axes independent)."""
    span = np.maximum(a_hi[:2] - b_lo[:2], b_hi[:2] - a_lo[:2])
    return float(np.hypot(*span))


def _check_distance(task: str, lo: np.ndarray, hi: np.ndarray) -> None:
    d = MIN_XY_DISTANCE.get(task)
    if d is None:
        return
    if task in _FIXED_GOAL_XY:
        g = np.array(_FIXED_GOAL_XY[task])
        g_lo = g_hi = g
    else:
        g_lo, g_hi = lo[3:5], hi[3:5]
    best = _max_xy_distance(lo[:2], hi[:2], g_lo, g_hi)
    if best < d:
        raise EnvError(f"{task}: object and goal ranges are at most {best:.3f} apart in xy, but "
                       f"the task needs {d}: reset would redraw forever")
    rng = np.random.default_rng(0)
    obj = rng.uniform(lo[:2], hi[:2], size=(4096, 2))
    goal = rng.uniform(g_lo, g_hi, size=(4096, 2))
    accept = float((np.linalg.norm(obj - goal, axis=1) >= d).mean())
    if accept < _MIN_ACCEPT:
        raise EnvError(f"{task}: only {accept:.2%} of object/goal draws are {d} apart in xy, as the "
                       "task needs; widen or separate the ranges")


def _configure(env, task: str, obj_range, goal_range) -> None:
    """Put the task's default ranges back, then apply the requested ones (pooled envs are reused)."""
    from gymnasium.spaces import Box

    d_lo, d_hi = env._skillbank_default_reset
    lo, hi = d_lo.copy(), d_hi.copy()
    size = lo.size
    if obj_range is not None:
        if task in _OBJ_NOT_DRAWN:
            raise EnvError(f"{task}: the object always starts at the same place, so there is no "
                           "obj_range; shift goal_range instead")
        r = _as_range(obj_range, "obj_range", task)
        lo[:3], hi[:3] = r
    if goal_range is not None:
        if size < 6 or task in _GOAL_NOT_DRAWN:
            raise EnvError(f"{task}: the goal is not drawn at reset (it is fixed or follows the "
                           "object), so there is no goal_range; shift obj_range instead")
        r = _as_range(goal_range, "goal_range", task)
        lo[3:6], hi[3:6] = r
    # Positions outside the arm's reach (and outside the task's own default range) are refused.
    reach_lo = np.minimum(env.mocap_low, np.minimum(d_lo[:3], d_lo[3:6] if size >= 6 else d_lo[:3]))
    reach_hi = np.maximum(env.mocap_high, np.maximum(d_hi[:3], d_hi[3:6] if size >= 6 else d_hi[:3]))
    for name, part in (("obj_range", slice(0, 3)), ("goal_range", slice(3, 6))):
        if part.start >= size:
            continue
        out = (lo[part] < reach_lo - 1e-9) | (hi[part] > reach_hi + 1e-9)
        if out.any():
            k = int(np.flatnonzero(out)[0])
            raise EnvError(f"{task}: {name} {'xyz'[k]} [{lo[part][k]:g}, {hi[part][k]:g}] lies "
                           f"outside the arm's reach [{reach_lo[k]:g}, {reach_hi[k]:g}]")
    _check_distance(task, lo, hi)
    env._random_reset_space = Box(lo, hi, dtype=np.float64)
    # step() clips the goal in observations to goal_space: move it with the part the goal follows
    # (the drawn goal, else the fixture), so an extrapolated goal is observed where it really is.
    g_lo, g_hi = env._skillbank_default_goal
    part = slice(3, 6) if size >= 6 else slice(0, 3)
    shift_lo, shift_hi = lo[part] - d_lo[part], hi[part] - d_hi[part]
    env.goal_space = Box(np.minimum(g_lo, g_lo + shift_lo), np.maximum(g_hi, g_hi + shift_hi),
                         dtype=np.float64)
    env.__dict__.pop("sawyer_observation_space", None)  # a cached_property built from goal_space


def _build(task: str):
    cls = _guarded_class(task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = cls()
    env._partially_observable = False  # the goal is part of the observation
    env._set_task_called = True
    env._freeze_rand_vec = False  # draw fresh positions on every reset ...
    env.seeded_rand_vec = True  # ... from env.np_random, so a seed fixes them
    env._skillbank_default_reset = (env._random_reset_space.low.copy(),
                                    env._random_reset_space.high.copy())
    env._skillbank_default_goal = (env.goal_space.low.copy(), env.goal_space.high.copy())
    return env


def make_env(task: str, obj_range: Range | None = None, goal_range: Range | None = None,
             seed: int = 0):
    """A Meta-World v3 env for `task` that samples fresh positions on every reset, from the given
    object / goal ranges ((lo xyz), (hi xyz)) or the task's defaults. Ranges are validated up
    front: one outside the arm's reach, or one that cannot keep object and goal as far apart as
    the task's reset insists, raises EnvError instead of hanging in reset()."""
    task = check_task(task)
    env = _build(task)
    _configure(env, task, obj_range, goal_range)
    env.seed(int(seed))
    return env


class _EnvPool:
    """Built envs kept for reuse: compiling a task's MuJoCo model costs ~0.3 s (a reset ~25 ms),
    but an env holds 25-35 MB, so at most `max_envs` are kept, least recently used tasks first out."""

    def __init__(self, max_envs: int = 24):
        self.max_envs = max_envs
        self._envs: OrderedDict[str, list] = OrderedDict()

    def get(self, task: str, n: int, obj_range, goal_range) -> list:
        envs = self._envs.pop(task, [])
        while len(envs) < n:
            envs.append(_build(task))
        self._envs[task] = envs
        while len(self._envs) > 1 and sum(map(len, self._envs.values())) > self.max_envs:
            self._envs.popitem(last=False)
        for env in envs[:n]:
            _configure(env, task, obj_range, goal_range)
        return envs[:n]

    def clear(self) -> None:
        for envs in self._envs.values():
            for env in envs:
                env.close()
        self._envs.clear()


_POOL = _EnvPool()


def release_envs() -> None:
    """Drop the envs kept for reuse (a long-lived process evaluating many tasks may want the memory)."""
    _POOL.clear()

_PURPOSE_DEMOS, _PURPOSE_EVAL = 1, 2


def _episode_seed(seed: int, episode: int, purpose: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, episode, purpose]).generate_state(1)[0])


def _reset(env, seed: int, episode: int, purpose: int, max_steps: int) -> np.ndarray:
    env.seed(_episode_seed(seed, episode, purpose))
    env.max_path_length = max_steps
    obs, _ = env.reset()
    return obs


# ----------------------------------------------------------------------------- experts and demos

STATE_NAMES: list[str] = [
    *[f"{p}{n}" for p in ("", "prev_") for n in (
        "hand_x", "hand_y", "hand_z", "gripper",
        *[f"obj{k}_{c}" for k in (1, 2) for c in ("x", "y", "z", "qx", "qy", "qz", "qw")])],
    "goal_x", "goal_y", "goal_z",
]
ACTION_NAMES: list[str] = ["dx", "dy", "dz", "grip"]


def expert_policy(task: str) -> PolicyFn:
    """Meta-World's scripted expert for `task` as a batched policy_fn (the upper bound to compare with)."""
    from metaworld.policies import ENV_POLICY_MAP

    policy = ENV_POLICY_MAP[check_task(task)]()

    def act(obs_batch: np.ndarray, _task: str) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Constant(s) may be too high": the env clips anyway
            return np.stack([policy.get_action(o) for o in np.asarray(obs_batch, dtype=np.float64)])

    return act


def collect_expert_episodes(task: str, n_episodes: int, obj_range: Range | None = None,
                            goal_range: Range | None = None, seed: int = 0, max_steps: int = 200,
                            settle_steps: int = 3, max_attempts: int | None = None
                            ) -> tuple[list[dict], int]:
    """Successful scripted-expert episodes ({"obs", "action", "task"}: task is the instruction),
    and how many attempts they took. An episode stops `settle_steps` after its first success, so
    demos end in the solved state instead of idling to the horizon."""
    task = check_task(task)
    if n_episodes < 1:
        raise EnvError(f"{task}: n_episodes must be at least 1")
    attempts_cap = max_attempts if max_attempts is not None else 2 * n_episodes + 10
    env = _POOL.get(task, 1, obj_range, goal_range)[0]
    act = expert_policy(task)
    episodes: list[dict] = []
    attempt = 0
    while len(episodes) < n_episodes and attempt < attempts_cap:
        obs = _reset(env, seed, attempt, _PURPOSE_DEMOS, max_steps + settle_steps)
        attempt += 1
        obs_list, act_list, success_at = [], [], None
        for t in range(max_steps + settle_steps):
            a = np.clip(act(obs[None], task)[0], -1.0, 1.0).astype(np.float32)
            obs_list.append(obs.astype(np.float32))
            act_list.append(a)
            obs, _r, _term, _trunc, info = env.step(a)
            if success_at is None and info.get("success"):
                success_at = t
            if success_at is not None and t >= success_at + settle_steps:
                break
            if success_at is None and t + 1 >= max_steps:
                break
        if success_at is not None:
            episodes.append({"obs": np.stack(obs_list), "action": np.stack(act_list),
                             "task": INSTRUCTIONS[task]})
    return episodes, attempt


def generate_demos(task: str | Sequence[str], n_episodes: int, out, obj_range: Range | None = None,
                   goal_range: Range | None = None, seed: int = 0, max_steps: int = 200,
                   overwrite: bool = False) -> tuple[Path, int]:
    """Scripted-expert demos of `task` (or n_episodes of each of several tasks) written as a
    LeRobot v3 dataset at `out`; returns (path, successful episodes kept). Failed expert episodes
    are dropped; attempts stop at 2n + 10 per task, so the count can fall short of n_episodes."""
    from skillbank.train.demos import write_demos

    tasks = [task] if isinstance(task, str) else list(task)
    if not tasks:
        raise EnvError("generate_demos: no task given")
    episodes: list[dict] = []
    for k, name in enumerate(tasks):
        eps, attempts = collect_expert_episodes(name, n_episodes, obj_range, goal_range,
                                                seed=seed + 7919 * k, max_steps=max_steps)
        if not eps:
            raise EnvError(f"{name}: the scripted expert solved none of {attempts} episodes "
                           f"within {max_steps} steps; check the ranges")
        episodes.extend(eps)
    path = write_demos(out, episodes, fps=FPS, robot_type="sawyer", state_names=STATE_NAMES,
                       action_names=ACTION_NAMES, overwrite=overwrite)
    return path, len(episodes)


# ----------------------------------------------------------------------------- evaluation

def evaluate(policy_fn: PolicyFn, task: str, episodes: int, seed: int,
             obj_range: Range | None = None, goal_range: Range | None = None,
             max_steps: int = 200, n_envs: int | None = None) -> dict:
    """Success rate of `policy_fn(obs (B, 39), task) -> actions (B, 4)` over `episodes` episodes.

    Up to `n_envs` (default min(episodes, 8)) envs step in lockstep, so a torch policy sees one
    batch per step. An episode succeeds when info["success"] is set at any step within
    `max_steps` (Meta-World's convention) and ends there. NaN actions count as zero motion.
    """
    task = check_task(task)
    if episodes < 1:
        raise EnvError(f"{task}: episodes must be at least 1")
    if max_steps < 1:
        raise EnvError(f"{task}: max_steps must be at least 1")
    n_envs = max(1, min(episodes, n_envs or 8))
    envs = _POOL.get(task, n_envs, obj_range, goal_range)
    t0 = time.perf_counter()
    next_episode = 0
    slots: list[dict | None] = []
    for env in envs:
        slots.append({"env": env, "obs": _reset(env, seed, next_episode, _PURPOSE_EVAL, max_steps),
                      "t": 0})
        next_episode += 1
    successes = steps = 0
    while any(s is not None for s in slots):
        live = [i for i, s in enumerate(slots) if s is not None]
        batch = np.stack([slots[i]["obs"] for i in live]).astype(np.float32)
        actions = np.asarray(policy_fn(batch, task), dtype=np.float64)
        if actions.shape != (len(live), ACTION_DIM):
            raise EnvError(f"{task}: policy returned actions of shape {actions.shape}, "
                           f"expected ({len(live)}, {ACTION_DIM})")
        actions = np.clip(np.nan_to_num(actions, nan=0.0), -1.0, 1.0)
        for a, i in zip(actions, live):
            s = slots[i]
            obs, _r, _term, _trunc, info = s["env"].step(a)
            s["obs"], s["t"] = obs, s["t"] + 1
            steps += 1
            done = bool(info.get("success"))
            successes += done
            if done or s["t"] >= max_steps:
                if next_episode < episodes:
                    s["obs"] = _reset(s["env"], seed, next_episode, _PURPOSE_EVAL, max_steps)
                    s["t"] = 0
                    next_episode += 1
                else:
                    slots[i] = None
    elapsed = time.perf_counter() - t0
    return {"task": task, "seed": int(seed), "success_rate": successes / episodes,
            "successes": int(successes), "episodes": int(episodes), "steps": int(steps),
            "seconds": round(elapsed, 3)}


SPLITS = ("ID", "OOD", "generalist")


@dataclass(frozen=True)
class EvalSplit:
    """One split of a suite: its tasks and the ranges their positions are drawn from.

    ID: the skill's task(s) on the finetuning range; OOD: the same task(s) on a disjoint or
    extrapolated range (`variation` names it); generalist: the pretraining tasks on their full
    default ranges (does the policy still do what it did before the skill?)."""

    name: str
    tasks: tuple[str, ...]
    obj_range: Range | None = None
    goal_range: Range | None = None
    variation: str | None = None
    max_steps: int = 200

    def __post_init__(self):
        if self.name not in SPLITS:
            raise EnvError(f"unknown split '{self.name}'; expected one of {', '.join(SPLITS)}")
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        if not tasks:
            raise EnvError(f"split {self.name} has no tasks")
        object.__setattr__(self, "tasks", tuple(check_task(t) for t in tasks))

    @property
    def label(self) -> str:
        return f"{self.name}:{self.variation}" if self.variation else self.name


# Two-sided 95% Student-t quantiles, df = 1..30.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 1.96 + 2.4 / df  # close to the exact quantile


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0 and at n successes)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% Student-t interval of the mean of per-seed success rates, clipped to [0, 1]."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if v.size < 2:
        return m, m
    half = _t95(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return max(0.0, m - half), min(1.0, m + half)


def evaluate_suite(policy_fn: PolicyFn, suite: Sequence[EvalSplit], episodes: int,
                   seeds: Sequence[int]) -> list[dict]:
    """Evaluate every split on every seed (`episodes` per task and seed).

    success_rate is the mean over seeds of the per-seed rate (itself the mean over the split's
    tasks). ci95 is a Student-t interval over the per-seed rates when there are 2+ seeds - it
    reflects seed-to-seed spread, the variation a re-run would see - and, with a single seed, a
    Wilson interval over the pooled episodes (ci_method says which).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EnvError("evaluate_suite: no seeds given")
    results = []
    for split in suite:
        per_seed, per_task = [], {t: [] for t in split.tasks}
        successes = total = 0
        for seed in seeds:
            rates = []
            for task in split.tasks:
                r = evaluate(policy_fn, task, episodes, seed, split.obj_range, split.goal_range,
                             max_steps=split.max_steps)
                rates.append(r["success_rate"])
                per_task[task].append(r["success_rate"])
                successes += r["successes"]
                total += r["episodes"]
            per_seed.append(float(np.mean(rates)))
        if len(seeds) >= 2:
            lo, hi = t_interval(per_seed)
            method = "t-over-seeds"
        else:
            lo, hi = wilson_interval(successes, total)
            method = "wilson-pooled"
        results.append({
            "split": split.name, "variation": split.variation, "label": split.label,
            "tasks": list(split.tasks), "success_rate": float(np.mean(per_seed)),
            "ci95": [lo, hi], "ci_method": method, "successes": int(successes),
            "episodes": int(total), "seeds": seeds, "per_seed": per_seed,
            "per_task": {t: float(np.mean(v)) for t, v in per_task.items()},
            "obj_range": _plain(split.obj_range), "goal_range": _plain(split.goal_range),
        })
    return results


def _plain(r):
    return None if r is None else [[float(x) for x in r[0]], [float(x) for x in r[1]]]


def parse_suite(spec: str, *, id_obj_range: Range | None = None,
                id_goal_range: Range | None = None,
                pretrain_tasks: Sequence[str] | None = None) -> list[EvalSplit]:
    """Splits from a suite string: `metaworld:TASK[,TASK...][?ood=VAR,...&generalist=...]`.

    ID: the task(s) on the finetuning range (id_obj_range / id_goal_range; task defaults if None).
    OOD: one split per named variation in OOD_VARIATIONS (all of the task's, or those listed in
    `ood=`; `ood=none` for none). generalist: `pretrain_tasks` (default MT10) minus the ID tasks,
    on their default ranges; `generalist=mt10|none|task+task`.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise EnvError(f"eval suite {spec!r} is not of the form metaworld:TASK")
    kind, _, rest = spec.partition(":")
    if kind.strip().lower() != "metaworld":
        raise EnvError(f"unknown eval suite '{kind}': only metaworld:TASK is supported")
    body, _, query = rest.partition("?")
    tasks = [check_task(t.strip()) for t in body.split(",") if t.strip()]
    if not tasks:
        raise EnvError(f"eval suite {spec!r} names no task")
    try:
        opts = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True, strict_parsing=bool(query)).items()}
    except ValueError:
        raise EnvError(f"eval suite {spec!r}: cannot parse options '{query}'") from None
    unknown = set(opts) - {"ood", "generalist"}
    if unknown:
        raise EnvError(f"eval suite {spec!r}: unknown option '{sorted(unknown)[0]}' "
                       "(expected ood= or generalist=)")

    splits = [EvalSplit("ID", tuple(tasks), id_obj_range, id_goal_range)]
    wanted = opts.get("ood")
    names = None if wanted is None else [v for v in re.split(r"[+,\s]+", wanted) if v]
    if names == ["none"]:
        names = []
    for task in tasks:
        variations = OOD_VARIATIONS.get(task, {})
        if names is not None:
            missing = [v for v in names if v not in variations]
            if missing and len(tasks) == 1:
                known = ", ".join(variations) or "none"
                raise EnvError(f"{task}: no OOD variation '{missing[0]}' (known: {known})")
        for var, (obj_r, goal_r) in variations.items():
            if names is None or var in names:
                splits.append(EvalSplit("OOD", (task,), obj_r, goal_r, variation=var))

    gen = opts.get("generalist")
    if gen is None:
        pool = list(pretrain_tasks) if pretrain_tasks is not None else list(MT10)
    elif gen.strip().lower() == "none":
        pool = []
    elif gen.strip().lower() == "mt10":
        pool = list(MT10)
    else:
        pool = [t for t in re.split(r"[+,\s]+", gen) if t]  # parse_qs decodes '+' to ' '
    pool = [check_task(t) for t in pool if t not in tasks]
    if pool:
        splits.append(EvalSplit("generalist", tuple(pool)))
    return splits


__all__ = [
    "EnvError", "INSTRUCTIONS", "TASK_BY_INSTRUCTION", "MT10", "MIN_XY_DISTANCE", "OOD_VARIATIONS",
    "STATE_NAMES", "ACTION_NAMES", "FPS", "EvalSplit", "make_env", "expert_policy",
    "collect_expert_episodes", "generate_demos", "evaluate", "evaluate_suite", "parse_suite",
    "wilson_interval", "t_interval", "check_task", "instruction", "release_envs",
]
