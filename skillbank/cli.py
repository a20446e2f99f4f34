"""The `skillbank` command: parse, call one Bank method, render (a rich table, or --json).

Exit codes: 0 success, 1 a user error (one line on stderr), 2 a usage error (click's own).
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import exc as sa_exc

from skillbank import __version__
from skillbank.api import Bank, upgrade_database
from skillbank.errors import SkillbankError
from skillbank.merge import Options
from skillbank.merge.plan import DEFAULT_CHUNK_MB

# Piped output is for grep and logs: wide enough that tables are not cut to 80 columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Ctx:
    def __init__(self, bank_dir: str, db_url: str | None):
        self.bank_dir = Path(bank_dir)
        self.db_url = db_url
        self._bank: Bank | None = None

    def bank(self) -> Bank:
        if self._bank is None:
            self._bank = Bank.open(self.bank_dir, self.db_url)
        return self._bank


def emit(data, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


@contextmanager
def progress_bar(label: str, total: int | None, quiet: bool):
    """A byte-counting rich bar on stderr, only for people: silent under --json or when piped."""
    if quiet or not sys.stderr.isatty() or not total:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


def parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", text.lower())
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MB")
    unit = (m[2] or "b").rstrip("b").rstrip("i")
    return int(float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit])


def table(title: str | None, columns: list[str], rows: list[list]) -> None:
    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    out.print(t)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def engine_options(f):
    """--chunk-mb and --device, shared by every command that streams weights."""
    f = click.option("--device", default="cpu", show_default=True,
                     help="Where merges are computed: cpu, cuda, cuda:N or auto (same bytes on each).")(f)
    f = click.option("--chunk-mb", default=DEFAULT_CHUNK_MB, show_default=True, type=click.FloatRange(min=0.1),
                     help="Work unit of the streaming engine; memory is a few chunks.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bank", "bank_dir", envvar="SKILLBANK_BANK", default=".skillbank", show_default=True,
              help="Bank directory (env SKILLBANK_BANK).")
@click.option("--db", "db_url", envvar="SKILLBANK_DB_URL", default=None,
              help="Database URL (env SKILLBANK_DB_URL); default: SQLite inside the bank.")
@click.version_option(__version__, prog_name="skillbank")
@click.pass_context
def cli(ctx: click.Context, bank_dir: str, db_url: str | None) -> None:
    """Version control for robot policies that learn skill by skill (RETAIN merges)."""
    ctx.obj = Ctx(bank_dir, db_url)


@cli.command()
@click.option("--base", required=True, help="Base weights: .safetensors, sharded dir, LeRobot dir or hf://repo[@rev].")
@click.option("-m", "--message", default=None)
@json_option
@click.pass_obj
def init(c: Ctx, base: str, message: str | None, as_json: bool) -> None:
    """Create a bank and import the base policy as v0 on branch main."""
    with progress_bar("importing base", _source_size(base), as_json) as prog:
        bank, info = Bank.init(c.bank_dir, base, c.db_url, message, prog)
    bank.close()
    emit(info, as_json, lambda d: out.print(
        f"initialised bank {d['bank']} at {c.bank_dir}: v0 on main "
        f"({d['tensors']} tensors, {d['params']:,} parameters, digest {d['digest'][:12]})"))


def _source_size(path: str) -> int | None:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return None


@cli.command("add-skill")
@click.argument("name")
@click.option("--finetuned", help="Weights finetuned from the parent (.safetensors, sharded dir, LeRobot dir, hf://).")
@click.option("--demos", help="Demonstrations to finetune on with the built-in trainer.")
@click.option("--alpha", default="0.8", show_default=True,
              help="Weight of the finetuned model: 0.8, or vision=1,language=0.7,action=1.")
@click.option("--from", "from_ref", default=None, help="Parent version (default HEAD).")
@click.option("--branch", default=None, help="Branch to hold the new version (created if new).")
@click.option("--codec", default="xor-zstd", show_default=True, help="Task-vector codec.")
@click.option("--groups", "groups_file", default=None, type=click.Path(dir_okay=False),
              help="Rules file (GROUP: REGEX per line) for per-group alphas.")
@click.option("--preset", default=None, help="Parameter-group preset (default: detected from key names).")
@click.option("--force", is_flag=True, help="Accept a checkpoint that looks unrelated to the parent.")
@click.option("--steps", type=int, default=None, help="--demos: training steps (built-in trainer).")
@click.option("--lr", type=float, default=None, help="--demos: learning rate.")
@click.option("--batch-size", type=int, default=None, help="--demos: batch size.")
@click.option("--seed", type=int, default=None, help="--demos: training seed.")
@click.option("--cofinetune", default=None, help="--demos: pretraining demos mixed into every batch.")
@click.option("--mix", type=float, default=None, help="--demos: share of each batch from --cofinetune.")
@click.option("--train-cmd", default=None, help="--demos: your trainer, with {parent}, {out}, {demos} filled in.")
@click.option("--val-suite", default=None, help="--alpha auto: suite whose OOD split picks alpha.")
@click.option("--episodes", type=int, default=10, show_default=True, help="--alpha auto: episodes per task and seed.")
@click.option("--seeds", default="0", show_default=True, help="--alpha auto: comma-separated eval seeds.")
@click.option("--plot", "plot_path", default=None, help="--alpha auto: where to save the sweep plot (PNG).")
@click.option("--keyframe", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Keep the new version whole in the store (auto: every 8 steps of a chain).")
@click.option("-m", "--message", default=None)
@engine_options
@json_option
@click.pass_obj
def add_skill(c: Ctx, name, finetuned, demos, alpha, from_ref, branch, codec, groups_file, preset, force,
              steps, lr, batch_size, seed, cofinetune, mix, train_cmd, val_suite, episodes, seeds, plot_path,
              keyframe, message, chunk_mb, device, as_json) -> None:
    """Register a skill, merge it into its parent, and advance the branch.

    With --demos, finetune the parent on them first (built-in trainer, or --train-cmd).
    """
    if bool(finetuned) == bool(demos):
        raise click.UsageError("give exactly one of --finetuned PATH or --demos PATH")
    bank = c.bank()
    common = dict(from_ref=from_ref, branch=branch, codec=codec, groups=groups_file, preset=preset, force=force,
                  message=message, options=Options(chunk_mb=chunk_mb, device=device), keyframe=keyframe)
    if demos:
        settings = {k: v for k, v in dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                           cofinetune=cofinetune, mix=mix).items() if v is not None}
        r = bank.add_skill_from_demos(name, demos, alpha, settings=settings, train_cmd=train_cmd,
                                      val_suite=val_suite, episodes=episodes, seeds=_int_list(seeds),
                                      plot=plot_path, progress=not as_json, **common)
    else:
        with progress_bar(f"adding {name}", _source_size(finetuned), as_json) as prog:
            r = bank.add_skill(name, finetuned, alpha, progress=prog, **common)
    emit(r, as_json, lambda d: out.print(
        f"{d['version']} on {d['branch']}: {d['skill']} (alpha {d['alpha']}) from {d['parent']}; "
        f"task vector {d['raw_bytes'] / max(d['stored_bytes'], 1):.2f}x smaller with {d['codec']}"))


@cli.command()
@click.argument("ref")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write the weights, config and model card here.")
@click.option("--max-shard-size", default=None, help="Shard the output, e.g. 5GB (default: as the base).")
@click.option("--verify-sha256", is_flag=True,
              help="Also check the rebuild against its recorded SHA-256 (catches forged xxh3 collisions).")
@engine_options
@json_option
@click.pass_obj
def checkout(c: Ctx, ref: str, out_dir: str | None, max_shard_size: str | None, verify_sha256: bool,
             chunk_mb: float, device: str, as_json: bool) -> None:
    """Make REF the HEAD; with --out, rebuild it and verify its digest."""
    bank = c.bank()
    size = bank.resolve(ref).n_bytes if out_dir else None
    with progress_bar(f"rebuilding {ref}", size, as_json) as prog:
        r = bank.checkout(ref, out_dir, max_shard_size=parse_size(max_shard_size), progress=prog,
                          options=Options(chunk_mb=chunk_mb, device=device), verify_sha256=verify_sha256)
    def render(d):
        if out_dir:
            checks = f"digest {d['digest'][:12]}" + (f" and SHA-256 {d['sha256'][:12]}" if d["sha256_verified"] else "")
            out.print(f"wrote {d['version']} to {d['out']} ({len(d['files'])} file(s), {checks} verified)")
        out.print(f"HEAD is now {d['head']}")
    emit(r, as_json, render)


@cli.command()
@click.argument("ref", required=False)
@json_option
@click.pass_obj
def log(c: Ctx, ref: str | None, as_json: bool) -> None:
    """History from REF (default HEAD) back to the base, newest first."""
    rows = c.bank().log(ref)
    emit(rows, as_json, lambda d: table(None, ["version", "parent", "skill", "alpha", "evals", "digest", "refs",
                                               "created"],
                                        [[r["version"], (r["parent"] or "") + (f"+{r['second_parent']}" if r.get("second_parent") else ""),
                                          (r["skill"] + (" (revoked)" if r.get("revoked") else "")) if r["skill"]
                                          else "(merge)" if r.get("second_parent") else "(base)", r["alpha"],
                                          " ".join(f"{k} {v:.2f}" for k, v in r["evals"].items()),
                                          r["digest"][:12], ", ".join(r["refs"]), r["created_at"]] for r in d]))


@cli.command()
@click.argument("ref")
@json_option
@click.pass_obj
def show(c: Ctx, ref: str, as_json: bool) -> None:
    """One version in full: recipe, skill, task vector, evals."""
    d = c.bank().show(ref)

    def render(d):
        out.print(f"[bold]{d['version']}[/bold]  parent {d['parent']}  digest {d['digest']}")
        out.print(f"  sha256 {d['sha256'] or '- (not recorded: run `skillbank db backfill-sha256`)'}")
        if d.get("second_parent"):
            out.print(f"  merge: second parent {d['second_parent']}")
        if d.get("rebuilt_from"):
            out.print(f"  rebuilt from {d['rebuilt_from']} (a skill below was removed; evals must be re-run)")
        if d.get("revoked"):
            out.print(f"  [red]REVOKED[/red] skill: {d['revoked_reason']}")
        out.print(f"  refs: {', '.join(d['refs']) or '-'}   author: {d['author']}   at {d['created_at']}")
        out.print(f"  {d['params']:,} parameters, {d['bytes']:,} bytes; method {d['method']}")
        if d.get("source"):
            out.print(f"  source: {d['source']}")
        if d.get("skill_detail"):
            sk, tv = d["skill_detail"], d["task_vector"]
            out.print(f"  skill {sk['name']} with alpha {d['alpha']} (groups: {d['group_preset']})")
            out.print(f"  finetuned: {sk['finetuned_source']} ({sk['finetuned_digest'][:12]}), trainer {sk['trainer']}")
            if sk["demos"]["uri"]:
                out.print(f"  demos: {sk['demos']['uri']} ({sk['demos']['digest']})")
            out.print(f"  task vector: {tv['codec']}, {tv['stored_bytes']:,} of {tv['raw_bytes']:,} bytes "
                      f"({tv['ratio']:.2f}x), rel. norm {tv['rel_norm']:.4f}, rel. error {tv['rel_error']:.2g}")
        for e in d["evals"]:
            out.print(f"  eval {e['suite']} {e['split']} {e['metric']} = {e['value']:.3f} ({e['episodes']} episodes)")
        if d.get("message"):
            out.print(f"  {d['message']}")
    emit(d, as_json, render)


@cli.command()
@click.argument("name", required=False)
@click.argument("ref", required=False)
@json_option
@click.pass_obj
def branch(c: Ctx, name: str | None, ref: str | None, as_json: bool) -> None:
    """List branches, or create NAME at REF (default HEAD)."""
    bank = c.bank()
    if name is None:
        emit(bank.branches(), as_json, lambda d: table(None, ["", "branch", "version"],
                                                       [["*" if r["current"] else "", r["name"], r["version"]] for r in d]))
        return
    r = bank.create_branch(name, ref)
    emit(r, as_json, lambda d: out.print(f"created branch {d['name']} at {d['version']}"))


@cli.command()
@click.argument("name", required=False)
@click.argument("ref", required=False)
@json_option
@click.pass_obj
def tag(c: Ctx, name: str | None, ref: str | None, as_json: bool) -> None:
    """List tags, or tag REF as NAME."""
    bank = c.bank()
    if name is None:
        emit(bank.tags(), as_json, lambda d: table(None, ["tag", "version"], [[r["name"], r["version"]] for r in d]))
        return
    if ref is None:
        raise click.UsageError("tag NAME REF: give the version to tag")
    r = bank.create_tag(name, ref)
    emit(r, as_json, lambda d: out.print(f"tagged {d['version']} as {d['name']}"))


@cli.command()
@click.argument("ref")
@click.option("--branch", "branch_name", default=None, help="Branch to move (default: HEAD's branch).")
@click.option("--force", is_flag=True, help="Move even when REF is not an ancestor of the branch.")
@json_option
@click.pass_obj
def rollback(c: Ctx, ref: str, branch_name: str | None, force: bool, as_json: bool) -> None:
    """Move a branch back to REF; history is kept and the move is logged."""
    r = c.bank().rollback(ref, branch_name, force)
    emit(r, as_json, lambda d: out.print(f"{d['branch']}: {d['from']} -> {d['to']}"))


@cli.command()
@click.argument("ref", required=False)
@click.option("-n", "limit", default=50, show_default=True)
@json_option
@click.pass_obj
def reflog(c: Ctx, ref: str | None, limit: int, as_json: bool) -> None:
    """Every move of the branches and tags, newest first."""
    rows = c.bank().reflog(ref, limit)
    emit(rows, as_json, lambda d: table(None, ["ref", "old", "new", "action", "message", "author", "at"],
                                        [[r["ref"], r["old"], r["new"], r["action"], r["message"], r["author"],
                                          r["created_at"]] for r in d]))


@cli.command()
@click.option("--out", "out_path", default=None, help="lineage.svg, lineage.png or lineage.mmd (default: Mermaid on stdout).")
@json_option
@click.pass_obj
def graph(c: Ctx, out_path: str | None, as_json: bool) -> None:
    """Draw the version DAG: skills, alphas, branches, tags, keyframes and eval scores."""
    r = c.bank().graph(out_path)
    emit(r, as_json, lambda d: click.echo(d["mermaid"], nl=False) if d["out"] is None
         else out.print(f"wrote {d['out']} ({d['versions']} versions)"))


@cli.command("eval")
@click.argument("ref")
@click.option("--suite", required=True, help="metaworld:TASK[,TASK][?ood=VAR&generalist=mt10|none|t1+t2]")
@click.option("--episodes", type=int, default=10, show_default=True, help="Episodes per task and seed.")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--no-record", is_flag=True, help="Print the results without storing them.")
@json_option
@click.pass_obj
def eval_cmd(c: Ctx, ref, suite, episodes, seeds, no_record, as_json) -> None:
    """Evaluate a version of the reference policy in Meta-World (ID / OOD / generalist)."""
    r = c.bank().evaluate(ref, suite, episodes=episodes, seeds=_int_list(seeds), record=not no_record)
    emit(r, as_json, lambda d: table(f"{d['version']} on {d['suite']}", ["split", "success", "95% CI", "episodes"],
                                     [[x["label"], f"{x['success_rate']:.3f}",
                                       f"[{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}]", x["episodes"]]
                                      for x in d["results"]]))


@cli.command("record-eval")
@click.argument("ref")
@click.option("--suite", required=True, help="e.g. metaworld:pick-place-v3 or libero:pot-on-stove")
@click.option("--split", required=True, help="ID, OOD, generalist, or your own name")
@click.option("--value", required=True, type=float)
@click.option("--metric", default="success_rate", show_default=True)
@click.option("--episodes", type=int, default=None)
@click.option("--seed", type=int, default=None)
@json_option
@click.pass_obj
def record_eval(c: Ctx, ref, suite, split, value, metric, episodes, seed, as_json) -> None:
    """Record an evaluation measured elsewhere against a version."""
    r = c.bank().record_eval(ref, suite, split, value, metric=metric, episodes=episodes, seed=seed)
    emit(r, as_json, lambda d: out.print(f"{d['version']}: {d['suite']} {d['split']} {d['metric']} = {d['value']:g}"))


@cli.command()
@click.argument("path")
@click.option("--require-skill", multiple=True, help="Exit 3 unless the checkpoint contains this skill.")
@click.option("--forbid-skill", multiple=True, help="Exit 3 if the checkpoint contains this skill.")
@click.option("--min-alpha", default=0.05, show_default=True, help="Smallest estimated alpha that counts as containing a skill.")
@click.option("--forbid-revoked", is_flag=True, help="Exit 3 if the checkpoint contains a revoked skill.")
@json_option
@click.pass_obj
def audit(c: Ctx, path: str, require_skill, forbid_skill, min_alpha: float, forbid_revoked: bool,
          as_json: bool) -> None:
    """Which version and skills a checkpoint contains (exact by digest, else estimated)."""
    r = c.bank().audit(path, min_alpha=min_alpha)
    held = {sk["name"] for sk in r["skills"]}
    failures = [f"required skill {n!r} is not in the checkpoint" for n in require_skill if n not in held]
    failures += [f"forbidden skill {n!r} is in the checkpoint" for n in forbid_skill if n in held]
    if forbid_revoked:
        failures += [f"revoked skill {x['name']!r} is in the checkpoint ({x['reason']})" for x in r.get("revoked", [])]
    r["gate"] = {"ok": not failures, "failures": failures}

    def render(d):
        if d["match"] == "exact":
            out.print(f"exact: {d['version']} ({', '.join(d['refs']) or 'no refs'}), digest {d['digest']}, "
                      f"verified by {d['verified_by']}")
            for e in d["lineage"]:
                what = f"{e['skill']} alpha {e['alpha']}" if e.get("skill") else f"base {e['base']['source']}"
                out.print(f"  {e['version']}: {what}")
        elif d["match"] == "fuzzy":
            out.print(f"fuzzy: nearest {d['nearest']['version']} (relative distance {d['nearest']['distance']:.3g}); "
                      f"{d['residual']:.1%} of the change is unexplained")
            for sk in d["skills"]:
                out.print(f"  {sk['name']} ({sk['version']}): estimated alpha {sk['alpha']:.3f} "
                          f"(recorded {sk['recorded_alpha']})")
        else:
            near = d.get("nearest")
            out.print("none: " + (d.get("reason") or f"nearest {near['version']} at relative distance "
                                  f"{near['distance']:.3g}, {d['residual']:.1%} unexplained"))
    emit(r, as_json, render)
    for w in r.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    if not forbid_revoked:
        for x in r.get("revoked", []):
            click.echo(f"warning: the checkpoint contains revoked skill {x['name']!r} ({x['reason']})", err=True)
    for f in failures:
        click.echo(f"audit gate: {f}", err=True)
    if failures:
        sys.exit(3)


@cli.command()
@click.argument("ref")
@click.option("--unpin", is_flag=True, help="Stop keeping REF whole (it stays rebuildable from its chain).")
@engine_options
@json_option
@click.pass_obj
def pin(c: Ctx, ref: str, unpin: bool, chunk_mb: float, device: str, as_json: bool) -> None:
    """Keep REF whole in the store (a keyframe) so long chains rebuild from there."""
    bank = c.bank()
    if unpin:
        r = bank.unpin(ref)
    else:
        with progress_bar(f"pinning {ref}", bank.resolve(ref).n_bytes, as_json) as prog:
            r = bank.pin(ref, prog, Options(chunk_mb=chunk_mb, device=device))
    emit(r, as_json, lambda d: out.print(f"{d['version']} {'is now' if d['keyframe'] else 'is no longer'} a keyframe"))


@cli.command()
@click.option("--objects-only", is_flag=True, help="Check objects and manifests, skip rebuilding versions.")
@click.option("--repair", is_flag=True,
              help="First restore damaged or missing objects from the remotes (damaged copies go to lost+found/).")
@engine_options
@json_option
@click.pass_obj
def fsck(c: Ctx, objects_only: bool, repair: bool, chunk_mb: float, device: str, as_json: bool) -> None:
    """Check every object against its digest and rebuild every version to its digest."""
    bank = c.bank()
    total = 0 if objects_only else bank.rebuild_bytes()
    with progress_bar("rebuilding every version", total, as_json) as prog:
        r = bank.fsck(rebuild=not objects_only, progress=prog, options=Options(chunk_mb=chunk_mb, device=device),
                      repair=repair)

    def render(d):
        for x in d.get("repairs", []):
            how = {"repaired": f"from {x.get('source')}", "moved aside": x.get("detail")}.get(x["result"], x.get("detail"))
            moved = f"; the damaged copy is in {x['moved_to']}" if x.get("moved_to") else ""
            colour = "green" if x["result"] != "unrepairable" else "red"
            out.print(f"[{colour}]{x['result']}[/{colour}] object {x['object']} ({x['problem']}): "
                      + escape(f"{how}{moved}"))
        out.print(f"{d['objects']} objects, {d['versions']} versions ({d['rebuilt']} rebuilt and verified)")
        if d.get("sha256_missing"):
            out.print(f"{len(d['sha256_missing'])} version(s) without a SHA-256 (checked by xxh3 only): "
                      "run `skillbank db backfill-sha256`")
        for p in d["problems"]:
            affects = f"; affects {', '.join(p['versions']) or 'no version'}" if "versions" in p else ""
            out.print(f"[red]problem[/red] {p.get('version') or p.get('object')}: {p['problem']}{affects}")
        out.print("ok" if d["ok"] else f"{len(d['problems'])} problem(s)")
    emit(r, as_json, render)
    if not r["ok"]:
        sys.exit(1)


@cli.command()
@click.option("--grace", default=3600.0, show_default=True, help="Keep unreferenced objects younger than this (s).")
@click.option("--dry-run", is_flag=True)
@json_option
@click.pass_obj
def gc(c: Ctx, grace: float, dry_run: bool, as_json: bool) -> None:
    """Remove objects that no version references."""
    r = c.bank().gc(grace, dry_run)
    emit(r, as_json, lambda d: out.print(
        f"{'would remove' if d['dry_run'] else 'removed'} {d['removed']} object(s), "
        f"{d['bytes_freed']:,} bytes, {d['temp_files']} temp file(s)"))


@cli.group()
def db() -> None:
    """Database schema management."""


@db.command("upgrade")
@json_option
@click.pass_obj
def db_upgrade(c: Ctx, as_json: bool) -> None:
    """Migrate the bank's database to this skillbank's schema."""
    r = upgrade_database(c.bank_dir, c.db_url)

    def render(d):
        out.print(f"database schema: {d['from']} -> {d['to']}")
        if d["sha256_missing"]:
            out.print(f"{d['sha256_missing']} version(s) have no SHA-256 yet: run `skillbank db backfill-sha256`")
    emit(r, as_json, render)


@db.command("backfill-sha256")
@engine_options
@json_option
@click.pass_obj
def db_backfill_sha256(c: Ctx, chunk_mb: float, device: str, as_json: bool) -> None:
    """Rebuild every version without a SHA-256 (from before schema 0004) and record it."""
    bank = c.bank()
    with progress_bar("hashing versions", bank.rebuild_bytes(without_sha256=True), as_json) as prog:
        r = bank.backfill_sha256(progress=prog, options=Options(chunk_mb=chunk_mb, device=device))

    def render(d):
        out.print(f"recorded SHA-256 for {len(d['filled'])} of {d['missing']} version(s) without one")
        for p in d["problems"]:
            out.print(f"[red]problem[/red] {p['version']}: " + escape(p["problem"]))
    emit(r, as_json, render)
    if not r["ok"]:
        sys.exit(1)


# --- remotes / export: DVC remotes for objects, a second bank directory, Hugging Face Hub

@cli.group(invoke_without_command=True)
@json_option
@click.pass_context
def remote(ctx: click.Context, as_json: bool) -> None:
    """Object remotes (any DVC remote URL); `remote` alone lists them."""
    if ctx.invoked_subcommand is None:
        _remote_list(ctx.obj, as_json)


def _remote_list(c: Ctx, as_json: bool) -> None:
    emit(c.bank().remotes(), as_json, lambda d: table(None, ["", "remote", "url"],
                                                     [["*" if r["default"] else "", r["name"], r["url"]] for r in d]))


@remote.command("list")
@json_option
@click.pass_obj
def remote_list(c: Ctx, as_json: bool) -> None:
    """List the remotes (the default one is starred)."""
    _remote_list(c, as_json)


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--default", "make_default", is_flag=True, help="Make it the default (the first one added is).")
@json_option
@click.pass_obj
def remote_add(c: Ctx, name: str, url: str, make_default: bool, as_json: bool) -> None:
    """Add a remote: a local directory, s3://, gs://, azure://, ssh://, ... (through DVC)."""
    r = c.bank().remote_add(name, url, make_default)
    emit(r, as_json, lambda d: out.print(f"added remote {d['name']} -> {d['url']}" + (" (default)" if d["default"] else "")))


@remote.command("remove")
@click.argument("name")
@json_option
@click.pass_obj
def remote_remove(c: Ctx, name: str, as_json: bool) -> None:
    """Forget a remote (its objects stay where they are)."""
    r = c.bank().remote_remove(name)
    emit(r, as_json, lambda d: out.print(f"removed remote {d['name']}"))


@cli.command()
@click.argument("args", nargs=-1)
@click.option("--remote", "remote_name", default=None, help="Remote to push to (default: the default remote).")
@click.option("--revision", default=None, help="hf:// targets: the branch to commit to (default main).")
@click.option("--format", "fmt", type=click.Choice(["hf", "lerobot"]), default="hf", show_default=True,
              help="hf:// targets: the export layout.")
@click.option("--max-shard-size", default=None, help="hf:// targets: shard size, e.g. 5GB.")
@engine_options
@json_option
@click.pass_obj
def push(c: Ctx, args, remote_name, revision, fmt, max_shard_size, chunk_mb, device, as_json) -> None:
    """push [REF...] [--remote NAME]: upload the objects the versions need (all when none is named).

    push REF hf://ORG/NAME [--revision BRANCH]: export REF and upload it to the Hugging Face Hub,
    tagged skillbank-vN."""
    targets = [a for a in args if a.startswith("hf://")]
    refs = [a for a in args if not a.startswith("hf://")]
    bank = c.bank()
    if targets:
        if len(targets) != 1 or len(refs) != 1 or remote_name:
            raise click.UsageError("push REF hf://ORG/NAME: one version, one hub repository, no --remote")
        r = bank.push_hub(refs[0], targets[0], revision=revision, fmt=fmt, max_shard_size=parse_size(max_shard_size),
                          options=Options(chunk_mb=chunk_mb, device=device))
        emit(r, as_json, lambda d: out.print(f"pushed {d['version']} to hf://{d['repo']}@{d['revision']} "
                                             f"(commit {d['commit']}, tag {d['tag']})"))
        return
    if revision:
        raise click.UsageError("--revision is for hf:// targets")
    r = bank.push(refs, remote_name)
    emit(r, as_json, lambda d: out.print(f"pushed {len(d['versions'])} version(s) to {d['remote']}: "
                                         f"{d['uploaded']} of {d['objects']} object(s) uploaded, {d['bytes']:,} bytes"
                                         + (f"; {len(d['absent'])} object(s) of versions added elsewhere are in "
                                            "neither place (push them from there)" if d["absent"] else "")))


@cli.command()
@click.argument("refs", nargs=-1)
@click.option("--remote", "remote_name", default=None, help="Remote to pull from (default: the default remote).")
@json_option
@click.pass_obj
def pull(c: Ctx, refs, remote_name, as_json) -> None:
    """Fetch the objects REF needs (every version when none is named); each is verified."""
    r = c.bank().pull(refs, remote_name)
    emit(r, as_json, lambda d: out.print(f"pulled {len(d['versions'])} version(s) from {d['remote']}: "
                                         f"{d['fetched']} of {d['objects']} object(s) fetched and verified"))


@cli.command()
@click.argument("directory", required=False)
@click.option("--db", "clone_db", default=None, help="The existing bank's database (default: the global --db).")
@click.option("--remote", "remote_url", default=None, help="Object remote URL, added as the default remote.")
@click.option("--remote-name", default="origin", show_default=True)
@json_option
@click.pass_obj
def clone(c: Ctx, directory, clone_db, remote_url, remote_name, as_json) -> None:
    """A new bank directory (DIRECTORY, default --bank) for an existing database, e.g. on a second machine."""
    url = clone_db or c.db_url
    if not url:
        raise click.UsageError("clone needs the existing bank's database: --db URL")
    bank, r = Bank.clone(directory or c.bank_dir, url, remote_url=remote_url, remote_name=remote_name)
    bank.close()
    emit(r, as_json, lambda d: out.print(
        f"cloned bank {d['bank']} into {d['root']}: {d['versions']} version(s), HEAD {d['head']}"
        + (f", remote {d['remote']['name']} -> {d['remote']['url']}" if d["remote"] else "")))


@cli.command()
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["hf", "lerobot"]), default="hf", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="A new or empty directory.")
@click.option("--max-shard-size", default=None, help="Shard the weights, e.g. 5GB (default: as the base, else 5GB).")
@engine_options
@json_option
@click.pass_obj
def export(c: Ctx, ref, fmt, out_dir, max_shard_size, chunk_mb, device, as_json) -> None:
    """Write REF as a Hugging Face / LeRobot model directory (config.json, safetensors, model card)."""
    bank = c.bank()
    with progress_bar(f"exporting {ref}", bank.resolve(ref).n_bytes, as_json) as prog:
        r = bank.export(ref, fmt, out_dir, max_shard_size=parse_size(max_shard_size), progress=prog,
                        options=Options(chunk_mb=chunk_mb, device=device))
    emit(r, as_json, lambda d: out.print(f"exported {d['version']} ({d['format']}) to {d['out']}: "
                                         f"{', '.join(d['files'])}; digest {d['digest'][:12]} verified"))


# --- revoke / rebuild / merge

@cli.command()
@click.argument("skill")
@click.option("--reason", required=True, help="Why the skill is withdrawn (shown by audit, log and show).")
@json_option
@click.pass_obj
def revoke(c: Ctx, skill: str, reason: str, as_json: bool) -> None:
    """Revoke SKILL: audit flags every checkpoint that contains it (see also --forbid-revoked)."""
    r = c.bank().revoke(skill, reason)
    emit(r, as_json, lambda d: out.print(f"revoked {d['skill']} ({len(d['versions'])} version(s): "
                                         f"{', '.join(d['versions'])}): {d['reason']}"))


@cli.command()
@click.argument("ref")
@click.option("--without", "skill", required=True, help="The skill to leave out.")
@click.option("--branch", "branch_name", default=None, help="New branch (default rebuild-without-SKILL).")
@engine_options
@json_option
@click.pass_obj
def rebuild(c: Ctx, ref: str, skill: str, branch_name: str | None, chunk_mb: float, device: str,
            as_json: bool) -> None:
    """Replay REF's chain without SKILL onto a new branch (later task vectors re-applied as stored)."""
    bank = c.bank()
    with progress_bar(f"rebuilding {ref} without {skill}", bank.resolve(ref).n_bytes, as_json) as prog:
        r = bank.rebuild_without(ref, skill, branch_name, prog, Options(chunk_mb=chunk_mb, device=device))

    def render(d):
        out.print(f"{d['branch']} at {d['version']}: {d['from']} without {d['without']} "
                  f"(kept up to {d['kept_base']}, {len(d['versions'])} version(s) replayed)")
        for v in d["versions"]:
            out.print(f"  {v['version']}: {v['skill']} (from {v['rebuilt_from']}), evals to be re-run")
    emit(r, as_json, render)


def _weights(text: str) -> tuple[float, float]:
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected two numbers like 1,1") from None
    if len(w) != 2:
        raise click.BadParameter(f"{text!r}: expected two numbers like 1,1")
    return w


@cli.command("merge")
@click.argument("branch_a")
@click.argument("branch_b")
@click.option("--method", type=click.Choice(["task-arithmetic", "ties", "dare"]), default="task-arithmetic",
              show_default=True)
@click.option("--branch", "branch_name", default=None, help="Branch to hold the merge (default BRANCH_A).")
@click.option("--weights", default="1,1", show_default=True, help="Weight of each side's task vector: A,B.")
@click.option("--density", type=float, default=None, help="ties: share of each task vector kept (0.2).")
@click.option("--scale", type=float, default=None, help="ties: scale of the merged task vector (1).")
@click.option("--drop", type=float, default=None, help="dare: drop probability (0.5).")
@click.option("--seed", type=int, default=None, help="dare: seed of the drop mask (0).")
@click.option("-m", "--message", default=None)
@engine_options
@json_option
@click.pass_obj
def merge_cmd(c: Ctx, branch_a, branch_b, method, branch_name, weights, density, scale, drop, seed, message,
              chunk_mb, device, as_json) -> None:
    """Combine the skills added on two branches since their common ancestor (two parents)."""
    params = {k: v for k, v in dict(density=density, scale=scale, drop=drop, seed=seed).items() if v is not None}
    bank = c.bank()
    with progress_bar(f"merging {branch_b} into {branch_a}", bank.resolve(branch_a).n_bytes, as_json) as prog:
        r = bank.merge_branches(branch_a, branch_b, method, branch=branch_name, weights=_weights(weights),
                                params=params, message=message, progress=prog,
                                options=Options(chunk_mb=chunk_mb, device=device))
    emit(r, as_json, lambda d: out.print(
        f"{d['version']} on {d['branch']}: {d['method']} merge of {d['parents'][0]} "
        f"({', '.join(d['skills']['a']) or '-'}) and {d['parents'][1]} ({', '.join(d['skills']['b']) or '-'}) "
        f"since {d['ancestor']}"))


def one_line(text: str) -> str:
    """A message as one line: control characters (a newline in a path or a name) are escaped."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SkillbankError as e:
        click.echo(f"error: {one_line(str(e))}", err=True)
        sys.exit(1)
    except sa_exc.OperationalError as e:
        click.echo(f"error: database: {str(e.orig).strip().splitlines()[0]}", err=True)
        sys.exit(1)
    except sa_exc.IntegrityError as e:  # a constraint another writer's commit won; the bank is unchanged
        click.echo(f"error: database refused the write: {str(e.orig).strip().splitlines()[0]}; retry", err=True)
        sys.exit(1)
    except sa_exc.ProgrammingError as e:
        if getattr(e.orig, "sqlstate", None) != "42501":  # insufficient_privilege: a role's grants (docs/security.md)
            raise
        click.echo(f"error: database: {str(e.orig).strip().splitlines()[0]} (this role may not do that)", err=True)
        sys.exit(1)
    except OSError as e:
        click.echo(f"error: {one_line(str(e.strerror or e))}{f': {one_line(str(e.filename))}' if e.filename else ''}",
                   err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
