"""Crash-injection harness: kill or fail `add-skill`, `checkout`, `gc` and `db upgrade` mid-write,
then check what a user would find.

For each command, a dry run on a prepared bank counts its write-path events (faultinject.py) and
gives the reference outcome. Then, each time on a fresh copy of that bank, the command is

  - killed with SIGKILL just before write event k (every k when the budget allows, a sample
    otherwise, always including the COMMIT) and just after the last one,
  - killed by the harness after a random delay inside the command's write window,
  - failed with ENOSPC (the disk then stays full) or with EIO at event k.

and the harness checks, from a fresh process's point of view:

  - a kill exits by SIGKILL (-9); a fault exits 1 with one `error: ...` line and no traceback,
    and leaves the bank as it was: same rows and refs, same HEAD, no temp or .partial file left;
  - `fsck` is clean; every version that `log` shows on any branch checks out to its digest;
  - nothing half-written is visible: only whole objects under objects/, each file of a checkout
    directory under its final name is the old or the new one, never a mix; the rows are the old
    or the new ones, never part of them;
  - re-running the same command succeeds (an add-skill whose COMMIT landed is refused with one
    line instead, because `--from` pins its parent: re-running it never adds a second copy);
  - stale files under tmp/ are garbage `gc` removes once they are older than its grace period.

    python stress/crash_harness.py --injections 40 --seed 1 [--db-url URL] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import create_engine, inspect, make_url, text

from skillbank.api import Bank
from skillbank.errors import SchemaError, SkillbankError
from skillbank.lineage.audit import checkpoint_digest
from skillbank.store.objects import DIGEST_RE
from skillbank.tensors import open_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faultinject import FULL_DISK_KINDS  # a sibling script, not a package module

FAULTINJECT = Path(__file__).resolve().with_name("faultinject.py")
EIO_KINDS = {"write", "fsync", "rename", "unlink", "sql", "commit"}
OLD_SCHEMA = "0001"  # `db upgrade` is interrupted on its way from here to head
STALE_AGE = 7200.0  # seconds: older than gc's grace period


# ----------------------------------------------------------------------------- running commands

@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    events: list
    fired: list | None
    elapsed: float


class Launcher:
    """Runs skillbank under a fault plan: forked from a warm zygote (fast), or spawned fresh."""

    def __init__(self, spawn: bool, work: Path):
        self.spawn, self.work = spawn, work
        self.env = {k: v for k, v in os.environ.items() if k not in ("SKILLBANK_BANK", "SKILLBANK_DB_URL")}
        self.env["SKILLBANK_AUTHOR"] = "crash-harness"
        self._n = 0
        self._zygote = None
        if not spawn:
            self._zygote = subprocess.Popen([sys.executable, str(FAULTINJECT), "--serve"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=self.env)

    def run(self, argv: list[str], plan: str = "count", kill_after: float | None = None) -> Result:
        """Run one command; with `kill_after`, SIGKILL it that many seconds after it started.

        The kill is sent by whoever reaps the child (the zygote, or Popen here) and only while it is
        unreaped, so the signal can never reach a recycled pid."""
        self._n += 1
        stem = self.work / f"run{self._n}"
        out, err, events = f"{stem}.out", f"{stem}.err", f"{stem}.events.json"
        if self.spawn:
            t0 = time.monotonic()
            with open(out, "w") as o, open(err, "w") as e:
                p = subprocess.Popen([sys.executable, str(FAULTINJECT), "--plan", plan, "--events", events, "--", *argv],
                                     stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=self.env)
            try:
                rc = p.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)  # Popen checks that it has not reaped the child yet
                rc = p.wait()
            elapsed = time.monotonic() - t0
        else:
            req = {"argv": argv, "plan": plan, "stdout": out, "stderr": err, "events": events,
                   "kill_after": kill_after}
            self._zygote.stdin.write(json.dumps(req) + "\n")
            self._zygote.stdin.flush()
            r = self._reply()
            rc, elapsed = r["rc"], r["elapsed"]
        try:
            ev = json.loads(Path(events).read_text())
        except (OSError, ValueError):  # none, or cut short by a kill that landed while it was written
            ev = {}
        return Result(rc, Path(out).read_text(), Path(err).read_text(), ev.get("events", []), ev.get("fired"), elapsed)

    def _reply(self) -> dict:
        line = self._zygote.stdout.readline()
        if not line:
            raise RuntimeError("the zygote process died")
        return json.loads(line)

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.stdin.close()  # it ends its loop; no need to wait for torch's teardown
            self._zygote.kill()
            self._zygote.wait()


# ----------------------------------------------------------------------------- databases

class Databases:
    """Where a case keeps its rows: SQLite inside the bank directory (copied with it), or a
    PostgreSQL database cloned from the scenario's template database."""

    def __init__(self, admin_url: str | None):
        self.admin_url = admin_url
        self._engine = create_engine(admin_url, isolation_level="AUTOCOMMIT") if admin_url else None
        self._n = 0
        self._made: list[str] = []

    @property
    def kind(self) -> str:
        return "postgresql" if self.admin_url else "sqlite"

    def new(self, template: str | None = None) -> str | None:
        if self._engine is None:
            return None
        self._n += 1
        name = f"crash_{os.getpid()}_{self._n}"
        clause = f' TEMPLATE "{make_url(template).database}"' if template else ""
        with self._engine.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"{clause}'))
        self._made.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str | None) -> None:
        if url is None:
            return
        name = make_url(url).database
        with self._engine.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._made.remove(name)

    def close(self) -> None:
        if self._engine is not None:
            for name in list(self._made):
                with self._engine.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            self._engine.dispose()


def db_url_of(bank: Path, url: str | None) -> str:
    return url or Bank.default_db_url(bank)


def fingerprint(url: str) -> dict:
    """The rows that say what a bank holds; independent of the schema revision."""
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            tables = set(inspect(c).get_table_names())
            fp = {"versions": [list(r) for r in c.execute(text(
                      "SELECT id, parent_id, digest FROM versions ORDER BY id"))],
                  "refs": sorted([list(r) for r in c.execute(text("SELECT name, kind, version_id FROM refs"))])}
            for t in ("skills", "task_vectors", "reflog", "keyframes"):
                fp[t] = c.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() if t in tables else 0
            rev = (c.execute(text("SELECT version_num FROM alembic_version")).scalar()
                   if "alembic_version" in tables else None)
    finally:
        engine.dispose()
    return {"rows": fp, "revision": rev}


# ----------------------------------------------------------------------------- what is on disk

def objects_of(bank: Path) -> tuple[set[str], list[str]]:
    """(digests of the objects, files under objects/ that are not an object)."""
    found, stray = set(), []
    root = bank / "objects"
    for p in root.rglob("*") if root.is_dir() else ():
        if p.is_file():
            digest = p.parent.name + p.name
            if p.parent.parent == root and DIGEST_RE.match(digest):
                found.add(digest)
            else:
                stray.append(str(p.relative_to(bank)))
    return found, stray


def files_of(d: Path) -> dict[str, str]:
    """Visible files of a directory (no dot-names) -> sha256 of their bytes."""
    if not d.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file() and not p.name.startswith(".")}


def partials(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs if d.is_dir() for p in d.iterdir() if p.name.endswith(".partial"))


def tmp_files(bank: Path) -> set[str]:
    tmp = bank / "tmp"
    return {p.name for p in tmp.iterdir()} if tmp.is_dir() else set()


def weights_digest(path: Path) -> str:
    with open_checkpoint(path) as ckpt:
        return checkpoint_digest(ckpt)


# ----------------------------------------------------------------------------- checks shared by all

def one_line_error(r: Result) -> str | None:
    """None if the command failed the way the CLI contract says: exit 1, one `error:` line."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    if r.rc != 1 or len(lines) != 1 or not lines[0].startswith("error:") or "Traceback" in r.stderr:
        return f"expected exit 1 with one 'error:' line, got rc={r.rc}, stderr={r.stderr.strip()[-400:]!r}"
    return None


def check_bank(bank: Path, url: str | None, scratch: Path) -> list[str]:
    """fsck is clean, objects/ holds only whole objects, and every version any branch's log shows
    checks out (in a copy of the bank directory, so this HEAD stays) to its recorded digest."""
    problems = []
    _, stray = objects_of(bank)
    problems += [f"not an object under objects/: {s}" for s in stray]
    try:
        b = Bank.open(bank, url)
    except SkillbankError as e:
        return problems + [f"bank does not open: {e}"]
    try:
        r = b.fsck()
        if not r["ok"]:
            problems.append(f"fsck: {r['problems'][:3]}")
    finally:
        b.close()
    copy = scratch / "bank"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(bank, copy)
    b = Bank.open(copy, url)
    try:
        shown = {row["version"]: row["digest"] for row in b.log()}
        for br in b.branches():
            shown.update({row["version"]: row["digest"] for row in b.log(br["name"])})
        for label, digest in sorted(shown.items()):
            out = scratch / f"out-{label}"
            b.checkout(label, out)
            got = weights_digest(out / "model.safetensors")
            if got != digest:
                problems.append(f"checkout {label}: weights digest {got}, log says {digest}")
    except SkillbankError as e:
        problems.append(f"checking out a logged version: {e}")
    finally:
        b.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return problems


def check_garbage(bank: Path, url: str | None) -> list[str]:
    """What a kill left in tmp/ is garbage: gc removes it once older than its grace period."""
    tmp = bank / "tmp"
    old = time.time() - STALE_AGE
    for p in tmp.iterdir() if tmp.is_dir() else ():
        os.utime(p, (old, old))
    b = Bank.open(bank, url)
    try:
        b.gc()
        left = tmp_files(bank)
        r = b.fsck(rebuild=False)
    finally:
        b.close()
    return ([f"gc left temp files: {sorted(left)}"] if left else []) + \
           ([f"fsck after gc: {r['problems'][:3]}"] if not r["ok"] else [])


# ----------------------------------------------------------------------------- scenarios

def _tensors(seed: int) -> dict[str, torch.Tensor]:
    """A tiny policy-shaped model: bf16 vision, fp32 language, fp16 action, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    return {"vision.enc.weight": (torch.randn(64, 64, generator=g) * 0.05).to(torch.bfloat16),
            "language.proj.weight": torch.randn(64, 128, generator=g) * 0.05,
            "action.head.weight": (torch.randn(32, 64, generator=g) * 0.05).to(torch.float16),
            "action.steps": torch.arange(4)}


def _finetune(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: ((v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
                if v.is_floating_point() else v + 1) for k, v in tensors.items()}


def build_bank(bank: Path, url: str | None, models: Path, skills: int) -> Bank:
    """A bank with v0 and `skills` skills on main, each finetuned from the tip before it."""
    models.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(0), str(models / "base.safetensors"))
    b, _ = Bank.init(bank, str(models / "base.safetensors"), db_url=url)
    for i in range(1, skills + 1):
        add_finetuned(b, models, i)
    return b


def finetuned_from_tip(b: Bank, models: Path, i: int) -> Path:
    tip = models / f"tip{i}"
    b.checkout("main", tip)
    path = models / f"ft{i}.safetensors"
    save_file(_finetune(load_file(str(tip / "model.safetensors")), i), str(path))
    return path


def add_finetuned(b: Bank, models: Path, i: int) -> None:
    b.add_skill(f"skill{i}", str(finetuned_from_tip(b, models, i)), 0.8)


class Scenario:
    """One command under test: how to build its bank, what state a user sees, what is allowed."""

    name = ""
    effect = "rows"  # the part of the state that shows the command took effect
    reopens = True  # whether the bank opens in every state the command can leave

    def build(self, tpl: Path, url: str | None) -> None:
        raise NotImplementedError

    def argv(self, case: Path) -> list[str]:
        raise NotImplementedError

    def observe(self, case: Path, url: str | None) -> dict:
        bank = case / "bank"
        return {**fingerprint(db_url_of(bank, url)), "objects": sorted(objects_of(bank)[0]),
                "tmp": sorted(tmp_files(bank))}

    def judge(self, state: dict, pre: dict, post: dict, how: str) -> list[str]:
        """Is `state`, left by a kill ("kill") or a fault ("fault"), one a user may find?"""
        raise NotImplementedError

    def judge_rerun(self, r: Result, before: dict, after: dict, pre: dict, post: dict) -> list[str]:
        """Did re-running from `before` end where it should (`after` is what it left)?"""
        problems = [] if r.rc == 0 else [f"re-run failed: rc={r.rc} {r.stderr.strip()[-400:]!r}"]
        return problems + _differs("after the re-run", after, post, self.compared)

    compared = ("rows", "revision", "objects")


def _differs(when: str, got: dict, want: dict, keys) -> list[str]:
    return [f"{when}: {k} is {_short(got[k])}, expected {_short(want[k])}" for k in keys if got[k] != want[k]]


def _short(x) -> str:
    s = json.dumps(x, default=str)
    return s if len(s) < 300 else s[:300] + "..."


class AddSkill(Scenario):
    name = "add-skill"

    def build(self, tpl, url):
        b = build_bank(tpl / "bank", url, tpl / "models", skills=1)
        try:
            finetuned_from_tip(b, tpl / "models", 2)
            b.checkout("main")  # HEAD attached to main again
        finally:
            b.close()

    def argv(self, case):
        # --from pins the parent: a re-run after a COMMIT that landed is refused instead of
        # stacking the same finetune twice; --keyframe always adds the keyframe writer.
        return ["add-skill", "skill2", "--finetuned", str(case / "models" / "ft2.safetensors"), "--alpha", "0.7",
                "--from", "v1", "--branch", "main", "--keyframe", "always"]

    def judge(self, state, pre, post, how):
        problems = []
        allowed = [pre["rows"]] if how == "fault" else [pre["rows"], post["rows"]]
        if state["rows"] not in allowed:
            problems.append(f"rows after {how}: {_short(state['rows'])}; neither before nor after the command")
        extra = set(state["objects"]) - set(pre["objects"]) - set(post["objects"])
        if extra:
            problems.append(f"objects the command never writes: {sorted(extra)}")
        return problems

    def judge_rerun(self, r, before, after, pre, post):
        if before["rows"] == post["rows"]:  # the COMMIT had landed: the parent is no longer the tip
            problems = []
            if one_line_error(r) is not None or "is at v2" not in r.stderr:
                problems.append(f"re-run after a landed COMMIT: expected a one-line refusal naming v2, "
                                f"got rc={r.rc} {r.stderr.strip()[-300:]!r}")
            return problems + _differs("after the refused re-run", after, post, ("rows",))
        return super().judge_rerun(r, before, after, pre, post)


class Checkout(Scenario):
    name = "checkout"
    effect = "head"
    compared = ("rows", "head", "out")

    def build(self, tpl, url):
        b = build_bank(tpl / "bank", url, tpl / "models", skills=2)
        try:
            b.checkout("v1", tpl / "out")  # a complete older checkout to overwrite; HEAD detached at v1
        finally:
            b.close()

    def argv(self, case):
        return ["checkout", "main", "--out", str(case / "out")]

    def observe(self, case, url):
        bank = case / "bank"
        return {**fingerprint(db_url_of(bank, url)), "head": (bank / "HEAD").read_text(),
                "out": files_of(case / "out")}

    def judge(self, state, pre, post, how):
        problems = _differs(f"after {how}", state, pre, ("rows",))
        heads = [pre["head"]] if how == "fault" else [pre["head"], post["head"]]
        if state["head"] not in heads:
            problems.append(f"HEAD after {how} is {state['head']!r}")
        for name, h in state["out"].items():
            if h not in (pre["out"].get(name), post["out"].get(name)):
                problems.append(f"{name} after {how} is neither the old nor the new file (half-written?)")
        return problems

    def judge_rerun(self, r, before, after, pre, post):
        problems = [] if r.rc == 0 else [f"re-run failed: rc={r.rc} {r.stderr.strip()[-400:]!r}"]
        return problems + _differs("after the re-run", after, post, self.compared)


class Gc(Scenario):
    name = "gc"
    effect = "objects"

    def build(self, tpl, url):
        b = build_bank(tpl / "bank", url, tpl / "models", skills=1)
        try:
            for i in range(3):  # unreferenced objects, as a killed add-skill leaves them
                b.store.put_bytes(os.urandom(2048 + i))
        finally:
            b.close()
        old = time.time() - STALE_AGE
        for i in range(2):  # stale temp files of killed writers
            p = tpl / "bank" / "tmp" / f"obj-stale{i}"
            p.write_bytes(os.urandom(1000))
            os.utime(p, (old, old))

    def argv(self, case):
        return ["gc", "--grace", "0"]

    def judge(self, state, pre, post, how):
        problems = _differs(f"after {how}", state, pre, ("rows",))
        have, before, needed = set(state["objects"]), set(pre["objects"]), set(post["objects"])
        if not needed <= have:
            problems.append(f"gc removed referenced objects: {sorted(needed - have)}")
        if not have <= before:
            problems.append(f"objects appeared: {sorted(have - before)}")
        if not set(state["tmp"]) <= set(pre["tmp"]):
            problems.append(f"temp files appeared: {sorted(set(state['tmp']) - set(pre['tmp']))}")
        return problems

    compared = ("rows", "objects", "tmp")


class DbUpgrade(Scenario):
    name = "db upgrade"
    effect = "revision"
    reopens = False  # at the old schema the bank refuses to open until `db upgrade` has run

    def build(self, tpl, url):
        from importlib import resources

        from alembic import command
        from alembic.config import Config

        build_bank(tpl / "bank", url, tpl / "models", skills=2).close()
        cfg = Config()
        cfg.set_main_option("script_location", str(resources.files("skillbank.migrations")))
        engine = create_engine(db_url_of(tpl / "bank", url))
        try:
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, OLD_SCHEMA)
        finally:
            engine.dispose()

    def argv(self, case):
        return ["db", "upgrade"]

    def judge(self, state, pre, post, how):
        problems = _differs(f"after {how}", state, pre, ("rows", "objects"))
        revisions = [pre["revision"]] if how == "fault" else [pre["revision"], post["revision"]]
        if state["revision"] not in revisions:
            problems.append(f"schema after {how} is at {state['revision']!r}: a half-applied upgrade")
        return problems

    compared = ("rows", "revision", "objects")


SCENARIOS = {s.name: s for s in (AddSkill(), Checkout(), Gc(), DbUpgrade())}


# ----------------------------------------------------------------------------- choosing injections

def choose(events: list, budget: int, rng: random.Random) -> list[tuple[str, str]]:
    """(category, plan) pairs: every kill point and fault when the budget allows, else a sample
    that always holds the COMMIT and the last event; what is left goes to random-delay kills."""
    n = len(events)
    commits = [k for k, e in enumerate(events, 1) if e[0] == "commit"]
    kills = [f"kill-after:{n}"] + [f"kill-before:{k}" for k in commits] + \
            [f"kill-before:{k}" for k in range(1, n + 1) if k not in commits]
    enospc = [f"enospc:{k}" for k in commits] + \
             [f"enospc:{k}" for k, e in enumerate(events, 1) if e[0] in FULL_DISK_KINDS and k not in commits]
    eio = [f"eio:{k}" for k, e in enumerate(events, 1) if e[0] == "fsync"] + \
          [f"eio:{k}" for k, e in enumerate(events, 1) if e[0] in EIO_KINDS - {"fsync"}]
    groups = {"kill point": kills, "ENOSPC": enospc, "EIO": eio}
    if budget >= sum(map(len, groups.values())) + 2:
        picked = {cat: cands for cat, cands in groups.items()}
    else:
        shares = {"kill point": 0.4, "ENOSPC": 0.2, "EIO": 0.2}
        picked = {}
        for cat, cands in groups.items():
            m = min(len(cands), max(1, round(budget * shares[cat])))
            must = cands[:2 if cat == "kill point" else 1]  # the candidates come most telling first
            rest = [c for c in cands if c not in must]
            picked[cat] = must + rng.sample(rest, max(0, m - len(must)))
    out = [(cat, plan) for cat, plans in picked.items() for plan in plans]
    out += [("random delay", "count")] * max(1, budget - len(out))
    return out


# ----------------------------------------------------------------------------- the run

@dataclass
class Tally:
    events: int = 0
    injections: dict = field(default_factory=lambda: {"kill point": 0, "random delay": 0, "ENOSPC": 0, "EIO": 0})
    survived: int = 0
    failures: int = 0
    missed_delays: int = 0


class Harness:
    def __init__(self, work: Path, launcher: Launcher, dbs: Databases, rng: random.Random, log=print):
        self.work, self.launcher, self.dbs, self.rng, self.log = work, launcher, dbs, rng, log
        self.records: list[dict] = []
        self._cases = 0

    def new_case(self, tpl: Path, tpl_url: str | None) -> tuple[Path, str | None]:
        self._cases += 1
        case = self.work / f"case{self._cases}"
        shutil.copytree(tpl, case)
        return case, self.dbs.new(tpl_url)

    def drop_case(self, case: Path, url: str | None) -> None:
        shutil.rmtree(case, ignore_errors=True)
        self.dbs.drop(url)

    def cli(self, sc: Scenario, case: Path, url: str | None) -> list[str]:
        return ["--bank", str(case / "bank"), *(["--db", url] if url else []), *sc.argv(case)]

    def scenario(self, sc: Scenario, budget: int) -> Tally:
        tally = Tally()
        tpl = self.work / f"template-{sc.name.replace(' ', '-')}"
        tpl_url = self.dbs.new()
        sc.build(tpl, tpl_url)
        case, url = self.new_case(tpl, tpl_url)
        pre = {**sc.observe(case, url), "tmp_before": sorted(tmp_files(case / "bank"))}
        dry = self.launcher.run(self.cli(sc, case, url))
        if dry.rc != 0:
            raise RuntimeError(f"{sc.name}: the dry run failed: {dry.stderr.strip()[-500:]}")
        post = sc.observe(case, url)
        problems = check_bank(case / "bank", url, case / "scratch")
        if problems:
            raise RuntimeError(f"{sc.name}: the bank after the dry run fails its checks: {problems}")
        self.drop_case(case, url)
        tally.events = len(dry.events)
        times = [e[2] for e in dry.events]
        window = (min(times) / 2, max(times)) if times else (0.0, dry.elapsed)
        for cat, plan in choose(dry.events, budget, self.rng):
            lo, hi = window
            for _ in range(4 if cat == "random delay" else 1):
                rec = self.inject(sc, tpl, tpl_url, pre, post, cat, plan, (lo, hi))
                if rec is not None:
                    break
                tally.missed_delays += 1  # the command had finished: try again, earlier
                hi = (lo + hi) / 2
            if rec is None:
                continue
            tally.injections[cat] += 1
            if rec["problems"]:
                tally.failures += 1
                self.log(f"FAIL {sc.name} {rec['plan']}: " + "; ".join(rec["problems"]))
            else:
                tally.survived += 1
        self.dbs.drop(tpl_url)
        shutil.rmtree(tpl, ignore_errors=True)
        return tally

    def inject(self, sc, tpl, tpl_url, pre, post, cat, plan, window) -> dict | None:
        case, url = self.new_case(tpl, tpl_url)
        try:
            delay = self.rng.uniform(*window) if cat == "random delay" else None
            r = self.launcher.run(self.cli(sc, case, url), plan, kill_after=delay)
            if delay is not None:
                if r.rc != -signal.SIGKILL:
                    return None  # the command finished first: not an injection
                plan = f"kill-at:{delay:.3f}s"
            rec = {"command": sc.name, "category": cat, "plan": plan, "rc": r.rc, "event": r.fired,
                   "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else None, "landed": None}
            try:
                rec["problems"] = self.check(sc, case, url, r, pre, post, cat, rec)
            except Exception as e:  # noqa: BLE001 - e.g. an unreadable HEAD: a finding, not a harness crash
                rec["problems"] = [f"checking raised {type(e).__name__}: {e}"]
            self.records.append(rec)
            return rec
        finally:
            self.drop_case(case, url)

    def check(self, sc, case, url, r, pre, post, cat, rec) -> list[str]:
        how = "fault" if cat in ("ENOSPC", "EIO") else "kill"
        problems = []
        if how == "kill" and r.rc != -signal.SIGKILL:
            return [f"expected death by SIGKILL, got rc={r.rc} {r.stderr.strip()[-300:]!r}"]
        if how == "fault":
            if r.fired is None:
                return [f"the fault was never injected (rc={r.rc})"]
            if (bad := one_line_error(r)) is not None:
                problems.append(bad)
        bank = case / "bank"
        state = sc.observe(case, url)
        rec["landed"] = state[sc.effect] != pre[sc.effect]  # had the command's effect become visible?
        problems += sc.judge(state, pre, post, how)
        left = partials(bank, case / "out")  # hidden .partial names a kill may leave; never read
        if how == "fault":
            if left:
                problems.append(f"temp files left behind: {left}")
            if tmp_files(bank) - set(pre["tmp_before"]):
                problems.append(f"temp files left in tmp/: {sorted(tmp_files(bank) - set(pre['tmp_before']))}")
        if sc.reopens or state["revision"] == post["revision"]:
            problems += check_bank(bank, url, case / "scratch")
        else:
            problems += self.refuses_to_open(case, url)
        rerun = self.launcher.run(self.cli(sc, case, url))
        problems += sc.judge_rerun(rerun, state, sc.observe(case, url), pre, post)
        if set(partials(bank, case / "out")) - set(left):
            problems.append(f"the re-run left temp files: {sorted(set(partials(bank, case / 'out')) - set(left))}")
        problems += check_garbage(bank, url)  # and fsck; the rows are the dry run's, checked once
        return problems

    @staticmethod
    def refuses_to_open(case: Path, url: str | None) -> list[str]:
        try:
            Bank.open(case / "bank", url).close()
        except SchemaError as e:
            return [] if "skillbank db upgrade" in str(e) else [f"old schema refused without naming the fix: {e}"]
        return ["a bank at the old schema opened"]


def run(injections: int, seed: int, db_url: str | None = None, commands: list[str] | None = None,
        spawn: bool = False, log=print) -> dict:
    names = commands or list(SCENARIOS)
    rng = random.Random(seed)
    t0 = time.monotonic()
    tallies: dict[str, Tally] = {}
    with tempfile.TemporaryDirectory(prefix="crash-") as tmp:
        work = Path(tmp)
        launcher = Launcher(spawn, work)
        dbs = Databases(db_url)
        harness = Harness(work, launcher, dbs, rng, log)
        try:
            for i, name in enumerate(names):
                budget = injections // len(names) + (i < injections % len(names))
                tallies[name] = harness.scenario(SCENARIOS[name], budget)
        finally:
            launcher.close()
            dbs.close()
    total = sum(sum(t.injections.values()) for t in tallies.values())
    return {"seed": seed, "db": dbs.kind, "mode": "spawn" if spawn else "fork",
            "injections": total, "survived": sum(t.survived for t in tallies.values()),
            "failures": sum(t.failures for t in tallies.values()), "wall_s": round(time.monotonic() - t0, 1),
            "commands": {n: t.__dict__ for n, t in tallies.items()}, "records": harness.records}


def render(report: dict) -> str:
    cols = ["command", "events", "kill points", "random-delay kills", "ENOSPC", "EIO/fsync", "survived", "failures"]
    rows = [[n, t["events"], t["injections"]["kill point"], t["injections"]["random delay"],
             t["injections"]["ENOSPC"], t["injections"]["EIO"], t["survived"], t["failures"]]
            for n, t in report["commands"].items()]
    rows.append(["total", sum(r[1] for r in rows), *[sum(r[i] for r in rows) for i in range(2, 8)]])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    out = [line(cols), line(["-" * w for w in widths]), *map(line, rows)]
    out.append(f"{report['injections']} injections ({report['db']}, {report['mode']}, seed {report['seed']}): "
               f"{report['survived']} survived, {report['failures']} failed, {report['wall_s']} s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--injections", type=int, default=40, help="total, split evenly over the commands")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--db-url", default=None,
                   help="PostgreSQL URL of a database on a server where this user may CREATE DATABASE "
                        "(default: SQLite inside each bank)")
    p.add_argument("--commands", default=",".join(SCENARIOS), help="comma-separated subset of: "
                   + ", ".join(SCENARIOS))
    p.add_argument("--spawn", action="store_true",
                   help="a fresh interpreter per command instead of a fork of a warm one (slower)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    commands = [c.strip() for c in a.commands.split(",") if c.strip()]
    unknown = [c for c in commands if c not in SCENARIOS]
    if unknown:
        p.error(f"unknown command(s): {', '.join(unknown)}")
    report = run(a.injections, a.seed, a.db_url, commands, a.spawn,
                 log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2) if a.json else render(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
