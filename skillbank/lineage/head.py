"""HEAD lives in the bank directory, not the database: each checkout of a shared bank has its own.

As in git, HEAD is either attached to a branch (the next add-skill advances the branch) or
detached at a version. Every move is appended to logs/HEAD.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from skillbank.tensors.writer import write_text_atomic


@dataclass(frozen=True)
class Head:
    branch: str | None = None
    version: int | None = None

    def describe(self) -> str:
        return f"branch {self.branch!r}" if self.branch else f"v{self.version} (detached)"


def read_head(root: Path) -> Head:
    try:
        data = json.loads((root / "HEAD").read_text())
    except FileNotFoundError:
        return Head(branch="main")
    return Head(branch=data.get("branch"), version=data.get("version"))


def write_head(root: Path, head: Head, reason: str) -> None:
    old = read_head(root)
    write_text_atomic(root / "HEAD", json.dumps({"branch": head.branch, "version": head.version}) + "\n")
    (root / "logs").mkdir(exist_ok=True)
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": reason,
             "from": old.__dict__, "to": head.__dict__}
    with open(root / "logs" / "HEAD", "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
