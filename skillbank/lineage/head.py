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

from skillbank.errors import SkillbankError
from skillbank.tensors.writer import no_follow, write_text_atomic


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
    except (OSError, ValueError) as e:
        raise SkillbankError(f"{root / 'HEAD'} is unreadable ({e}); delete it to put HEAD back on main") from None
    branch, version = (data.get("branch"), data.get("version")) if isinstance(data, dict) else (None, None)
    if not ((isinstance(branch, str) and branch and version is None)
            or (branch is None and type(version) is int and version >= 0)):
        raise SkillbankError(f"{root / 'HEAD'} names neither a branch nor a version; "
                             "delete it to put HEAD back on main")
    return Head(branch=branch, version=version)


def write_head(root: Path, head: Head, reason: str) -> None:
    """Log the move, then make it. In that order a failure (a full disk) leaves at worst a logged
    move that did not happen, never a HEAD that moved under a command that reported an error."""
    try:
        old = read_head(root).__dict__
    except SkillbankError:
        old = None  # a damaged HEAD is being replaced
    (root / "logs").mkdir(exist_ok=True)
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": reason,
             "from": old, "to": head.__dict__}
    with open(root / "logs" / "HEAD", "a", opener=no_follow) as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    write_text_atomic(root / "HEAD", json.dumps({"branch": head.branch, "version": head.version}) + "\n")
