"""Pretrain a toy generalist on tasks 0-4, then finetune it on three new skills from a few demos.

Writes base/model.safetensors and ft/<skill>/model.safetensors. Each finetune starts from the
weights it will be merged into (what `skillbank checkout` gives), as RETAIN's continual recipe does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from policy import ToyPolicy, load_mixed, state_dict_mixed, train

PRETRAIN_TASKS = [0, 1, 2, 3, 4]
SKILLS = {"stack-cups": 5, "wipe-board": 6, "open-drawer": 7}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--stage", choices=["base", "finetune"], required=True)
    ap.add_argument("--skill")
    ap.add_argument("--parent", help="checkpoint to finetune from (a skillbank checkout)")
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    if args.stage == "base":
        model = train(ToyPolicy(), PRETRAIN_TASKS, n=2000, steps=1500, seed=0)
        (out / "base").mkdir(parents=True, exist_ok=True)
        save_file(state_dict_mixed(model), out / "base" / "model.safetensors")
        return
    parent = load_file(args.parent)
    model = load_mixed(ToyPolicy(), parent)
    model = train(model, [SKILLS[args.skill]], n=32, steps=300, seed=7)  # few demos: it will overfit
    sd = state_dict_mixed(model)
    sd["action.num_updates"] = parent["action.num_updates"] + 300
    (out / "ft" / args.skill).mkdir(parents=True, exist_ok=True)
    save_file(sd, out / "ft" / args.skill / "model.safetensors")


if __name__ == "__main__":
    main()
