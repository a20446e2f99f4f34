"""Concurrent add-skill against one bank: N writer processes released together.

Refs move by compare-and-swap and version numbers are allocated inside the writing transaction
(lineage/refs.py, api.py). This checks those claims under real contention, on SQLite or
PostgreSQL, through the CLI's own entry point (`skillbank.cli.main`):

  same branch  N writers add distinct skills to `main` at once. A loser must exit 1 with one
               stderr line naming the branch and saying retry; losers retry until all are in.
  branches     N branches made from v0; N writers each add to their own at once: all must win.
  readers      K processes run log / reflog / branch / checkout meanwhile: all must succeed.

Then: main is linear and holds every skill once, version ids have no gaps, each branch's reflog
has one chained entry per successful move, every version checks out to its recorded digest, and
fsck is clean. Each of R rounds repeats both scenarios on the grown bank.

By default each writer is a long-lived process that runs `skillbank.cli.main()` once per attempt
(exit code from SystemExit, stdout/stderr captured at the file-descriptor level). Workers are
forked from a fork server that imported skillbank once, so torch is imported once in all, not
once per attempt (on two cores that import is most of the cost of a small run). `--exec` runs a fresh `python -m skillbank.cli`
process per attempt instead: slower, and exactly what a user runs.

    python stress/concurrency.py --writers 6 --rounds 1            # SQLite inside a temp bank
    python stress/concurrency.py --writers 16 --rounds 3 --postgres --readers 2
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ALPHA = "0.5"
READY_TIMEOUT = 300  # seconds for a worker to start (it imports torch) or to finish one attempt


# ----------------------------------------------------------------------------- models

SPECS = {  # a few KB, policy-shaped: three float dtypes' worth of groups and an integer buffer
    "vision.enc.weight": (np.float32, (32, 64)),
    "language.proj.weight": (np.float16, (32, 64)),
    "action.head.weight": (np.float32, (16, 64)),
    "action.head.bias": (np.float32, (16,)),
    "action.steps": (np.int64, (4,)),
}


def _save(path: Path, tensors: dict) -> Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    return path


def make_base(path: Path) -> Path:
    rng = np.random.default_rng(0)
    return _save(path, {n: (rng.standard_normal(shape) * 0.05).astype(dt) if dt != np.int64
                        else rng.integers(0, 1000, shape).astype(dt) for n, (dt, shape) in SPECS.items()})


def make_finetuned(path: Path, base: dict, seed: int) -> Path:
    """The base moved by ~1% of each tensor's spread: plausible against any version of the bank."""
    rng = np.random.default_rng(1000 + seed)
    out = {}
    for n, t in base.items():
        if t.dtype == np.int64:
            out[n] = t + 1
        else:
            x = t.astype(np.float32)
            out[n] = (x + 0.01 * float(x.std()) * rng.standard_normal(t.shape)).astype(t.dtype)
    return _save(path, out)


# ----------------------------------------------------------------------------- worker processes

def _capture_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in this process as a fresh process would: exit code, stdout, stderr."""
    import skillbank.cli as cli_mod

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = ["skillbank", *argv]
        rc = 0
        try:
            cli_mod.main()
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - what an uncaught exception does to a real process
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        gc.collect()  # the command's engine and its connections go, as they would at exit
        out.seek(0)
        err.seek(0)
        return rc, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def run_cli(argv: list[str], exec_cli: bool) -> dict:
    t0 = time.perf_counter()
    if exec_cli:
        p = subprocess.run([sys.executable, "-m", "skillbank.cli", *argv], capture_output=True, text=True, check=False)
        rc, out, err = p.returncode, p.stdout, p.stderr
    else:
        rc, out, err = _capture_cli(argv)
    return {"rc": rc, "out": out, "err": err, "seconds": time.perf_counter() - t0}


def _read_loop(glob: list[str], branch: str, out_dir: str, stop, exec_cli: bool) -> dict:
    """log / reflog / branch / checkout of `branch` until told to stop; every one must succeed."""
    commands = [["log", branch, "--json"], ["reflog", branch, "--json"], ["branch", "--json"],
                ["checkout", branch, "--out", out_dir, "--json"]]
    ops, errors = 0, []
    while not stop.is_set():
        cmd = commands[ops % len(commands)]
        r = run_cli(glob + cmd, exec_cli)
        ops += 1
        problem = None
        if r["rc"] != 0:
            problem = f"exit {r['rc']}: {r['err'].strip()[-300:]}"
        else:
            try:
                data = json.loads(r["out"])
                if cmd[0] == "log" and any(a["parent"] != b["version"] for a, b in pairwise(data)):
                    problem = "log is not a chain"
            except (ValueError, KeyError, TypeError) as e:
                problem = f"bad JSON ({e})"
        if problem:
            errors.append(f"{' '.join(cmd[:2])}: {problem}")
    return {"ops": ops, "errors": errors}


def _worker(conn, go, stop, index: int, exec_cli: bool) -> None:
    os.environ["SKILLBANK_AUTHOR"] = f"stress-{index}"
    if not exec_cli:
        import skillbank.cli  # noqa: F401  (paid once, here, not per attempt)
    conn.send("up")
    while (msg := conn.recv()) is not None:
        kind, args = msg
        conn.send("ready")
        if kind == "write":
            go.wait()
            conn.send(run_cli(args, exec_cli))
        else:
            conn.send(_read_loop(*args, stop, exec_cli))


class Pool:
    """Long-lived worker processes; `together` releases a set of them at the same instant."""

    def __init__(self, size: int, exec_cli: bool = False):
        ctx = mp.get_context("forkserver")  # a clean single-threaded parent, unlike `fork` from here
        ctx.set_forkserver_preload(["skillbank.cli"] + ([] if __name__ == "__main__" else [__name__]))
        self.go, self.stop = ctx.Event(), ctx.Event()
        self.conns, self.procs, self.exec_cli = [], [], exec_cli
        for i in range(size):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(theirs, self.go, self.stop, i, exec_cli), daemon=True)
            p.start()
            self.conns.append(mine)
            self.procs.append(p)
        for c in self.conns:
            self._recv(c, "up")

    def _recv(self, conn, want: str | None = None):
        if not conn.poll(READY_TIMEOUT):
            raise RuntimeError("a worker process did not answer")
        msg = conn.recv()
        if want is not None and msg != want:
            raise RuntimeError(f"worker said {msg!r}, expected {want!r}")
        return msg

    def together(self, jobs: dict[int, list[str]]) -> dict[int, dict]:
        """Run argv jobs on workers {index: argv}, all released by one event once all are ready."""
        self.go.clear()
        for i, argv in jobs.items():
            self.conns[i].send(("write", argv))
        for i in jobs:
            self._recv(self.conns[i], "ready")
        self.go.set()
        results = {i: self._recv(self.conns[i]) for i in jobs}
        self.go.clear()
        return results

    def start_readers(self, indices: list[int], glob: list[str], branch: str, out_root: Path) -> None:
        self.stop.clear()
        for i in indices:
            self.conns[i].send(("read", (glob, branch, str(out_root / f"reader{i}"))))
            self._recv(self.conns[i], "ready")

    def stop_readers(self, indices: list[int]) -> dict:
        self.stop.set()
        ops, errors = 0, []
        for i in indices:
            r = self._recv(self.conns[i])
            ops += r["ops"]
            errors += r["errors"]
        return {"ops": ops, "errors": errors}

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# ----------------------------------------------------------------------------- scenarios

@dataclass
class Tally:
    attempts: int = 0
    wins: int = 0
    clean_losses: int = 0
    unclear: list[str] = field(default_factory=list)
    gave_up: int = 0
    seconds: float = 0.0
    won: list[tuple[str, str, str]] = field(default_factory=list)  # (skill, branch, version)

    def as_dict(self) -> dict:
        return {"attempts": self.attempts, "wins": self.wins, "clean_losses": self.clean_losses,
                "unclear_errors": len(self.unclear), "gave_up": self.gave_up, "wall_s": round(self.seconds, 2),
                "unclear": self.unclear[:10]}


def classify(r: dict, branch: str) -> tuple[str, str | None]:
    """("win", version) | ("loss", None) for the clean 'branch moved; retry' | ("unclear", why)."""
    lines = [ln for ln in r["err"].splitlines() if ln.strip()]
    if r["rc"] == 0:
        try:
            return "win", json.loads(r["out"])["version"]
        except (ValueError, KeyError, TypeError):
            return "unclear", f"exit 0 but stdout is not the JSON result: {r['out'][:200]!r}"
    if r["rc"] == 1 and len(lines) == 1 and f"'{branch}'" in lines[0] and "retry" in lines[0].lower():
        return "loss", None
    return "unclear", f"exit {r['rc']}, stderr: {' | '.join(lines)[-400:]!r}"


def _add_argv(glob: list[str], skill: str, ft: Path, branch: str | None) -> list[str]:
    argv = glob + ["add-skill", skill, "--finetuned", str(ft), "--alpha", ALPHA, "--json"]
    if branch:  # own branch: parent is its tip
        argv += ["--from", branch, "--branch", branch]
    return argv


def same_branch_round(pool: Pool, glob: list[str], writers: int, rnd: int, models: Path, base: dict,
                      tally: Tally) -> None:
    pending = {i: (f"main-r{rnd}-w{i}", make_finetuned(models / f"main-r{rnd}-w{i}.safetensors", base,
                                                        rnd * 1000 + i)) for i in range(writers)}
    t0 = time.perf_counter()
    for _ in range(writers + 2):  # every attempt has a first committer, and it wins
        if not pending:
            break
        results = pool.together({i: _add_argv(glob, skill, ft, None) for i, (skill, ft) in pending.items()})
        for i, r in results.items():
            tally.attempts += 1
            kind, detail = classify(r, "main")
            if kind == "win":
                tally.wins += 1
                tally.won.append((pending.pop(i)[0], "main", detail))
            elif kind == "loss":
                tally.clean_losses += 1
            else:
                tally.unclear.append(f"{pending[i][0]}: {detail}")
    tally.gave_up += len(pending)
    tally.seconds += time.perf_counter() - t0


def branches_round(pool: Pool, glob: list[str], writers: int, rnd: int, models: Path, base: dict,
                   tally: Tally) -> None:
    jobs = {}
    for i in range(writers):
        skill = f"b{i}-r{rnd}"
        jobs[i] = (skill, f"b{i}", make_finetuned(models / f"{skill}.safetensors", base, 500_000 + rnd * 1000 + i))
    t0 = time.perf_counter()
    results = pool.together({i: _add_argv(glob, skill, ft, br) for i, (skill, br, ft) in jobs.items()})
    tally.seconds += time.perf_counter() - t0
    for i, r in results.items():
        tally.attempts += 1
        skill, br, _ = jobs[i]
        kind, detail = classify(r, br)
        if kind == "win":
            tally.wins += 1
            tally.won.append((skill, br, detail))
        else:  # on its own branch nobody may lose
            tally.unclear.append(f"{skill}: {detail or 'lost on its own branch'}")
            tally.gave_up += 1


# ----------------------------------------------------------------------------- invariants

def verify(bank, won: list[tuple[str, str, str]], check_dir: Path) -> dict:
    """Everything reported as won is in history once, every move is in the reflog, all rebuild."""
    from sqlalchemy import func, select

    from skillbank.db import RefLog, Skill, TaskVector, Version

    problems: list[str] = []
    with bank.db.read() as s:
        versions = {v.id: v for v in s.scalars(select(Version))}
        n_skills = s.scalar(select(func.count()).select_from(Skill))
        n_tvs = s.scalar(select(func.count()).select_from(TaskVector))
        moves: dict[str, list] = {}
        for m in s.scalars(select(RefLog).order_by(RefLog.id)):
            moves.setdefault(m.ref, []).append((m.old_version_id, m.new_version_id))
    ids = sorted(versions)
    if ids != list(range(len(ids))):
        problems.append(f"version ids have gaps: {sorted(set(range(ids[-1] + 1)) - set(ids))}")
    if len(ids) != 1 + len(won) or n_skills != len(won) or n_tvs != len(won):
        problems.append(f"{len(won)} wins but {len(ids) - 1} versions, {n_skills} skills, {n_tvs} task vectors")

    lost_versions = lost_moves = 0
    by_branch: dict[str, list[tuple[str, str]]] = {}
    for skill, br, ver in won:
        by_branch.setdefault(br, []).append((skill, ver))
    for br, wins in sorted(by_branch.items()):
        log = bank.log(br)
        in_log = {(r["skill"], r["version"]) for r in log}
        if any(a["parent"] != b["version"] for a, b in pairwise(log)) or log[-1]["version"] != "v0":
            problems.append(f"{br}: history is not a chain down to v0")
        skills = [r["skill"] for r in log if r["skill"] is not None]
        if sorted(skills) != sorted(sk for sk, _ in wins):
            missing = sorted({sk for sk, _ in wins} - set(skills))
            doubled = sorted({sk for sk in skills if skills.count(sk) > 1})
            problems.append(f"{br}: history holds {len(skills)} skills, {len(wins)} were won "
                            f"(missing {missing}, twice {doubled})")
        lost_versions += sum(1 for w in wins if w not in in_log)
        chain = moves.get(br, [])
        news = [f"v{new}" for _, new in chain[1:]]
        lost_moves += sum(1 for _, ver in wins if ver not in news)
        breaks = sum(1 for (_, a), (b, _) in pairwise(chain) if a != b)
        if breaks or len(chain) != 1 + len(wins) or (chain and f"v{chain[-1][1]}" != log[0]["version"]):
            problems.append(f"{br}: reflog has {len(chain)} entries ({breaks} breaks) for {len(wins)} moves")
            lost_moves += breaks

    for vid in ids:  # checkout verifies the rebuilt bytes against the recorded digest itself
        try:
            got = bank.checkout(f"v{vid}", check_dir / f"v{vid}")["digest"]
            if got != versions[vid].digest:
                problems.append(f"v{vid}: checked out {got}, recorded {versions[vid].digest}")
        except Exception as e:  # noqa: BLE001 - reported, not raised
            problems.append(f"v{vid}: checkout failed: {type(e).__name__}: {e}")
    fsck = bank.fsck()
    if not fsck["ok"]:
        problems.append(f"fsck: {fsck['problems'][:5]}")
    return {"versions": len(ids), "lost_versions": lost_versions, "lost_ref_moves": lost_moves,
            "fsck_ok": fsck["ok"], "problems": problems}


# ----------------------------------------------------------------------------- driver

def run(workdir: Path, writers: int, rounds: int = 1, db_url: str | None = None, readers: int = 0,
        pool: Pool | None = None, exec_cli: bool = False,
        scenarios: tuple[str, ...] = ("same-branch", "branches")) -> dict:
    """Both scenarios on a fresh bank in `workdir`; a summary whose `ok` says all invariants held."""
    from safetensors.numpy import load_file

    from skillbank.api import Bank

    t0 = time.perf_counter()
    workdir = Path(workdir)
    models = workdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    base_path = make_base(models / "base.safetensors")
    base = load_file(str(base_path))
    root = workdir / "bank"
    bank, _ = Bank.init(root, str(base_path), db_url)
    glob = ["--bank", str(root)] + (["--db", db_url] if db_url else [])
    own = pool is None
    t_pool = time.perf_counter()
    pool = pool or Pool(writers + readers, exec_cli)
    startup = time.perf_counter() - t_pool
    reader_ids = list(range(writers, writers + readers))
    same, branches = Tally(), Tally()
    reads = {"ops": 0, "errors": []}
    try:
        if "branches" in scenarios:
            for i in range(writers):
                bank.create_branch(f"b{i}", "v0")
        if reader_ids:
            pool.start_readers(reader_ids, glob, "main", workdir / "reads")
        try:
            for rnd in range(rounds):
                if "same-branch" in scenarios:
                    same_branch_round(pool, glob, writers, rnd, models, base, same)
                if "branches" in scenarios:
                    branches_round(pool, glob, writers, rnd, models, base, branches)
        finally:
            if reader_ids:
                reads = pool.stop_readers(reader_ids)
        t_verify = time.perf_counter()
        checks = verify(bank, same.won + branches.won, workdir / "checks")
        verify_s = time.perf_counter() - t_verify
    finally:
        bank.close()
        if own:
            pool.close()
    unclear = len(same.unclear) + len(branches.unclear)
    summary = {
        "backend": "postgresql" if db_url and db_url.startswith("postgres") else "sqlite",
        "mode": "exec" if pool.exec_cli else "in-process CLI",
        "writers": writers, "rounds": rounds, "readers": readers,
        "same_branch": same.as_dict(), "branches": branches.as_dict(),
        "attempts": same.attempts + branches.attempts, "wins": same.wins + branches.wins,
        "clean_losses": same.clean_losses, "unclear_errors": unclear,
        "gave_up": same.gave_up + branches.gave_up,
        "reader_ops": reads["ops"], "reader_errors": len(reads["errors"]), "reader_error_samples": reads["errors"][:5],
        **checks, "startup_s": round(startup, 2), "verify_s": round(verify_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    summary["ok"] = (unclear == 0 and summary["gave_up"] == 0 and not reads["errors"] and not checks["problems"]
                     and checks["lost_versions"] == 0 and checks["lost_ref_moves"] == 0)
    return summary


def render(s: dict) -> str:
    a, b = s["same_branch"], s["branches"]
    lines = [
        (f"backend {s['backend']} ({s['mode']}), N={s['writers']} writers x {s['rounds']} rounds, "
         f"{s['readers']} readers"),
        (f"  same branch: {a['attempts']} attempts, {a['wins']} wins, {a['clean_losses']} clean losses, "
         f"{a['unclear_errors']} unclear errors, {a['gave_up']} gave up, {a['wall_s']} s"),
        (f"  branches:    {b['attempts']} attempts, {b['wins']} wins, {b['unclear_errors']} unclear errors, "
         f"{b['wall_s']} s"),
        f"  readers:     {s['reader_ops']} ops, {s['reader_errors']} errors",
        (f"  versions {s['versions']}, lost versions {s['lost_versions']}, lost ref moves {s['lost_ref_moves']}, "
         f"fsck {'clean' if s['fsck_ok'] else 'NOT clean'}"),
        f"  wall {s['wall_s']} s (worker start {s['startup_s']} s, checks {s['verify_s']} s)",
    ]
    lines += [f"  unclear: {u}" for u in a["unclear"] + b["unclear"]]
    lines += [f"  reader error: {e}" for e in s["reader_error_samples"]]
    lines += [f"  PROBLEM: {p}" for p in s["problems"]]
    lines.append("OK" if s["ok"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", "-n", type=int, default=6)
    ap.add_argument("--rounds", "-r", type=int, default=1)
    ap.add_argument("--readers", type=int, default=0, help="processes running log/checkout meanwhile")
    db = ap.add_mutually_exclusive_group()
    db.add_argument("--db-url", default=None, help="an EMPTY database for the bank (default: SQLite in the bank)")
    db.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL (tests/pgserver.py)")
    ap.add_argument("--exec", dest="exec_cli", action="store_true",
                    help="a fresh `python -m skillbank.cli` process per attempt")
    ap.add_argument("--scenario", choices=["all", "same-branch", "branches"], default="all")
    ap.add_argument("--keep", default=None, help="work here and keep the bank (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    scenarios = ("same-branch", "branches") if a.scenario == "all" else (a.scenario,)
    server = None
    try:
        url = a.db_url
        if a.postgres:
            sys.path.insert(0, str(REPO / "tests"))
            from pgserver import PgServer, pg_available

            ok, reason = pg_available()
            if not ok:
                print(f"PostgreSQL not available: {reason}", file=sys.stderr)
                return 2
            server = PgServer().start()
            url = server.create_database("stress_concurrency")
        with tempfile.TemporaryDirectory(prefix="sb-concurrency-") as tmp:
            work = Path(a.keep) if a.keep else Path(tmp)
            s = run(work, a.writers, a.rounds, url, a.readers, exec_cli=a.exec_cli, scenarios=scenarios)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(s, indent=2) if a.json else render(s))
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
