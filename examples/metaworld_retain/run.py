#!/usr/bin/env python
"""The open RETAIN benchmark on Meta-World v3, end to end on a CPU.

    python examples/metaworld_retain/run.py --quick --out out/metaworld_quick        # a few minutes
    python examples/metaworld_retain/run.py --out out/metaworld_full                 # the full run
    python examples/metaworld_retain/run.py compare --out out/metaworld_full         # one stage (dvc)

Stages (each reads what the previous ones wrote under --out):

  demos      scripted-expert demos (LeRobot v3): the pretraining pool on full ranges, and a few
             demos of each held-out target on a narrow ID range
  pretrain   a generalist reference policy; `skillbank init --base` it into OUT/bank (SQLite)
  compare    per target: task-FT, co-FT, RETAIN-task-FT, RETAIN-co-FT (alpha from a sweep on OOD
             val), a per-group RETAIN, and the base, each a bank version, on ID / OOD / generalist
  continual  the targets one after another: RETAIN (finetune from version n-1, merge into it)
             versus plain sequential finetuning
  report     metrics.json, results.md, alpha_sweep.png / .csv

Every evaluated model is a version in the bank, rebuilt with `checkout` (digest-verified), and every
result is attached to its version with `record_eval` (one row per split and evaluation seed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("demos", "pretrain", "compare", "continual", "report")
METHODS = ("base", "task_ft", "co_ft", "retain_task_ft", "retain_co_ft", "retain_task_ft_lang", "expert")
METHOD_NAMES = {
    "base": "base (pretrained)", "task_ft": "task finetune", "co_ft": "co-finetune",
    "retain_task_ft": "RETAIN-task-FT", "retain_co_ft": "RETAIN-co-FT",
    "retain_task_ft_lang": "RETAIN-task-FT, language only", "expert": "scripted expert (upper bound)",
}
SPLIT_KEYS = ("ID", "OOD_val", "OOD_test", "generalist")
VARIANTS = {"task": "task_ft", "co": "co_ft"}
ENV_POOL_SIZE = 96  # envs each process keeps built (see _init_worker)
EXPERT = "expert"  # the checkpoint name that stands for the scripted expert (not a bank version)


# ----------------------------------------------------------------------------- small helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    if not path.is_file():
        sys.exit(f"error: {path} is missing; run the earlier stages first")
    return json.loads(path.read_text())


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def deep_merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def rng(r):
    """A range from params (list of lists or null) as a tuple of tuples."""
    return None if r is None else (tuple(float(x) for x in r[0]), tuple(float(x) for x in r[1]))


def fmt_alpha(a: float) -> str:
    return f"{a:g}"


def load_params(path: Path, mode: str) -> dict:
    import yaml

    doc = yaml.safe_load(path.read_text())
    p = copy.deepcopy(doc["full"])
    if mode != "full":
        deep_merge(p, doc.get(mode) or {})
    p["mode"] = mode
    from skillbank.envs.metaworld import INSTRUCTIONS, OOD_VARIATIONS, check_task

    for t in p["use_targets"]:
        check_task(t)
        if t not in p["targets"]:
            raise SystemExit(f"error: target {t} has no ranges in params")
        for var in p["targets"][t]["ood_test"]:
            if var not in OOD_VARIATIONS.get(t, {}):
                raise SystemExit(f"error: {t}: no OOD variation {var!r} in OOD_VARIATIONS")
    held_out = set(p["targets"])
    pre = p["demos"]["pretrain_tasks"]
    pre = [t for t in INSTRUCTIONS if t not in held_out] if pre == "all" else [check_task(t) for t in pre]
    clash = sorted(set(pre) & held_out)
    if clash:
        raise SystemExit(f"error: pretraining tasks include held-out targets: {', '.join(clash)}")
    p["demos"]["pretrain_tasks"] = pre
    missing = [t for t in p["eval"]["generalist_tasks"] if t not in pre]
    if missing:
        raise SystemExit(f"error: generalist tasks must be pretraining tasks: {', '.join(missing)}")
    if 1.0 not in [float(a) for a in p["alphas"]]:
        raise SystemExit("error: the alpha sweep must include 1.0 (that version is the plain finetune)")
    return p


# ----------------------------------------------------------------------------- worker processes

def _init_worker() -> None:
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from skillbank.envs import metaworld as mw

    # evaluate() keeps built envs in a pool of 24 by default; one model's generalist split alone
    # needs 7 tasks x 8 envs, so with the default every model would rebuild every env (0.2 s each).
    mw._POOL.max_envs = ENV_POOL_SIZE


def _finetune_job(parent_dir: str, demos: str, out_dir: str, settings: dict) -> dict:
    from skillbank.train.finetune import finetune
    from skillbank.train.trainer import TrainSettings

    t0 = time.perf_counter()
    run = finetune(Path(parent_dir), demos, Path(out_dir), TrainSettings.from_dict(settings), progress=False)
    run["metrics"].pop("history", None)
    run["seconds"] = round(time.perf_counter() - t0, 1)
    return run


def _eval_job(ckpt_dir: str, split: dict, episodes: int, seeds: list[int]) -> dict:
    from skillbank.envs.metaworld import INSTRUCTIONS, EvalSplit, evaluate_suite
    from skillbank.policies.reference import RefPolicy

    if ckpt_dir == EXPERT:  # Meta-World's scripted expert: the upper bound of every split
        from skillbank.envs.metaworld import expert_policy

        experts = {t: expert_policy(t) for t in split["tasks"]}
        policy_fn = lambda obs, task: experts[task](obs, task)
    else:
        policy = RefPolicy.from_pretrained(ckpt_dir)
        policy_fn = lambda obs, task: policy.act(obs, INSTRUCTIONS[task])
    s = EvalSplit(split["name"], tuple(split["tasks"]), rng(split["obj"]), rng(split["goal"]),
                  variation=split.get("variation"), max_steps=split["max_steps"])
    t0 = time.perf_counter()
    res = evaluate_suite(policy_fn, [s], episodes, seeds)[0]
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


class Serial:
    """A stand-in for ProcessPoolExecutor with one worker: run in this process (the smoke mode)."""

    def __init__(self):
        _init_worker()

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_pool(workers: int):
    if workers <= 1:
        return Serial()
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker)


# ----------------------------------------------------------------------------- evaluation specs

def split_spec(name: str, tasks, obj=None, goal=None, variation=None, *, episodes: int, seeds, max_steps: int,
               key: str) -> dict:
    return {"name": name, "tasks": list(tasks), "obj": obj, "goal": goal, "variation": variation,
            "episodes": int(episodes), "seeds": [int(s) for s in seeds], "max_steps": int(max_steps),
            "key": key}


def cache_key(spec: dict) -> str:
    body = {k: spec[k] for k in ("name", "tasks", "obj", "goal", "variation", "episodes", "seeds", "max_steps")}
    return json.dumps(body, sort_keys=True)


def target_splits(p: dict, target: str) -> list[dict]:
    """ID, OOD val and the OOD test variations of one target."""
    from skillbank.envs.metaworld import OOD_VARIATIONS

    t, ev = p["targets"][target], p["eval"]
    common = {"episodes": ev["episodes"], "seeds": ev["seeds"], "max_steps": ev["max_steps"]}
    out = [split_spec("ID", [target], t["id"]["obj"], t["id"].get("goal"), key="ID", **common),
           split_spec("OOD", [target], t["ood_val"]["obj"], t["ood_val"].get("goal"),
                      t["ood_val"]["name"], key="OOD_val", **common)]
    # OOD test: `episodes` per seed in all, split evenly over its variations.
    per_var = max(1, math.ceil(ev["episodes"] / len(t["ood_test"])))
    for var in t["ood_test"]:
        obj, goal = OOD_VARIATIONS[target][var]
        out.append(split_spec("OOD", [target], _plain(obj), _plain(goal), var, key="OOD_test",
                              **dict(common, episodes=per_var)))
    return out


def generalist_split(p: dict) -> dict:
    ev = p["eval"]
    return split_spec("generalist", ev["generalist_tasks"], episodes=ev["generalist_episodes"],
                      seeds=ev["seeds"], max_steps=ev["max_steps"], key="generalist")


def _plain(r):
    return None if r is None else [[float(x) for x in r[0]], [float(x) for x in r[1]]]


def suite_name(spec: dict) -> str:
    if spec["name"] == "generalist":
        return "metaworld-retain:generalist=" + "+".join(spec["tasks"])
    return f"metaworld-retain:{spec['tasks'][0]}"


def combine(results: list[dict]) -> dict:
    """Several splits (e.g. two OOD test variations) as one: per seed, the mean over them."""
    from skillbank.envs.metaworld import t_interval, wilson_interval

    per_seed = [sum(vals) / len(vals) for vals in zip(*(r["per_seed"] for r in results))]
    mean = sum(per_seed) / len(per_seed)
    if len(per_seed) >= 2:
        lo, hi = t_interval(per_seed)
    else:
        lo, hi = wilson_interval(sum(r["successes"] for r in results), sum(r["episodes"] for r in results))
    return {"mean": mean, "ci95": [lo, hi], "per_seed": per_seed,
            "episodes": sum(r["episodes"] for r in results),
            "labels": [r["label"] for r in results]}


class Evaluator:
    """Evaluate bank versions on split specs in the worker pool; each (weights digest, split) runs
    once, and its per-seed results are recorded against every version that has those weights."""

    def __init__(self, bank, pool, ckpt_root: Path, cache: dict | None = None):
        self.bank, self.pool, self.ckpt_root = bank, pool, ckpt_root
        self.cache: dict[str, dict[str, dict]] = cache or {}  # digest -> cache_key -> result
        self.pending: list[tuple[str, str, str, dict, Future]] = []
        self.recorded: set[tuple[str, str]] = set()
        self.fresh: dict[str, dict[str, dict]] = {}

    def checkout(self, version: str) -> tuple[Path, str]:
        out = self.ckpt_root / version
        r = self.bank.checkout(version, out)
        return out, r["digest"]

    def submit(self, version: str, digest: str, ckpt: Path, spec: dict) -> None:
        key = cache_key(spec)
        if key in self.cache.get(digest, {}):
            f: Future = Future()
            f.set_result(self.cache[digest][key])
        else:
            inflight = [x for x in self.pending if x[1] == digest and x[2] == key]
            f = inflight[0][4] if inflight else self.pool.submit(
                _eval_job, str(ckpt), spec, spec["episodes"], spec["seeds"])
        self.pending.append((version, digest, key, spec, f))

    def collect(self) -> dict[str, dict[str, list[dict]]]:
        """{version: {split key: [results]}}, recording every result in the bank."""
        out: dict[str, dict[str, list[dict]]] = {}
        for version, digest, key, spec, f in self.pending:
            res = f.result()
            self.cache.setdefault(digest, {})[key] = res
            self.fresh.setdefault(digest, {})[key] = res
            out.setdefault(version, {}).setdefault(spec["key"], []).append(res)
            if version != EXPERT and (version, key) not in self.recorded:
                self.recorded.add((version, key))
                n = len(spec["tasks"]) * spec["episodes"]
                for seed, value in zip(res["seeds"], res["per_seed"]):
                    self.bank.record_eval(version, suite_name(spec), res["label"], float(value),
                                          episodes=n, seed=int(seed))
        self.pending = []
        return out


def summarise(by_key: dict[str, list[dict]]) -> dict:
    return {k: combine(v) for k, v in by_key.items()}


# ----------------------------------------------------------------------------- bank helpers

def open_bank(out: Path):
    from skillbank.api import Bank

    return Bank.open(out / "bank")


def fresh_branch(bank, name: str, ref: str = "v0") -> None:
    """A branch at `ref`: created, or (a rerun of the stage) rolled back there, which the reflog keeps."""
    if any(b["name"] == name for b in bank.branches()):
        bank.rollback(ref, branch=name, force=True)
    else:
        bank.create_branch(name, ref)


def demos_info(path: Path) -> dict:
    from skillbank.train.demos import demos_digest, dvc_info

    return {"uri": str(path), "digest": demos_digest(path), **dvc_info(path)}


def add_version(bank, skill: str, finetuned: Path, alpha, branch: str, parent: str, run: dict,
                demos: dict, message: str) -> dict:
    """Merge `finetuned` into `parent` at `alpha` on `branch` (which must be at `parent`)."""
    r = bank.add_skill(skill, str(finetuned), alpha, from_ref=parent, branch=branch, demos=demos,
                       trainer=run["trainer"], trainer_settings={"settings": run["settings"],
                                                                 "metrics": run["metrics"]},
                       message=message)
    return {"version": r["version"], "parent": r["parent"], "branch": r["branch"], "alpha": alpha,
            "rel_norm": r.get("rel_norm"), "digest": bank.resolve(r["version"]).digest}


def train_settings(p: dict, **extra) -> dict:
    s = {"seed": p["seed"], **p["finetune"], **extra}
    s.setdefault("log_every", 100)
    return s


# ----------------------------------------------------------------------------- stage: demos

def stage_demos(p: dict, out: Path) -> dict:
    from skillbank.envs.metaworld import generate_demos
    from skillbank.train.demos import demos_digest

    d = p["demos"]
    root = fresh_dir(out / "demos")
    t0 = time.perf_counter()
    path, n = generate_demos(d["pretrain_tasks"], d["pretrain_per_task"], root / "pretrain", seed=p["seed"],
                             max_steps=d["max_steps"])
    summary = {"pretrain": {"tasks": d["pretrain_tasks"], "per_task": d["pretrain_per_task"], "episodes": n,
                            "ranges": "task defaults (full)", "digest": demos_digest(path),
                            "seconds": round(time.perf_counter() - t0, 1)}}
    log(f"demos: pretraining pool, {n} episodes of {len(d['pretrain_tasks'])} tasks")
    for k, target in enumerate(p["use_targets"]):
        t = p["targets"][target]
        path, n = generate_demos(target, d["target_episodes"], root / target, obj_range=rng(t["id"]["obj"]),
                                 goal_range=rng(t["id"].get("goal")), seed=p["seed"] + 1000 + k,
                                 max_steps=d["max_steps"])
        summary[target] = {"episodes": n, "obj_range": t["id"]["obj"], "goal_range": t["id"].get("goal"),
                           "digest": demos_digest(path)}
    counts = ", ".join(f"{t} {summary[t]['episodes']}" for t in p["use_targets"])
    log(f"demos: ID episodes: {counts}")
    write_json(root / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- stage: pretrain

def stage_pretrain(p: dict, out: Path) -> dict:
    import subprocess

    from skillbank.policies.reference import RefPolicyConfig
    from skillbank.train.finetune import pretrain
    from skillbank.train.trainer import TrainSettings

    root = fresh_dir(out / "pretrain")
    settings = TrainSettings.from_dict({"seed": p["seed"], "log_every": 200, **p["pretrain"]})
    t0 = time.perf_counter()
    run = pretrain(out / "demos" / "pretrain", root / "base", RefPolicyConfig(**p["policy"]), settings,
                   progress=False)
    secs = time.perf_counter() - t0
    m = run["metrics"]
    log(f"pretrain: {m['steps']} steps in {secs:.0f} s, loss {m['loss_first']:.4f} -> {m['loss_final']:.4f}")
    bank_dir = out / "bank"
    if bank_dir.exists():
        shutil.rmtree(bank_dir)
    # The CLI, as a lab would run it: a bank with its SQLite database inside OUT/bank.
    cmd = [sys.executable, "-c", "from skillbank.cli import main; main()", "--bank", str(bank_dir),
           "init", "--base", str(root / "base"), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"error: skillbank init failed: {r.stderr.strip()}")
    init = json.loads(r.stdout)
    summary = {"settings": run["settings"], "config": {k: v for k, v in run["config"].items()
                                                       if k not in ("obs_mean", "obs_std", "action_min",
                                                                    "action_max")},
               "metrics": m, "demos": run["demos"], "seconds": round(secs, 1), "bank": init}
    write_json(root / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- stage: compare

def choose_alpha(points: list[dict]) -> float:
    """Best OOD val success; ties go to the higher ID success, then to the larger alpha."""
    best = max(points, key=lambda q: (round(q["OOD_val"], 9), round(q["ID"], 9), q["alpha"]))
    return best["alpha"]


def stage_compare(p: dict, out: Path) -> dict:
    root = out / "compare"
    if root.exists():
        shutil.rmtree(root)
    (root / "ckpt").mkdir(parents=True)
    bank = open_bank(out)
    alphas = [float(a) for a in p["alphas"]]
    gen = generalist_split(p)
    t0 = time.perf_counter()
    with make_pool(p["workers"]) as pool:
        ev = Evaluator(bank, pool, root / "ckpt")
        base_dir, base_digest = ev.checkout("v0")

        # 1. finetune every target twice from v0: on its demos alone, and co-finetuned
        jobs = {}
        for target in p["use_targets"]:
            demos = out / "demos" / target
            for variant in VARIANTS:
                extra = {"cofinetune": str(out / "demos" / "pretrain"), "mix": p["cofinetune_mix"]} \
                    if variant == "co" else {}
                jobs[target, variant] = pool.submit(_finetune_job, str(base_dir), str(demos),
                                                    str(root / "ft" / target / variant), train_settings(p, **extra))
        runs = {k: f.result() for k, f in jobs.items()}
        log(f"compare: {len(runs)} finetunes in {time.perf_counter() - t0:.0f} s")

        # 2. every sweep point is a version on its own branch from v0
        versions: dict[str, dict] = {}
        for target in p["use_targets"]:
            info = demos_info(out / "demos" / target)
            for variant in VARIANTS:
                for a in alphas:
                    branch = f"compare/{target}/{variant}-ft-a{fmt_alpha(a)}"
                    fresh_branch(bank, branch)
                    versions[f"{target}|{variant}|{fmt_alpha(a)}"] = add_version(
                        bank, target, root / "ft" / target / variant, a, branch, "v0", runs[target, variant], info,
                        f"{target}: {variant}-finetune merged into v0 at alpha {fmt_alpha(a)}")

        # 3. evaluate the base and every sweep point
        for target in p["use_targets"]:
            for spec in target_splits(p, target):
                ev.submit("v0", base_digest, base_dir, spec)
        ev.submit("v0", base_digest, base_dir, gen)
        for target in p["use_targets"]:  # the scripted expert: what a perfect policy would score
            for spec in target_splits(p, target):
                ev.submit(EXPERT, EXPERT, Path(EXPERT), spec)
        ev.submit(EXPERT, EXPERT, Path(EXPERT), gen)
        for key, v in versions.items():
            target = key.split("|")[0]
            ckpt, _ = ev.checkout(v["version"])
            for spec in [*target_splits(p, target), gen]:
                ev.submit(v["version"], v["digest"], ckpt, spec)
        results = ev.collect()
        log(f"compare: base and {len(versions)} sweep versions evaluated ({time.perf_counter() - t0:.0f} s)")

        # 4. alpha on OOD val; 5. the per-group merge at the chosen alpha
        per_target = {}
        for target in p["use_targets"]:
            sweep = {}
            for variant in VARIANTS:
                pts = []
                for a in alphas:
                    v = versions[f"{target}|{variant}|{fmt_alpha(a)}"]
                    s = summarise(results[v["version"]])
                    pts.append({"alpha": a, "version": v["version"], **{k: s[k]["mean"] for k in SPLIT_KEYS}})
                sweep[variant] = {"points": pts, "chosen": choose_alpha(pts)}
            per_target[target] = {"sweep": sweep}
            pg = p["per_group"]
            a_lang = sweep["task"]["chosen"] if pg["language"] == "chosen" else float(pg["language"])
            spec = f"vision={fmt_alpha(pg['vision'])},language={fmt_alpha(a_lang)},action={fmt_alpha(pg['action'])}"
            branch = f"compare/{target}/task-ft-{spec.replace('=', '').replace(',', '-')}"
            fresh_branch(bank, branch)
            v = add_version(bank, target, root / "ft" / target / "task", spec, branch, "v0", runs[target, "task"],
                            demos_info(out / "demos" / target), f"{target}: task-finetune merged into v0 at {spec}")
            versions[f"{target}|lang"] = v
            per_target[target]["per_group_alpha"] = spec
            ckpt, _ = ev.checkout(v["version"])
            for s in [*target_splits(p, target), gen]:
                ev.submit(v["version"], v["digest"], ckpt, s)
        results.update(ev.collect())
    log(f"compare: done in {time.perf_counter() - t0:.0f} s")

    # 6. the table rows, per target
    for target in p["use_targets"]:
        row = {}
        base_res = {k: [r for r in rs if k == "generalist" or r["tasks"] == [target]]
                    for k, rs in results["v0"].items()}
        row["base"] = {"version": "v0", **summarise(base_res)}
        sw = per_target[target]["sweep"]
        for variant, method in VARIANTS.items():
            v = versions[f"{target}|{variant}|1"]
            row[method] = {"version": v["version"], "alpha": 1.0, **summarise(results[v["version"]])}
            a = sw[variant]["chosen"]
            v = versions[f"{target}|{variant}|{fmt_alpha(a)}"]
            row[f"retain_{method}"] = {"version": v["version"], "alpha": a, **summarise(results[v["version"]])}
        v = versions[f"{target}|lang"]
        row["retain_task_ft_lang"] = {"version": v["version"], "alpha": per_target[target]["per_group_alpha"],
                                      **summarise(results[v["version"]])}
        exp_res = {k: [r for r in rs if k == "generalist" or r["tasks"] == [target]]
                   for k, rs in results[EXPERT].items()}
        row["expert"] = {"version": "—", **summarise(exp_res)}
        per_target[target]["methods"] = row
        per_target[target]["finetune"] = {variant: {"seconds": runs[target, variant]["seconds"],
                                                    "loss_final": runs[target, variant]["metrics"]["loss_final"]}
                                          for variant in VARIANTS}
    summary = {"targets": p["use_targets"], "alphas": alphas, "per_target": per_target,
               "versions": versions, "raw": results, "eval_cache": ev.fresh,
               "seconds": round(time.perf_counter() - t0, 1)}
    write_json(root / "results.json", summary)
    bank.close()
    return summary


# ----------------------------------------------------------------------------- stage: continual

def stage_continual(p: dict, out: Path) -> dict:
    root = out / "continual"
    if root.exists():
        shutil.rmtree(root)
    (root / "ckpt").mkdir(parents=True)
    cmp = read_json(out / "compare" / "results.json")
    bank = open_bank(out)
    gen = generalist_split(p)
    arms = {"retain": "continual/retain", "seq_ft": "continual/seq-ft"}
    for branch in arms.values():
        fresh_branch(bank, branch)
    t0 = time.perf_counter()
    steps = []
    with make_pool(p["workers"]) as pool:
        # Results of weights the compare stage already evaluated (same digest, same split) are reused.
        ev = Evaluator(bank, pool, root / "ckpt", cache=copy.deepcopy(cmp["eval_cache"]))
        v0_dir = ev.checkout("v0")[0]
        parents = {arm: v0_dir for arm in arms}
        learned: list[str] = []
        for n, target in enumerate(p["use_targets"], start=1):
            alpha = cmp["per_target"][target]["sweep"]["task"]["chosen"]
            demos = out / "demos" / target
            info = demos_info(demos)
            # finetune each arm's current version (both are v0 at step 1: one finetune serves both)
            jobs = {}
            for arm in arms:
                same = n == 1 and arm == "seq_ft"
                jobs[arm] = jobs["retain"] if same else pool.submit(
                    _finetune_job, str(parents[arm]), str(demos), str(root / "ft" / f"{n}-{target}" / arm),
                    train_settings(p))
            runs = {arm: f.result() for arm, f in jobs.items()}
            learned.append(target)
            step = {"step": n, "skill": target, "alpha": alpha, "arms": {}}
            for arm, branch in arms.items():
                ft_dir = root / "ft" / f"{n}-{target}" / ("retain" if n == 1 else arm)
                a = alpha if arm == "retain" else 1.0
                v = add_version(bank, target, ft_dir, a, branch, branch, runs[arm], info,
                                f"continual step {n} ({arm}): {target} at alpha {fmt_alpha(a)}")
                ckpt, _ = ev.checkout(v["version"])
                parents[arm] = ckpt
                step["arms"][arm] = {"version": v["version"], "alpha": a, "digest": v["digest"]}
                ev.submit(v["version"], v["digest"], ckpt, gen)
                for skill in learned:
                    spec = target_splits(p, skill)[0]  # ID
                    ev.submit(v["version"], v["digest"], ckpt, dict(spec, key=f"ID:{skill}"))
            res = ev.collect()
            for arm, info_ in step["arms"].items():
                s = summarise(res[info_["version"]])
                info_["generalist"] = s["generalist"]
                info_["ID"] = {skill: s[f"ID:{skill}"] for skill in learned}
                ids = [s[f"ID:{skill}"]["mean"] for skill in learned]
                info_["ID_mean"] = sum(ids) / len(ids)
                info_["ID_earlier_mean"] = (sum(ids[:-1]) / (len(ids) - 1)) if len(ids) > 1 else None
            steps.append(step)
            log(f"continual: step {n} ({target}) done ({time.perf_counter() - t0:.0f} s)")
    summary = {"targets": p["use_targets"], "arms": arms, "steps": steps,
               "seconds": round(time.perf_counter() - t0, 1)}
    write_json(root / "results.json", summary)
    bank.close()
    return summary


# ----------------------------------------------------------------------------- stage: report

def _avg(rows: list[dict]) -> dict:
    """Average of several targets' results: per seed, the mean over targets; CI over seeds."""
    from skillbank.envs.metaworld import t_interval

    per_seed = [sum(v) / len(v) for v in zip(*(r["per_seed"] for r in rows))]
    lo, hi = t_interval(per_seed) if len(per_seed) >= 2 else (min(r["ci95"][0] for r in rows),
                                                              max(r["ci95"][1] for r in rows))
    return {"mean": sum(per_seed) / len(per_seed), "ci95": [lo, hi], "per_seed": per_seed}


def _cell(x: dict | None) -> str:
    if x is None:
        return "—"
    lo, hi = x["ci95"]
    return f"{x['mean']:.2f} [{lo:.2f}, {hi:.2f}]"


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def stage_report(p: dict, out: Path, timings: dict) -> dict:
    cmp = read_json(out / "compare" / "results.json")
    cont = read_json(out / "continual" / "results.json")
    targets = cmp["targets"]
    pt = cmp["per_target"]
    avg = {m: {k: _avg([pt[t]["methods"][m][k] for t in targets]) for k in SPLIT_KEYS} for m in METHODS}
    metrics = {
        "mode": p["mode"], "targets": targets,
        "methods": {m: {k: {"mean": _r(avg[m][k]["mean"]), "lo": _r(avg[m][k]["ci95"][0]),
                            "hi": _r(avg[m][k]["ci95"][1])} for k in SPLIT_KEYS} for m in METHODS},
        "per_target": {t: {"alpha": {"retain_task_ft": pt[t]["sweep"]["task"]["chosen"],
                                     "retain_co_ft": pt[t]["sweep"]["co"]["chosen"],
                                     "retain_task_ft_lang": pt[t]["per_group_alpha"]},
                           "methods": {m: {k: _r(pt[t]["methods"][m][k]["mean"]) for k in SPLIT_KEYS}
                                       for m in METHODS}} for t in targets},
        "alpha_sweep": {t: {v: {fmt_alpha(q["alpha"]): {k: _r(q[k]) for k in SPLIT_KEYS}
                                for q in pt[t]["sweep"][v]["points"]} for v in VARIANTS} for t in targets},
        "continual": {arm: {f"step_{s['step']}": {
            "skill": s["skill"], "version": s["arms"][arm]["version"],
            "generalist": _r(s["arms"][arm]["generalist"]["mean"]),
            "ID_mean": _r(s["arms"][arm]["ID_mean"]), "ID_earlier_mean": _r(s["arms"][arm]["ID_earlier_mean"]),
            "ID": {k: _r(v["mean"]) for k, v in s["arms"][arm]["ID"].items()}} for s in cont["steps"]}
            for arm in cont["arms"]},
        "episodes": {"seeds": p["eval"]["seeds"], "per_seed_id_ood": p["eval"]["episodes"],
                     "per_seed_generalist": p["eval"]["generalist_episodes"] * len(p["eval"]["generalist_tasks"])},
        "timings_s": timings,
    }
    write_json(out / "metrics.json", metrics)
    write_csv(out / "alpha_sweep.csv", pt, targets)
    (out / "results.md").write_text(results_md(p, cmp, cont, avg, timings))
    plot_ok = plot_sweep(out / "alpha_sweep.png", pt, targets, required=p["mode"] == "full")
    log(f"report: {out / 'results.md'}{'' if plot_ok else ' (no plot: matplotlib missing)'}")
    return metrics


def write_csv(path: Path, pt: dict, targets: list[str]) -> None:
    lines = ["target,variant,alpha,ID,OOD_val,OOD_test,generalist"]
    for t in targets:
        base = pt[t]["methods"]["base"]
        for v in VARIANTS:
            lines.append(f"{t},{v},0," + ",".join(f"{base[k]['mean']:.4f}" for k in SPLIT_KEYS))
            for q in pt[t]["sweep"][v]["points"]:
                lines.append(f"{t},{v},{q['alpha']:g}," + ",".join(f"{q[k]:.4f}" for k in SPLIT_KEYS))
    path.write_text("\n".join(lines) + "\n")
    # The mean over targets, one row per alpha (the dvc plot): alpha 0 is the base.
    alphas = [0.0] + [q["alpha"] for q in pt[targets[0]]["sweep"]["task"]["points"]]
    cols = [f"{v}_{k}" for v in VARIANTS for k in SPLIT_KEYS]
    rows = ["alpha," + ",".join(cols)]
    for i, a in enumerate(alphas):
        vals = []
        for v in VARIANTS:
            for k in SPLIT_KEYS:
                xs = [pt[t]["methods"]["base"][k]["mean"] if i == 0 else pt[t]["sweep"][v]["points"][i - 1][k]
                      for t in targets]
                vals.append(f"{sum(xs) / len(xs):.4f}")
        rows.append(f"{a:g}," + ",".join(vals))
    (path.parent / "alpha_sweep_avg.csv").write_text("\n".join(rows) + "\n")


def results_md(p: dict, cmp: dict, cont: dict, avg: dict, timings: dict) -> str:
    targets = cmp["targets"]
    pt = cmp["per_target"]
    ev = p["eval"]
    L = [f"# Meta-World RETAIN benchmark — {p['mode']} mode", "",
         (f"Targets: {', '.join(targets)}. Success rate, mean over {len(ev['seeds'])} evaluation seed(s) "
          f"[95% interval over seeds]; {ev['episodes']} episodes per seed on ID, on OOD val and on OOD test "
          f"(split evenly over its variations, whose mean it reports), {ev['generalist_episodes']} per task "
          f"and seed on {len(ev['generalist_tasks'])} generalist tasks. Alpha is chosen on OOD val."), "",
         "## Averaged over the targets", "",
         "| method | ID | generalist | OOD val | OOD test |", "|---|---|---|---|---|"]
    for m in METHODS:
        a = avg[m]
        L.append(f"| {METHOD_NAMES[m]} | {_cell(a['ID'])} | {_cell(a['generalist'])} | {_cell(a['OOD_val'])} | "
                 f"{_cell(a['OOD_test'])} |")
    L += ["", "## Per target", ""]
    for t in targets:
        tt = p["targets"][t]
        L += [f"### {t}", "",
              (f"ID range obj {tt['id']['obj']}, goal {tt['id'].get('goal')}; OOD val `{tt['ood_val']['name']}` "
               f"obj {tt['ood_val']['obj']}, goal {tt['ood_val'].get('goal')}; OOD test {', '.join(tt['ood_test'])}."),
              "", "| method | version | alpha | ID | generalist | OOD val | OOD test |", "|---|---|---|---|---|---|---|"]
        for m in METHODS:
            r = pt[t]["methods"][m]
            alpha = "—" if m in ("base", "expert") else (r["alpha"] if isinstance(r["alpha"], str) else fmt_alpha(r["alpha"]))
            L.append(f"| {METHOD_NAMES[m]} | {r['version']} | {alpha} | {_cell(r['ID'])} | {_cell(r['generalist'])} | "
                     f"{_cell(r['OOD_val'])} | {_cell(r['OOD_test'])} |")
        L += ["", "Alpha sweep (alpha 0 is the base; chosen on OOD val, ties to higher ID, then larger alpha):", "",
              "| variant | alpha | version | ID | generalist | OOD val | OOD test |", "|---|---|---|---|---|---|---|"]
        base = pt[t]["methods"]["base"]
        for v in VARIANTS:
            L.append(f"| {v}-FT | 0 | v0 | {base['ID']['mean']:.2f} | {base['generalist']['mean']:.2f} | "
                     f"{base['OOD_val']['mean']:.2f} | {base['OOD_test']['mean']:.2f} |")
            for q in pt[t]["sweep"][v]["points"]:
                mark = " **(chosen)**" if q["alpha"] == pt[t]["sweep"][v]["chosen"] else ""
                L.append(f"| {v}-FT | {q['alpha']:g}{mark} | {q['version']} | {q['ID']:.2f} | {q['generalist']:.2f} | "
                         f"{q['OOD_val']:.2f} | {q['OOD_test']:.2f} |")
        L.append("")
    L += ["## Continual: the targets in sequence", "",
          ("Each step finetunes the arm's current version on the next target's demos. RETAIN merges the "
           "finetune into its parent at that target's chosen RETAIN-task-FT alpha; sequential finetuning "
           "keeps the finetune (alpha 1)."), "",
          "| step | skill | arm | version | generalist | ID, this skill | ID, earlier skills (mean) | ID per skill |",
          "|---|---|---|---|---|---|---|---|"]
    for s in cont["steps"]:
        for arm, name in (("retain", f"RETAIN (alpha {fmt_alpha(s['alpha'])})"), ("seq_ft", "sequential FT")):
            a = s["arms"][arm]
            per = ", ".join(f"{k.removesuffix('-v3')} {v['mean']:.2f}" for k, v in a["ID"].items())
            earlier = "—" if a["ID_earlier_mean"] is None else f"{a['ID_earlier_mean']:.2f}"
            L.append(f"| {s['step']} | {s['skill']} | {name} | {a['version']} | {_cell(a['generalist'])} | "
                     f"{_cell(a['ID'][s['skill']])} | {earlier} | {per} |")
    base = pt[targets[0]]["methods"]["base"]["generalist"]
    L += ["", f"Base (v0) generalist: {_cell(base)}.", "", "## Timings (seconds)", "",
          "| stage | seconds |", "|---|---|"]
    L += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    return "\n".join(L) + "\n"


def plot_sweep(path: Path, pt: dict, targets: list[str], required: bool) -> bool:
    """Success vs alpha: a row per finetuning variant, a column per target and one for their mean."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        msg = ("matplotlib is not installed, so alpha_sweep.png cannot be drawn: pip install 'matplotlib>=3.7' "
               "(metrics.json, results.md and alpha_sweep.csv are written)")
        if required:
            sys.exit(f"error: {msg}")
        print(f"warning: {msg}", file=sys.stderr)
        return False
    colours = {"ID": "tab:blue", "OOD_val": "tab:orange", "OOD_test": "tab:red", "generalist": "tab:green"}
    cols = targets + (["mean over targets"] if len(targets) > 1 else [])
    fig, axes = plt.subplots(len(VARIANTS), len(cols), figsize=(3.6 * len(cols), 5.6), squeeze=False,
                             sharex=True, sharey=True)
    for i, v in enumerate(VARIANTS):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            group = targets if col not in targets else [col]
            xs = [0.0] + [q["alpha"] for q in pt[group[0]]["sweep"][v]["points"]]
            for k in SPLIT_KEYS:
                ys = [sum(pt[t]["methods"]["base"][k]["mean"] for t in group) / len(group)]
                ys += [sum(pt[t]["sweep"][v]["points"][n][k] for t in group) / len(group)
                       for n in range(len(xs) - 1)]
                ax.plot(xs, ys, marker="o", ms=3, color=colours[k], label=k.replace("_", " "))
            if col in targets:
                ax.axvline(pt[col]["sweep"][v]["chosen"], color="grey", ls="--", lw=0.8)
            ax.set_title(f"{col} ({v}-FT)", fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if i == len(VARIANTS) - 1:
                ax.set_xlabel("alpha")
        axes[i][0].set_ylabel("success rate")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("RETAIN alpha sweep on Meta-World (alpha = weight of the finetuned model; 0 = base; "
                 "dashed: alpha chosen on OOD val)", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="*", metavar="STAGE",
                    help=f"stages to run, in order (default: all): {', '.join(STAGES)}")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer tasks, demos, steps and episodes (minutes)")
    mode.add_argument("--smoke", action="store_true", help="a micro run for tests (about a minute)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default out/metaworld_<mode>)")
    ap.add_argument("--params", type=Path, default=HERE / "params.yaml")
    ap.add_argument("--workers", type=int, default=None, help="override the number of worker processes")
    args = ap.parse_args(argv)
    bad = [s for s in args.stages if s not in (*STAGES, "all")]
    if bad:
        ap.error(f"unknown stage {bad[0]!r} (choose from {', '.join(STAGES)}, all)")
    mode_name = "quick" if args.quick else "smoke" if args.smoke else "full"
    stages = list(STAGES) if not args.stages or "all" in args.stages else \
        [s for s in STAGES if s in args.stages]
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    p = load_params(args.params, mode_name)
    if args.workers is not None:
        p["workers"] = args.workers
    out = (args.out or Path("out") / f"metaworld_{mode_name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SKILLBANK_AUTHOR", "metaworld-retain")
    prev = out / "params.resolved.json"
    if prev.is_file() and json.loads(prev.read_text()).get("mode") != mode_name and stages[0] != "demos":
        sys.exit(f"error: {out} holds a {json.loads(prev.read_text())['mode']} run; use another --out")
    write_json(prev, p)
    tpath = out / "timings.json"
    timings = json.loads(tpath.read_text()) if tpath.is_file() else {}
    if stages[0] == "demos":
        timings = {}
    log(f"metaworld-retain ({mode_name}): {', '.join(stages)} -> {out}")
    t_all = time.perf_counter()
    from skillbank.errors import SkillbankError

    for stage in stages:
        t0 = time.perf_counter()
        try:
            if stage == "report":
                timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 1)
                stage_report(p, out, timings)
                continue
            {"demos": stage_demos, "pretrain": stage_pretrain, "compare": stage_compare,
             "continual": stage_continual}[stage](p, out)
        except SkillbankError as e:  # one clear line, as the skillbank CLI does
            print(f"error: {stage}: {e}", file=sys.stderr)
            return 1
        timings[stage] = round(time.perf_counter() - t0, 1)
        write_json(tpath, timings)
    log(f"done in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
