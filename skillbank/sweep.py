"""Choosing alpha the way the RETAIN paper did: sweep it, and keep the best on an OOD split.

Each candidate merge is streamed to a scratch directory (nothing is recorded in the bank),
evaluated on every split, and the alpha with the highest OOD validation success wins (ties go to
the higher generalist success, then the smaller alpha: closer to the parent). The sweep is kept
as a plot: ID / OOD / generalist success against alpha.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from skillbank.envs.metaworld import EvalSplit
from skillbank.evaluation import evaluate_checkpoint
from skillbank.merge.engine import Options, merge_checkpoints
from skillbank.tensors import CheckpointWriter, TensorSpec, open_checkpoint

DEFAULT_GRID = (0.25, 0.5, 0.75, 1.0)


def candidate_alphas(value: float, group: str | None) -> dict[str, float]:
    """One alpha for every group, or `group` swept with the others kept at 1 (the paper's per-modality study)."""
    return {"*": value} if group is None else {"vision": 1.0, "language": 1.0, "action": 1.0, "other": 1.0,
                                               group: value}


def sweep(parent_dir: Path, finetuned_dir: Path, groups: dict[str, str | None], splits: Sequence[EvalSplit],
          episodes: int, seeds: Sequence[int], work_dir: Path, grid: Sequence[float] = DEFAULT_GRID,
          group: str | None = None, options: Options = Options()) -> list[dict]:
    points = []
    with open_checkpoint(parent_dir) as parent, open_checkpoint(finetuned_dir) as ft:
        specs = [TensorSpec(i.name, i.dtype, i.shape) for i in parent]
        for alpha in grid:
            out = work_dir / f"alpha-{alpha:g}"
            writer = CheckpointWriter(out, specs)
            try:
                merge_checkpoints(parent, ft, "retain", candidate_alphas(alpha, group), groups, writer, options)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
            if (parent_dir / "config.json").is_file():
                shutil.copyfile(parent_dir / "config.json", out / "config.json")
            results = evaluate_checkpoint(out, splits, episodes, seeds)
            points.append({"alpha": alpha, "results": {r["label"]: r for r in results}})
            shutil.rmtree(out, ignore_errors=True)
    return points


def _rate(point: dict, split: str) -> float:
    rates = [r["success_rate"] for label, r in point["results"].items() if label.split(":")[0] == split]
    return sum(rates) / len(rates) if rates else 0.0


def choose(points: list[dict], split: str = "OOD") -> float:
    best = max(points, key=lambda p: (_rate(p, split), _rate(p, "generalist"), -p["alpha"]))
    return best["alpha"]


def plot(points: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [p["alpha"] for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for split, style in (("ID", "o-"), ("OOD", "s-"), ("generalist", "^-")):
        if any(label.split(":")[0] == split for p in points for label in p["results"]):
            ax.plot(alphas, [_rate(p, split) for p in points], style, label=split)
    ax.set_xlabel("alpha (weight of the finetuned model)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
