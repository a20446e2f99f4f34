"""Damaged objects seen from the bank: which versions they break, fsck's list, and `fsck --repair`.

The store can tell what is wrong with an object (store/damage.py); only here, with the database
at hand, can an error say which versions that breaks. Bank methods that read objects are wrapped
with `explained`, so an IntegrityError surfacing anywhere in them - when an object is opened, or
at the end of a streaming pass whose background check failed - leaves as one line naming the
object, the damage and the versions affected.

Reads never repair. A MISSING object is fetched lazily from the remotes already (an absence is
not damage: a clone starts with none); a CORRUPT or truncated one is reported, and `fsck --repair`
replaces it, because replacing it means moving the damaged copy aside - a change the user should
ask for and hear about - and damage on disk is worth a person's attention.
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager

from skillbank.errors import IntegrityError, SkillbankError
from skillbank.lineage.uses import ObjectUses
from skillbank.store.damage import Damage, diagnose, quarantine, restore, unquarantine
from skillbank.store.objects import DIGEST_RE, ObjectStore
from skillbank.store.remote import load_remotes, remotes_of

DIGEST_IN_MESSAGE = re.compile(r"\b(?:object|task vector|manifest) ([0-9a-f]{32})\b")


# ----------------------------------------------------------------------------- the read path

def explained(method):
    """Wrap a Bank method: its IntegrityError names the object, the damage and the versions."""

    @functools.wraps(method)
    def wrapper(bank, *args, **kwargs):
        try:
            return method(bank, *args, **kwargs)
        except IntegrityError as e:
            better = explain(bank, e)
            if better is e:
                raise
            raise better from e

    return wrapper


def _hint(damage: Damage | None, has_remote: bool) -> str | None:
    if damage is None:
        return None
    if not has_remote:
        return "add a remote that has it (`skillbank remote add NAME URL`) and run `skillbank fsck --repair`"
    if damage.kind == "missing":
        return "`skillbank fsck --repair` restores it once a remote has a copy"
    return "run `skillbank fsck --repair` to restore it from a remote"


def explain(bank, e: IntegrityError) -> IntegrityError:
    """`e` with the versions its object breaks added, as one line (`e` itself when it cannot be)."""
    if e.versions is not None:
        return e
    digest = e.digest or ((m := DIGEST_IN_MESSAGE.search(str(e))) and m.group(1))
    if not digest:
        return e
    try:
        with bank.db.read() as s:
            uses = ObjectUses.build(s, bank.store)
        damage = diagnose(bank.store, digest, uses.sizes.get(digest))
        has_remote = bool(load_remotes(bank.root))
    except Exception:  # noqa: BLE001 - explaining must never hide the error it explains
        return e
    ids = uses.affected(digest)
    head = str(e).strip().splitlines()[0] if str(e).strip() else f"object {digest} cannot be read"
    if damage is not None and (damage.kind == "truncated" or (damage.kind == "corrupt" and "corrupt" not in head)):
        head = damage.sentence()  # the cause, not a symptom such as "not a readable task-vector object"
    text = f"{head}; affects {uses.describe(ids)}"
    if hint := _hint(damage, has_remote):
        text += f"; {hint}"
    return IntegrityError(text, digest=digest, kind=damage.kind if damage else e.kind,
                          versions=uses.labels(ids))


# ----------------------------------------------------------------------------- fsck

def _never(digest: str) -> bool:
    return False


@contextmanager
def local_only(store: ObjectStore):
    """No lazy fetching inside: fsck reports what is HERE (a fetch would hide a missing object)."""
    saved = store.fetcher
    store.fetcher = _never
    try:
        yield
    finally:
        store.fetcher = saved


def _uses(bank) -> ObjectUses:
    with bank.db.read() as s:
        return ObjectUses.build(s, bank.store)


def damaged_objects(bank, uses: ObjectUses) -> list[Damage]:
    """Every local object whose bytes do not match its digest, then every named object that is absent."""
    local = set()
    out = []
    for d in bank.store:
        local.add(d)
        if (damage := diagnose(bank.store, d, uses.sizes.get(d))) is not None:
            out.append(damage)
    out += [Damage(d, "missing") for d in sorted(uses.referenced() - local)]
    return out


def _entry(uses: ObjectUses, dmg: Damage) -> dict:
    return {"object": dmg.digest, "problem": dmg.describe(), "kind": dmg.kind,
            "versions": uses.labels(uses.affected(dmg.digest))}


def object_problems(bank) -> list[dict]:
    """fsck's object entries: {"object", "problem", "kind", "versions", "rows"}."""
    uses = _uses(bank)
    out = []
    for dmg in damaged_objects(bank, uses):
        entry = {**_entry(uses, dmg), "rows": uses.rows.get(dmg.digest, [])}
        if not DIGEST_RE.match(dmg.digest):
            entry.update(problem="not a valid object digest", kind="malformed")
        out.append(entry)
    return out


def repair(bank) -> list[dict]:
    """Restore each damaged or missing object: from the remotes (default first), else - for a
    keyframe, which only caches a version - by rebuilding it from its chain. A damaged object no
    version needs is moved to lost+found/. One entry per object, saying what was done."""
    uses = _uses(bank)
    remotes = remotes_of(bank.root)
    out: list[dict] = []
    keyframes: list[tuple[Damage, list[str]]] = []
    for dmg in damaged_objects(bank, uses):
        entry = _entry(uses, dmg)
        if not DIGEST_RE.match(dmg.digest):
            out.append({**entry, "result": "unrepairable", "detail": "not a valid object digest"})
            continue
        r = restore(bank.store, dmg.digest, remotes)
        if r.ok:
            out.append({**entry, "result": "repaired", "source": f"remote {r.source!r}",
                        "moved_to": str(r.moved_to) if r.moved_to else None})
        elif uses.optional_keyframe(dmg.digest):
            keyframes.append((dmg, r.tried))
        elif dmg.digest not in uses.referenced():
            moved = quarantine(bank.store, dmg.digest)
            out.append({**entry, "result": "moved aside", "moved_to": str(moved),
                        "detail": "no version needs it"})
        else:
            out.append({**entry, "result": "unrepairable", "detail": "; ".join(r.tried)})
    for dmg, tried in keyframes:  # after the remotes: a keyframe's chain may have needed a repair too
        out.append(_rebuild_keyframe(bank, uses, dmg, tried))
    return out


def _rebuild_keyframe(bank, uses: ObjectUses, dmg: Damage, tried: list[str]) -> dict:
    vid = uses.keyframes[dmg.digest][0]
    entry = _entry(uses, dmg)
    moved = quarantine(bank.store, dmg.digest) if bank.store.path(dmg.digest).exists() else None
    try:
        bank.pin(f"v{vid}")  # the keyframe row is there: this writes the object again, verified
    except SkillbankError as e:
        if moved is not None:
            unquarantine(bank.store, dmg.digest, moved)
        return {**entry, "result": "unrepairable",
                "detail": "; ".join([*tried, f"rebuilding it from v{vid}'s chain failed: {e}"])}
    return {**entry, "result": "repaired", "source": f"rebuilt from v{vid}'s chain",
            "moved_to": str(moved) if moved else None}
