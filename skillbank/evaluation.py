"""Evaluate a checkpoint directory of the reference policy on a Meta-World suite."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from skillbank.envs.metaworld import EvalSplit, evaluate_suite, instruction, parse_suite


def policy_fn(checkpoint_dir: str | Path):
    """A batched `policy_fn(obs, task)` for the reference policy saved in `checkpoint_dir`."""
    from skillbank.policies.reference import RefPolicy

    policy = RefPolicy.from_pretrained(checkpoint_dir)
    return lambda obs, task: policy.act(obs, instruction(task))


def evaluate_checkpoint(checkpoint_dir: str | Path, suite: str | Sequence[EvalSplit], episodes: int,
                        seeds: Sequence[int]) -> list[dict]:
    splits = parse_suite(suite) if isinstance(suite, str) else list(suite)
    return evaluate_suite(policy_fn(checkpoint_dir), splits, episodes, seeds)
