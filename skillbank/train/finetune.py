"""From a parent checkout and some demos to a finetuned checkout, with the built-in trainer or
any external command.

What comes out is exactly what ``add-skill --finetuned`` takes: a directory with safetensors
whose tensors, shapes and dtypes are the parent's, so the task vector is well defined.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import torch

from skillbank.errors import SkillbankError
from skillbank.policies.reference import PICKLE_SUFFIXES, RefPolicy, RefPolicyConfig
from skillbank.train.trainer import ProgressFn, TrainSettings, train_bc

TRAINER_NAME = "skillbank-bc"
_PLACEHOLDER = re.compile(r"\{(parent|out|demos)\}")


def _demos(demos):
    """A DemoSet as given, or read from a path (imported late: demos.py is its own module)."""
    if isinstance(demos, (str, Path)):
        from skillbank.train.demos import read_demos
        return read_demos(demos)
    return demos


def _summary(demos) -> dict:
    return {"root": str(demos.root), "frames": int(len(demos.obs)),
            "episodes": int(len(set(demos.episode_index.tolist()))),
            "tasks": {str(k): v for k, v in sorted(demos.tasks.items())}}


def finetune(parent_dir: Path, demos, out_dir: Path, settings: TrainSettings,
             progress: ProgressFn | bool | None = None) -> dict:
    """Finetune the reference policy in ``parent_dir`` on ``demos`` (a path or a DemoSet) and
    write ``out_dir/model.safetensors`` + ``config.json``.

    Returns ``{"trainer", "settings", "metrics", "demos"}``, JSON-able, for the skill's lineage.
    The parent's normalisation statistics are kept (the RETAIN recipe).
    """
    policy = RefPolicy.from_pretrained(parent_dir)
    if not policy.config.has_stats:
        raise SkillbankError(f"{parent_dir}: its config.json has no normalisation statistics; "
                             "finetuning must reuse the pretraining ones")
    demo_set = _demos(demos)
    co = _demos(settings.cofinetune) if settings.cofinetune else None
    out = Path(out_dir)
    ckpt = out / "checkpoints" if settings.checkpoint_every else None
    metrics = train_bc(policy, demo_set, settings, cofinetune=co, progress=progress, checkpoint_dir=ckpt)
    policy.save_pretrained(out)
    return {"trainer": TRAINER_NAME, "settings": settings.to_dict(), "metrics": metrics,
            "demos": _summary(demo_set)}


def pretrain(demos, out_dir: Path, config: RefPolicyConfig | None = None, settings: TrainSettings | None = None,
             progress: ProgressFn | bool | None = None) -> dict:
    """Train a base generalist from scratch; its normalisation statistics come from ``demos``."""
    settings = settings or TrainSettings()
    demo_set = _demos(demos)
    config = dataclasses.replace(config or RefPolicyConfig(), obs_mean=None, obs_std=None,
                                 action_min=None, action_max=None)
    torch.manual_seed(settings.seed)  # the initial weights: same settings, same base bit for bit
    policy = RefPolicy(config)
    out = Path(out_dir)
    ckpt = out / "checkpoints" if settings.checkpoint_every else None
    metrics = train_bc(policy, demo_set, settings, progress=progress, checkpoint_dir=ckpt)
    policy.save_pretrained(out)
    return {"trainer": TRAINER_NAME, "settings": settings.to_dict(), "metrics": metrics,
            "config": policy.config.to_dict(), "demos": _summary(demo_set)}


# ----------------------------------------------------------------------------- external trainers

def run_train_cmd(cmd: str, parent_dir: Path, out_dir: Path, demos: Path, *, echo: bool = True) -> Path:
    """Run a user's trainer, e.g. ``lerobot-train --policy.path={parent} --output_dir={out} ...``.

    The command is split with shlex and run without a shell; ``{parent}``, ``{out}`` and
    ``{demos}`` are replaced inside each argument, so paths with spaces stay one argument and no
    other braces are touched. Its output goes to our stderr (stdout stays clean for ``--json``).
    Returns the weights to register: ``out/model.safetensors``, or ``out`` when it is sharded.
    """
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        raise SkillbankError(f"cannot parse the trainer command: {exc}") from None
    if not argv:
        raise SkillbankError("the trainer command is empty")
    values = {"parent": str(parent_dir), "out": str(out_dir), "demos": str(demos)}
    # One pass, so a path that happens to contain "{out}" is not substituted again.
    argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in argv]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as exc:
        raise SkillbankError(f"cannot run trainer {argv[0]!r}: {exc.strerror or exc}") from None
    tail: collections.deque[str] = collections.deque(maxlen=1)

    def pump(stream, keep: bool) -> None:
        for line in stream:
            if echo:
                sys.stderr.write(line)
            if keep and line.strip():
                tail.append(line.strip())

    threads = [threading.Thread(target=pump, args=(proc.stdout, False), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, True), daemon=True)]
    for t in threads:
        t.start()
    try:
        rc = proc.wait()
    except BaseException:  # Ctrl-C: do not leave the trainer running behind us
        proc.kill()
        proc.wait()
        raise
    for t in threads:
        t.join()
    if rc != 0:
        last = tail[0] if tail else "no output on stderr"
        raise SkillbankError(f"trainer command failed (exit {rc}): {last}")
    return _trained_weights(out)


def _trained_weights(out: Path) -> Path:
    if (out / "model.safetensors").is_file():
        return out / "model.safetensors"
    if (out / "model.safetensors.index.json").is_file():
        return out
    found = sorted(out.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if found:
        raise SkillbankError(f"trainer wrote {len(found)} safetensors files to {out} but no "
                             "model.safetensors.index.json to join them")
    if any(p.suffix in PICKLE_SUFFIXES for p in out.iterdir()):
        raise SkillbankError(f"trainer wrote only pickle weights to {out}; skillbank takes safetensors only")
    raise SkillbankError(f"trainer finished but wrote no safetensors to {out}")
