"""Behaviour cloning for the reference policy, small enough to read in one sitting.

One step: draw a batch of (obs, instruction, action) frames, predict the normalised action, take
the MSE, step AdamW. With co-finetuning, a fixed share (``mix``) of every batch comes from the
pretraining demos, so the policy keeps seeing what it already knew (RETAIN's co-FT variant).

Normalisation statistics are computed from the demos only when the policy has none (pretraining);
a finetune reuses its parent's, as the RETAIN paper did, so parent and child read observations
the same way and their weights stay comparable for the merge.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from skillbank.errors import SkillbankError
from skillbank.policies.reference import RefPolicy

if TYPE_CHECKING:
    from skillbank.train.demos import DemoSet

# progress(step, total_steps, {"loss": ..., "lr": ...}) after every step.
ProgressFn = Callable[[int, int, dict], None]


@dataclass
class TrainSettings:
    """Every knob of a run. Stored with the skill's lineage, so it must stay JSON-able."""

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # or "constant"
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    cofinetune: str | None = None  # demos of the pretraining data to mix in, or None
    mix: float = 0.5  # share of each batch drawn from the co-finetune demos
    log_every: int = 100
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    device: str = "cpu"
    # CPU threads for the run (0: torch's default). Measured on 2 cores: one thread trains the
    # default policy at least as fast as two, and two collapse to a few thousand samples/s as soon
    # as anything else runs (OpenMP threads waiting on each other), hence 1.
    threads: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise SkillbankError("training needs steps >= 1 and batch_size >= 1")
        if not 0.0 <= self.mix <= 1.0:
            raise SkillbankError(f"mix {self.mix} is not in [0, 1]")
        if self.schedule not in ("cosine", "constant"):
            raise SkillbankError(f"unknown lr schedule {self.schedule!r} (cosine or constant)")
        if self.lr <= 0 or self.weight_decay < 0:
            raise SkillbankError("lr must be > 0 and weight_decay >= 0")
        if self.threads < 0:
            raise SkillbankError("threads must be >= 0 (0: torch's default)")
        if self.cofinetune is not None:
            self.cofinetune = str(self.cofinetune)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SkillbankError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**data)


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup, then constant or cosine decay to a tenth of the peak."""
    warmup = min(s.warmup_steps, s.steps // 10)
    if step < warmup:
        return s.lr * (step + 1) / warmup
    if s.schedule == "constant":
        return s.lr
    progress = (step - warmup) / max(1, s.steps - warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class _Frames:
    """One demo set as tensors on the device, normalised once, with an embedding per task."""

    def __init__(self, policy: RefPolicy, demos: DemoSet, device: torch.device):
        cfg = policy.config
        obs, action = np.asarray(demos.obs), np.asarray(demos.action)
        if obs.ndim != 2 or obs.shape[1] != cfg.obs_dim:
            raise SkillbankError(f"{demos.root}: observations are {obs.shape[1:]}-d, the policy expects {cfg.obs_dim}")
        if action.ndim != 2 or action.shape[1] != cfg.action_dim:
            raise SkillbankError(f"{demos.root}: actions are {action.shape[1:]}-d, the policy expects {cfg.action_dim}")
        if len(obs) == 0:
            raise SkillbankError(f"{demos.root}: no frames to train on")
        task_index = np.asarray(demos.task_index, dtype=np.int64)
        missing = sorted(set(np.unique(task_index).tolist()) - set(demos.tasks))
        if missing:
            raise SkillbankError(f"{demos.root}: frames refer to task index {missing[0]}, which has no instruction")
        ids = sorted(demos.tasks)
        row_of = np.full(max(ids) + 1, -1, dtype=np.int64)
        row_of[ids] = np.arange(len(ids))
        self.n = len(obs)
        self.obs = torch.from_numpy(policy.normalize_obs(obs)).to(device)
        # Targets outside the pretraining range are clipped: tanh cannot reach them anyway.
        self.action = torch.from_numpy(np.clip(policy.normalize_action(action), -1.0, 1.0)).to(device)
        self.row = torch.from_numpy(row_of[task_index]).to(device)
        self.lang = policy.embed_instructions([demos.tasks[i] for i in ids]).to(device)

    def sample(self, k: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(self.n, (k,), generator=gen).to(self.obs.device)
        return self.obs[idx], self.lang[self.row[idx]], self.action[idx]


def _param_groups(policy: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; decaying biases and norms just fights the fit."""
    decay = [p for p in policy.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in policy.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_bc(policy: RefPolicy, demos: DemoSet, settings: TrainSettings, cofinetune: DemoSet | None = None,
             progress: ProgressFn | bool | None = None, checkpoint_dir: str | Path | None = None) -> dict:
    """Train ``policy`` in place; return JSON-able metrics.

    ``progress``: a callable, False for silence, or None / True for a bar when stderr is a TTY.
    ``checkpoint_dir``: where ``settings.checkpoint_every`` writes ``step-NNNNNN/`` checkpoints.
    """
    s = settings
    if not policy.config.has_stats:
        # Pretraining: the statistics come from these demos and are then frozen for every
        # descendant (mixing in co-finetune data here would make them depend on the mix).
        policy.config = policy.config.with_stats(demos.obs, demos.action)
        normalisation = "computed"
    else:
        normalisation = "reused"
    device = torch.device(s.device)
    policy.to(device).train()
    # All randomness of the loop is the batch draws (no dropout), from a CPU generator so that a
    # seed gives the same batches on every device. The initial weights are the caller's.
    gen = torch.Generator().manual_seed(s.seed)

    own = _Frames(policy, demos, device)
    co = _Frames(policy, cofinetune, device) if cofinetune is not None and s.mix > 0 else None
    n_co = round(s.mix * s.batch_size) if co is not None else 0
    n_own = s.batch_size - n_co

    opt = torch.optim.AdamW(_param_groups(policy, s.weight_decay), lr=s.lr, betas=(0.9, 0.95))
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    report, close = _progress(progress, s.steps)
    history: list[dict] = []
    window: list[float] = []
    drawn = {"demos": 0, "cofinetune": 0}
    start = time.perf_counter()
    try:
        for step in range(s.steps):
            lr = lr_at(step, s)
            for group in opt.param_groups:
                group["lr"] = lr
            parts = [own.sample(n_own, gen)] if n_own else []
            if n_co:
                parts.append(co.sample(n_co, gen))
            obs, lang, target = (torch.cat(t) for t in zip(*parts))
            drawn["demos"] += n_own
            drawn["cofinetune"] += n_co

            loss = torch.nn.functional.mse_loss(policy(obs, lang), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), s.grad_clip)
            opt.step()

            value = loss.item()
            if not math.isfinite(value):
                raise SkillbankError(f"training diverged at step {step} (loss {value}); try a lower lr")
            window.append(value)
            if (step + 1) % max(1, s.log_every) == 0 or step + 1 == s.steps:
                history.append({"step": step + 1, "loss": float(np.mean(window)), "lr": lr})
                window = []
            report(step + 1, {"loss": value, "lr": lr})
            if checkpoint_dir is not None and s.checkpoint_every and (step + 1) % s.checkpoint_every == 0:
                policy.save_pretrained(Path(checkpoint_dir) / f"step-{step + 1:06d}")
    finally:
        close()
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    policy.eval()
    samples = s.steps * s.batch_size
    return {
        "steps": s.steps,
        "samples": samples,
        "samples_demos": drawn["demos"],
        "samples_cofinetune": drawn["cofinetune"],
        "frames": own.n,
        "cofinetune_frames": co.n if co is not None else 0,
        "loss_first": history[0]["loss"],
        "loss_final": history[-1]["loss"],
        "history": history,
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(samples / max(elapsed, 1e-9), 1),
        "normalisation": normalisation,
        "device": str(device),
        "threads": s.threads or threads,
    }


def _progress(progress: ProgressFn | bool | None, total: int) -> tuple[Callable[[int, dict], None], Callable[[], None]]:
    """(report, close): the caller's callback, a rich bar on an interactive stderr, or nothing."""
    if callable(progress):
        return (lambda step, m: progress(step, total, m)), (lambda: None)
    if progress is False or not sys.stderr.isatty():  # None / True: a bar, but never into a log file
        return (lambda step, m: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("train", total=total, loss="-")
    bar.start()
    return (lambda step, m: bar.update(task, completed=step, loss=f"{m['loss']:.4f}")), bar.stop
