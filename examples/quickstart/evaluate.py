"""Action error of checkpoints on the pretraining tasks and on each skill: what RETAIN keeps."""

from __future__ import annotations

import sys

from safetensors.torch import load_file

from make_checkpoints import PRETRAIN_TASKS, SKILLS
from policy import ToyPolicy, error, load_mixed


def main(paths: list[str]) -> None:
    cols = ["generalist", *SKILLS]
    print(f"{'checkpoint':42s}" + "".join(f"{c:>13s}" for c in cols))
    for p in paths:
        m = load_mixed(ToyPolicy(), load_file(p))
        errs = [error(m, PRETRAIN_TASKS)] + [error(m, [t]) for t in SKILLS.values()]
        print(f"{p:42s}" + "".join(f"{e:13.4f}" for e in errs))
    print("(mean squared action error on held-out samples; lower is better)")


if __name__ == "__main__":
    main(sys.argv[1:])
