"""The bank directory's own files, read as untrusted input.

A bank directory can be copied, unpacked from an archive or edited by hand. Nothing in it may
make skillbank create or change files elsewhere without the user saying so on the command line:

- bank.json must be a JSON object naming the bank. The database it names (or `--db` names) may
  live anywhere (a shared PostgreSQL, a SQLite file a clone points at), but a SQLite file must
  already exist: only `init` creates one, so a typo or a tampered path never creates a file.
- objects/ itself may be a link (a store on another disk is the owner's choice), but its fan-out
  directories may not: add-skill writes into them and gc deletes from them, so a link planted
  there would make skillbank write or delete outside the bank.
"""

from __future__ import annotations

import json
from pathlib import Path

from skillbank.errors import SkillbankError, show

BANK_FILE = "bank.json"


def read_bank_file(root: Path) -> dict:
    """bank.json as a dict with a string `bank_id` (and, if present, a string `db_url`)."""
    marker = root / BANK_FILE
    if not marker.is_file():
        raise SkillbankError(f"no bank at {root} (create one with `skillbank init --base PATH`)")
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise SkillbankError(f"{marker} is damaged ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("bank_id"), str):
        raise SkillbankError(f"{marker} is damaged (expected a JSON object with a bank_id)")
    if not isinstance(info.get("db_url", ""), str):
        raise SkillbankError(f"{marker} is damaged (db_url {show(info['db_url'])} is not a URL)")
    return info


def check_sqlite_exists(url: str) -> None:
    """Refuse a SQLite URL whose file does not exist, before anything connects (and creates it)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # a malformed URL is reported by the engine, in one line
        return
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    if parsed.database.startswith("file:") or path.is_file():
        return
    raise SkillbankError(f"no SQLite database at {path}: skillbank creates one only at `init` "
                         "(check --db, $SKILLBANK_DB_URL or db_url in bank.json)")


def check_store_layout(root: Path) -> None:
    """No fan-out directory of the object store is a symbolic link."""
    objects = root / "objects"
    if not objects.is_dir():
        return
    for fan in objects.iterdir():
        if fan.is_symlink():
            raise SkillbankError(f"{fan} is a symbolic link (to {fan.readlink()}): the store writes and "
                                 "deletes objects there; link the whole objects/ directory instead")
