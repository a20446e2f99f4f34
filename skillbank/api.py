"""The Bank: the one front door. Every CLI command is one method here.

Write paths follow one order (DESIGN invariant 2): stream and fsync every object first, then commit
the rows and move the ref in one short transaction. A failure before the commit leaves at most
unreferenced objects, which `gc` removes; a failure at the commit changes nothing.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import shutil
import subprocess
import uuid
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Callable

import xxhash
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, update

from skillbank import bankdir
from skillbank import groups as groups_mod
from skillbank import integrity
from skillbank.card import model_card
from skillbank.codecs import DEFAULT_CODEC, TaskVectorWriter, get_codec
from skillbank.db import Database, Eval, Keyframe, Meta, Ref, RefLog, Revocation, Skill, TaskVector, Version
from skillbank.db import migrate
from skillbank.errors import CheckpointError, IntegrityError, RefError, SkillbankError, ValidationError
from skillbank.lineage import Head, ancestors, create_ref, move_branch, read_head, resolve, write_head
from skillbank.lineage.refs import check_name, reachable
from skillbank.lineage.uses import ObjectUses
from skillbank.merge import MANIFEST_FORMAT, Options, add_pass, manifests_of, materialize, open_chain
from skillbank.merge.chain import Opened, Step
from skillbank.merge.engine import combine_pass, copy_canonical, replay_digests
from skillbank.merge.methods import COMBINE_DEFAULTS, COMBINERS
from skillbank.merge.recipe import assign_groups, format_alphas, parse_alpha
from skillbank.store import ObjectStore
from skillbank.tensors import Checkpoint, CheckpointWriter, Digests, TensorSpec, WeightsDigest, header_bytes
from skillbank.tensors.sources import open_source
from skillbank.tensors.writer import as_bytes, canonical, write_text_atomic

BANK_FILE = "bank.json"
MAX_REL_DISTANCE = 0.5  # ||ft - parent|| / ||parent|| above this does not look like a finetune
KEYFRAME_EVERY = 8  # "auto": keep a version whole once its rebuild would replay this many task vectors
Progress = Callable[[int], None] | None
OUTPUT_NAMES = ("model.safetensors", "model.safetensors.index.json")


def default_author() -> str:
    if os.environ.get("SKILLBANK_AUTHOR"):
        return os.environ["SKILLBANK_AUTHOR"]
    try:
        name = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
        if name:
            return name
    except (OSError, subprocess.SubprocessError):
        pass
    return getpass.getuser()


def _eval_summary(rows) -> dict[str, float]:
    """Mean over seeds per (suite, split), keyed by the split alone when one suite has it."""
    groups: dict[tuple[str, str], list[float]] = {}
    for e in rows:
        groups.setdefault((e.suite, e.split), []).append(e.value)
    splits = [split for _, split in groups]
    return {(split if splits.count(split) == 1 else f"{suite} {split}"): sum(v) / len(v)
            for (suite, split), v in sorted(groups.items())}


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds") + "Z"


def _specs_of(ckpt: Checkpoint) -> list[TensorSpec]:
    return [TensorSpec(i.name, i.dtype, i.shape) for i in ckpt]


def _param_count(specs: list[TensorSpec]) -> tuple[int, int]:
    return sum(s.numel for s in specs), sum(s.nbytes for s in specs)


class Bank:
    def __init__(self, root: Path, db: Database, bank_id: str):
        self.root = root
        self.db = db
        self.id = bank_id
        self.store = ObjectStore(root)
        self.author = default_author()

    # ----------------------------------------------------------------- open / init

    @staticmethod
    def default_db_url(root: Path) -> str:
        return f"sqlite:///{root.resolve() / 'bank.db'}"

    @classmethod
    def open(cls, root: str | os.PathLike, db_url: str | None = None) -> "Bank":
        root = Path(root)
        info, db = _bank_database(root, db_url)
        try:
            migrate.ensure_current(db.engine)
            with db.read() as s:
                row = s.get(Meta, "bank_id")
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
            raise SkillbankError(f"cannot reach the database: {str(e.orig).strip().splitlines()[0]}") from None
        if row is None:
            raise SkillbankError(f"the database at {db.url!r} holds no bank; run `skillbank init` first")
        if row.value != info["bank_id"]:
            raise SkillbankError(f"the database holds bank {row.value}, but {root} is bank {info['bank_id']}")
        return cls(root, db, row.value)

    @classmethod
    def init(cls, root: str | os.PathLike, base: str, db_url: str | None = None,
             message: str | None = None, progress: Progress = None) -> tuple["Bank", dict]:
        root = Path(root)
        if (root / BANK_FILE).exists():
            raise SkillbankError(f"a bank already exists at {root}")
        created = not root.exists()
        try:
            with open_source(base) as ckpt:
                if not ckpt.tensors:
                    raise CheckpointError(f"{base}: holds no tensors")
                config_raw = ckpt.config_bytes()  # checked before anything is written
                store = ObjectStore(root).create()
                base_obj, base_sha256 = cls._store_base(store, ckpt, progress)
                config = store.put_bytes(config_raw) if config_raw is not None else None
                specs = _specs_of(ckpt)
                largest = max(f.path.stat().st_size for f in ckpt.files)
                layout = {"max_shard_size": largest if len(ckpt.files) > 1 else None}
                source = ckpt.source
            manifest = store.put_json({
                "format": MANIFEST_FORMAT, "tensors": [s.to_json() for s in canonical(specs)],
                "base": base_obj, "digest": base_obj, "parent_manifest": None, "step": None,
                "config": config, "layout": layout,
            })
            url = db_url or cls.default_db_url(root)
            db = Database(url)
            try:
                migrate.ensure_current(db.engine)
            except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
                raise SkillbankError(f"cannot reach the database: {str(e.orig).strip().splitlines()[0]}") from None
            bank_id = uuid.uuid4().hex
            author = default_author()
            n_params, n_bytes = _param_count(specs)
            with db.write() as s:
                existing = s.get(Meta, "bank_id")
                if existing is not None and not _interrupted_init(s, db_url, base_obj):
                    raise SkillbankError(f"the database at {url!r} already holds bank {existing.value}")
                if existing is not None:  # an init killed after its commit, before bank.json: finish it
                    bank_id = existing.value
                else:
                    s.add(Meta(key="bank_id", value=bank_id))
                    s.add(Version(id=0, parent_id=None, skill_id=None, method="base", alphas=None,
                                  group_preset=None, digest=base_obj, sha256=base_sha256, manifest=manifest,
                                  source=source,
                                  n_params=n_params, n_bytes=n_bytes, author=author,
                                  message=message or f"base from {source}"))
                    s.flush()
                    create_ref(s, "main", "branch", 0, "init", author, f"init from {source}")
            info = {"format": 1, "bank_id": bank_id}
            if db_url:
                info["db_url"] = _without_password(db_url)  # as clone: from --db, env or ~/.pgpass
            write_text_atomic(root / BANK_FILE, json.dumps(info, indent=2) + "\n")
            write_head(root, Head(branch="main"), "init")
        except BaseException:
            if created:
                shutil.rmtree(root, ignore_errors=True)
            raise
        bank = cls(root, db, bank_id)
        return bank, {"bank": bank_id, "version": "v0", "branch": "main", "digest": base_obj, "sha256": base_sha256,
                      "tensors": len(specs), "params": n_params, "bytes": n_bytes, "source": source}

    @staticmethod
    def _store_base(store: ObjectStore, ckpt: Checkpoint, progress: Progress) -> tuple[str, str]:
        """Stream the base into its canonical single-file form: (object digest = weights digest, SHA-256)."""
        with store.writer() as w:
            digest, sha256 = copy_canonical(ckpt, w, progress)
            if w.commit() != digest:
                raise IntegrityError("the base object's digest differs from its weights digest")
            return digest, sha256

    def close(self) -> None:
        self.db.dispose()

    # ----------------------------------------------------------------- refs

    @property
    def head(self) -> Head:
        return read_head(self.root)

    def resolve(self, ref: str) -> Version:
        with self.db.read() as s:
            return resolve(s, ref, self.head)

    # ----------------------------------------------------------------- add-skill

    @integrity.explained
    def add_skill(self, name: str, finetuned: str, alpha: str | float, *, from_ref: str | None = None,
                  branch: str | None = None, codec: str = DEFAULT_CODEC, groups: str | None = None,
                  preset: str | None = None, force: bool = False, message: str | None = None,
                  demos: dict | None = None, trainer: str | None = "external",
                  trainer_settings: dict | None = None, progress: Progress = None,
                  options: Options = Options(), keyframe: str = "auto") -> dict:
        check_name(name, "skill")
        if keyframe not in ("auto", "always", "never"):
            raise ValidationError(f"--keyframe {keyframe!r}: expected auto, always or never")
        alphas = parse_alpha(alpha)
        codec_impl = get_codec(codec)
        head = self.head
        with self.db.read() as s:
            parent = resolve(s, from_ref or "HEAD", head)
            target, expected = self._target_branch(s, head, parent, from_ref, branch)
        with ExitStack() as stack:
            ft = stack.enter_context(open_source(finetuned))
            chain = open_chain(self.store, parent.manifest, self.keyframes())
            stack.callback(chain.close)
            keep_whole = keyframe == "always" or (keyframe == "auto" and len(chain.steps) + 1 >= KEYFRAME_EVERY)
            self._check_compatible(chain.specs, ft, parent.label, force)
            names = [s_.name for s_ in chain.specs]
            rules = (groups_mod.load_rules_file(groups) if groups else
                     groups_mod.get_preset(preset) if preset else groups_mod.detect_preset(names))
            assignment = assign_groups(names, alphas, rules)
            tv = TaskVectorWriter(self.store, codec_impl)
            stack.callback(tv.abort)  # also when the keyframe writer cannot be created
            keep = self.store.writer() if keep_whole else None
            if keep is not None:
                stack.callback(keep.abort)
            try:
                stats = add_pass(chain, ft, codec_impl, tv, "retain", alphas, assignment, progress, options, keep)
                if not force:
                    if stats.delta_sq == 0.0:
                        raise ValidationError(
                            f"{finetuned} is identical to the parent {parent.label}; nothing to add "
                            "(--force to record it anyway)")
                    if stats.rel_norm > MAX_REL_DISTANCE:
                        raise ValidationError(
                            f"{finetuned} does not look finetuned from {parent.label} (relative distance "
                            f"{stats.rel_norm:.3f} > {MAX_REL_DISTANCE}); pass --force if you know better")
                tv_obj = tv.commit()
                if keep is not None and keep.commit() != stats.digest:
                    raise IntegrityError("the keyframe written during add-skill does not match the merge's digest")
            except BaseException:
                tv.abort()
                raise
            ft_source = ft.source
        manifest = self.store.put_json({
            "format": MANIFEST_FORMAT, "tensors": [s_.to_json() for s_ in canonical(chain.specs)],
            "base": None, "digest": stats.digest, "parent_manifest": parent.manifest,
            "config": self._config_of(parent),
            "layout": self.store.get_json(parent.manifest).get("layout"),
            "step": {"method": "retain", "task_vector": tv_obj, "alphas": alphas,
                     "groups": assignment, "codec": codec_impl.name},
        })
        n_params, n_bytes = _param_count(chain.specs)
        demos = demos or {}
        for attempt in range(20):
            try:
                with self.db.write() as s:
                    vid = (s.scalar(select(func.max(Version.id))) or 0) + 1
                    tvrow = TaskVector(parent_version_id=parent.id, codec=codec_impl.name,
                                       codec_params=codec_impl.params(), object=tv_obj,
                                       raw_bytes=stats.raw_bytes, stored_bytes=self.store.size(tv_obj),
                                       rel_error=stats.rel_error, rel_norm=stats.rel_norm)
                    s.add(tvrow)
                    s.flush()
                    skill = Skill(name=name, parent_version_id=parent.id, finetuned_source=ft_source,
                                  finetuned_digest=stats.finetuned_digest, demos_uri=demos.get("uri"),
                                  demos_digest=demos.get("digest"), demos_dvc_hash=demos.get("dvc_hash"),
                                  demos_git_rev=demos.get("git_rev"), trainer=trainer,
                                  trainer_settings=trainer_settings, task_vector_id=tvrow.id)
                    s.add(skill)
                    s.flush()
                    s.add(Version(id=vid, parent_id=parent.id, skill_id=skill.id, method="retain",
                                  alphas=alphas, group_preset=rules.name, digest=stats.digest,
                                  sha256=stats.sha256, manifest=manifest, source=None, n_params=n_params,
                                  n_bytes=n_bytes,
                                  author=self.author, message=message or f"add skill {name}"))
                    s.flush()
                    if keep_whole:
                        s.add(Keyframe(version_id=vid, reason="auto" if keyframe == "auto" else "pin"))
                    if expected is None:
                        create_ref(s, target, "branch", vid, "add-skill", self.author, f"add-skill {name}")
                    else:
                        move_branch(s, target, expected, vid, "add-skill", self.author, f"add-skill {name}")
                break
            except sa_exc.IntegrityError:
                # Another writer took this version number first; the ref check below decides.
                if attempt == 19:
                    raise
        return {"version": f"v{vid}", "parent": parent.label, "skill": name, "branch": target,
                "alpha": format_alphas(alphas), "alphas": alphas, "digest": stats.digest, "sha256": stats.sha256,
                "codec": codec_impl.name, "raw_bytes": stats.raw_bytes,
                "stored_bytes": self.store.size(tv_obj), "rel_norm": stats.rel_norm,
                "groups": rules.name, "keyframe": keep_whole}

    @integrity.explained
    def add_skill_from_demos(self, name: str, demos: str, alpha: str | float, *, from_ref: str | None = None,
                             branch: str | None = None, settings: dict | None = None,
                             train_cmd: str | None = None, val_suite: str | None = None,
                             sweep_grid: tuple[float, ...] | None = None, episodes: int = 10,
                             seeds: tuple[int, ...] = (0,), plot: str | None = None,
                             progress: bool = False, **add_kwargs) -> dict:
        """Finetune the parent version on `demos` (built-in trainer or the user's command), then add it.

        Finetuning always starts from the materialised parent. `alpha="auto"` (or `auto:GROUP`)
        sweeps alpha on `val_suite` and keeps the best OOD one, as the paper chose its alpha.
        """
        import tempfile

        from skillbank.train.demos import demos_digest, dvc_info, read_demos

        auto = isinstance(alpha, str) and alpha.strip().lower().startswith("auto")
        if auto and not val_suite:
            raise ValidationError("--alpha auto needs --val-suite (the OOD split that picks alpha)")
        if not auto:
            parse_alpha(alpha)  # fail before training, not after
        read_demos(demos)  # a one-line error now if they are not LeRobot v3
        with self.db.read() as s:
            parent = resolve(s, from_ref or "HEAD", self.head)
            lineage = self._lineage(s, parent)
        info = {"uri": str(demos), "digest": demos_digest(demos), **dvc_info(demos)}
        self.store.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.store.tmp, prefix="train-") as work:
            work = Path(work)
            self._materialize(parent, work / "parent", lineage, None, None, add_kwargs.get("options", Options()))
            if train_cmd:
                from skillbank.train.finetune import run_train_cmd

                weights = run_train_cmd(train_cmd, work / "parent", work / "finetuned", Path(demos))
                trainer, trainer_settings = "external-command", {"command": train_cmd}
            else:
                from skillbank.train.finetune import finetune
                from skillbank.train.trainer import TrainSettings

                run = finetune(work / "parent", demos, work / "finetuned", TrainSettings.from_dict(settings or {}),
                               progress=progress)
                weights, trainer = work / "finetuned", run["trainer"]
                trainer_settings = {"settings": run["settings"], "metrics": run["metrics"], "demos": run["demos"]}
            sweep_report = None
            if auto:
                alpha, sweep_report = self._choose_alpha(name, alpha, work, val_suite, sweep_grid, episodes, seeds,
                                                         plot)
                trainer_settings["alpha_sweep"] = sweep_report
            result = self.add_skill(name, str(weights), alpha, from_ref=parent.label, branch=branch, demos=info,
                                    trainer=trainer, trainer_settings=trainer_settings, **add_kwargs)
        result["demos_digest"] = info["digest"]
        if sweep_report:
            result["alpha_sweep"] = sweep_report
        return result

    def _choose_alpha(self, name: str, spec: str, work: Path, val_suite: str, grid, episodes: int, seeds,
                      plot_path: str | None) -> tuple[str, dict]:
        from skillbank import sweep
        from skillbank.envs.metaworld import parse_suite

        _, _, group = spec.partition(":")
        group = group.strip().lower() or None
        if group is not None and group not in groups_mod.GROUPS:
            raise ValidationError(f"--alpha auto:{group}: unknown group (known: {', '.join(groups_mod.GROUPS)})")
        with open_source(str(work / "parent")) as ck:
            names = ck.names
        assignment = groups_mod.detect_preset(names).assign(names)
        points = sweep.sweep(work / "parent", work / "finetuned", assignment, parse_suite(val_suite), episodes,
                             seeds, work / "sweep", tuple(grid or sweep.DEFAULT_GRID), group)
        best = sweep.choose(points)
        chosen = format_alphas(sweep.candidate_alphas(best, group)) if group else f"{best:g}"
        out = Path(plot_path) if plot_path else self.root / "plots" / f"alpha-sweep-{name}.png"
        sweep.plot(points, out, f"{name}: alpha sweep on {val_suite}" + (f" ({group})" if group else ""))
        table = [{"alpha": p["alpha"], **{label: r["success_rate"] for label, r in p["results"].items()}}
                 for p in points]
        return chosen, {"suite": val_suite, "group": group, "chosen": best, "points": table, "plot": str(out)}

    @integrity.explained
    def evaluate(self, ref: str, suite: str, *, episodes: int = 10, seeds: tuple[int, ...] = (0,),
                 record: bool = True, options: Options = Options()) -> dict:
        """Run a Meta-World suite on a version of the reference policy and record the results."""
        import tempfile

        from skillbank.evaluation import evaluate_checkpoint

        with self.db.read() as s:
            version = resolve(s, ref, self.head)
            lineage = self._lineage(s, version)
        self.store.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.store.tmp, prefix="eval-") as work:
            self._materialize(version, Path(work), lineage, None, None, options)
            results = evaluate_checkpoint(work, suite, episodes, seeds)
        if record:
            with self.db.write() as s:
                for r in results:
                    s.add(Eval(version_id=version.id, suite=suite, split=r["label"], metric="success_rate",
                               value=r["success_rate"], episodes=r["episodes"], seed=r["seeds"][0] if len(r["seeds"]) == 1 else None))
        return {"version": version.label, "suite": suite, "results": results, "recorded": record}

    def _target_branch(self, s, head: Head, parent: Version, from_ref: str | None,
                       branch: str | None) -> tuple[str, int | None]:
        """Which branch gets the new version, and the tip it must still have at commit time."""
        if branch:
            check_name(branch, "branch")
            ref = s.get(Ref, branch)
            if ref is None:
                return branch, None
            if ref.kind != "branch":
                raise RefError(f"{branch!r} is a tag; tags do not move")
            if ref.version_id != parent.id:
                raise RefError(f"branch {branch!r} is at v{ref.version_id}, not at the parent {parent.label}; "
                               "use --from with its tip or name a new branch")
            return branch, ref.version_id
        if head.branch is None:
            raise RefError(f"HEAD is detached at v{head.version}; pass --branch NAME to hold the new version")
        ref = s.get(Ref, head.branch)
        if ref is None:
            raise RefError(f"HEAD's branch {head.branch!r} does not exist")
        if from_ref and ref.version_id != parent.id:
            raise RefError(f"--from {from_ref} ({parent.label}) is not the tip of {head.branch!r} "
                           f"(v{ref.version_id}); pass --branch NAME to hold the new version")
        # The CAS must expect the parent itself, not a second read of the tip: on PostgreSQL (read
        # committed) that read can already see another writer's commit, and the branch would then
        # move past that writer's version to one built on its parent, dropping it from history.
        return head.branch, parent.id

    @staticmethod
    def _check_compatible(specs: list[TensorSpec], ft: Checkpoint, parent: str, force: bool) -> None:
        want = {s.name: s for s in specs}
        missing = sorted(set(want) - set(ft.tensors))
        if missing:
            raise ValidationError(f"{ft.source} lacks {len(missing)} of {parent}'s tensors (e.g. {missing[0]!r})")
        extra = sorted(set(ft.tensors) - set(want))
        if extra and not force:
            raise ValidationError(f"{ft.source} has {len(extra)} tensors that {parent} lacks (e.g. {extra[0]!r}); "
                                  "--force ignores them")
        for name, spec in want.items():
            info = ft.tensors[name]
            if info.shape != spec.shape:
                raise ValidationError(f"tensor {name!r}: shape {list(info.shape)} in {ft.source}, "
                                      f"{list(spec.shape)} in {parent}")
            if info.dtype != spec.dtype:
                raise ValidationError(f"tensor {name!r}: dtype {info.dtype} in {ft.source}, {spec.dtype} in {parent}")

    def _config_of(self, version: Version) -> str | None:
        return self.store.get_json(version.manifest).get("config")

    # ----------------------------------------------------------------- checkout

    @integrity.explained
    def checkout(self, ref: str, out: str | os.PathLike | None = None, *,
                 max_shard_size: int | None = None, progress: Progress = None,
                 options: Options = Options(), verify_sha256: bool = False) -> dict:
        """Make REF the HEAD; with `out`, rebuild it there, verified against its xxh3 digest.

        `verify_sha256` also hashes the rebuild with SHA-256 and compares it with the recorded one,
        which an attacker who can forge xxh3 collisions in the objects cannot match (docs/security.md).
        """
        with self.db.read() as s:
            version = resolve(s, ref, self.head)
            is_branch = (r := s.get(Ref, ref)) is not None and r.kind == "branch"
            lineage = self._lineage(s, version)
        if verify_sha256 and out is None:
            raise ValidationError("--verify-sha256 checks a rebuild: give --out DIR")
        if verify_sha256 and version.sha256 is None:
            raise IntegrityError(f"{version.label} has no recorded SHA-256 (written before schema 0004); "
                                 "run `skillbank db backfill-sha256` first")
        result = {"version": version.label, "digest": version.digest, "sha256": version.sha256, "ref": ref}
        if out is not None:
            result.update(self._materialize(version, self._outside(out), lineage, max_shard_size, progress,
                                            options, verify_sha256))
        if ref.strip() == "HEAD":
            new_head = self.head  # as in git: checking out HEAD leaves it attached where it is
        else:
            new_head = Head(branch=ref) if is_branch else Head(version=version.id)
        write_head(self.root, new_head, f"checkout {ref}")
        result["head"] = new_head.describe()
        return result

    def _outside(self, out: str | os.PathLike) -> Path:
        """A user's --out, refused inside the bank or its object store (gc and fsck own those files)."""
        out = Path(out)
        where = out.resolve()
        for own in {self.root.resolve(), self.store.objects.resolve()}:
            if where == own or own in where.parents:
                raise ValidationError(f"--out {out} is inside the bank ({own}); choose a directory outside it")
        return out

    def _materialize(self, version: Version, out: Path, lineage: list[dict],
                     max_shard_size: int | None, progress: Progress, options: Options,
                     verify_sha256: bool = False) -> dict:
        manifest = self.store.get_json(version.manifest)
        if max_shard_size is None:
            max_shard_size = (manifest.get("layout") or {}).get("max_shard_size")
        lineage_json = json.dumps(lineage, sort_keys=True, separators=(",", ":"))
        meta = {"skillbank.bank": self.id, "skillbank.version": version.label,
                "skillbank.digest": version.digest, "skillbank.lineage": lineage_json,
                "skillbank.lineage_digest": xxhash.xxh3_128_hexdigest(lineage_json.encode())}
        if version.sha256:
            meta["skillbank.sha256"] = version.sha256
        if out.exists() and not out.is_dir():
            raise SkillbankError(f"--out {out} exists and is not a directory")
        # Read before writing anything: a damaged config must fail the checkout, not follow it.
        config = self.store.get_bytes(manifest["config"]).decode() if manifest.get("config") else None
        chain = open_chain(self.store, version.manifest, self.keyframes())
        try:
            writer = CheckpointWriter(out, chain.specs, meta, max_shard_size)
            try:
                hasher = WeightsDigest(chain.specs, sha256=verify_sha256)
                digest = materialize(chain, writer, progress, options, hasher=hasher)
                if digest != version.digest:
                    raise IntegrityError(f"rebuilt {version.label} has digest {digest}, recorded {version.digest}; "
                                         "run `skillbank fsck`")
                if verify_sha256 and hasher.sha256 != version.sha256:
                    raise IntegrityError(f"rebuilt {version.label} matches its xxh3 digest but has SHA-256 "
                                         f"{hasher.sha256}, recorded {version.sha256}: its objects were forged "
                                         "to collide (or the database was edited); nothing was written")
                files = writer.commit()
            except BaseException:
                writer.abort()
                raise
        finally:
            chain.close()
        keep = {f.name for f in files} | ({"model.safetensors.index.json"} if len(files) > 1 else set())
        for stale in out.glob("model*.safetensors*"):
            if stale.name not in keep and (stale.name in OUTPUT_NAMES or stale.name.startswith("model-")):
                stale.unlink()
        if config is not None:
            write_text_atomic(out / "config.json", config)
        skills = [{"version": e["version"], "name": e["skill"], "alpha": e["alpha"],
                   "demos_digest": e.get("demos_digest")} for e in lineage[1:] if e.get("skill")]
        write_text_atomic(out / "README.md", model_card(version.label, version.digest, self.id, lineage[0], skills))
        return {"out": str(out), "files": [str(f) for f in files], "verified": True,
                "sha256_verified": verify_sha256}

    def _lineage(self, s, version: Version) -> list[dict]:
        chain = list(reversed(ancestors(s, version)))
        out = []
        for v in chain:
            entry = {"version": v.label, "digest": v.digest}
            if v.skill is None and v.parent_id is not None:
                entry["merge"] = self._merge_entry(v)
            elif v.skill is None:
                entry["source"] = v.source
            else:
                entry.update(skill=v.skill.name, alpha=format_alphas(v.alphas),
                             demos_digest=v.skill.demos_digest, finetuned_digest=v.skill.finetuned_digest)
            out.append(entry)
        return out

    # ----------------------------------------------------------------- reading

    def _row(self, s, v: Version, refs: dict[int, list[str]]) -> dict:
        return {"version": v.label, "parent": f"v{v.parent_id}" if v.parent_id is not None else None,
                "skill": v.skill.name if v.skill else None,
                "alpha": format_alphas(v.alphas) if v.alphas else None, "alphas": v.alphas,
                "digest": v.digest, "sha256": v.sha256, "created_at": _iso(v.created_at), "author": v.author,
                "message": v.message, "refs": refs.get(v.id, []),
                "evals": _eval_summary(s.scalars(select(Eval).where(Eval.version_id == v.id))),
                **self._row_extra(s, v)}

    def _refs_by_version(self, s) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for r in s.scalars(select(Ref).order_by(Ref.name)):
            out.setdefault(r.version_id, []).append(r.name)
        return out

    def log(self, ref: str | None = None) -> list[dict]:
        with self.db.read() as s:
            v = resolve(s, ref or "HEAD", self.head)
            refs = self._refs_by_version(s)
            return [self._row(s, a, refs) for a in ancestors(s, v)]

    def show(self, ref: str) -> dict:
        with self.db.read() as s:
            v = resolve(s, ref, self.head)
            row = self._row(s, v, self._refs_by_version(s))
            row.update(method=v.method, group_preset=v.group_preset, source=v.source,
                       params=v.n_params, bytes=v.n_bytes, manifest=v.manifest,
                       keyframe=v.id == 0 or s.get(Keyframe, v.id) is not None)
            if v.skill:
                sk, tv = v.skill, v.skill.task_vector
                row["skill_detail"] = {
                    "name": sk.name, "finetuned_from": f"v{sk.parent_version_id}",
                    "finetuned_source": sk.finetuned_source, "finetuned_digest": sk.finetuned_digest,
                    "demos": {"uri": sk.demos_uri, "digest": sk.demos_digest,
                              "dvc_hash": sk.demos_dvc_hash, "git_rev": sk.demos_git_rev},
                    "trainer": sk.trainer, "trainer_settings": sk.trainer_settings}
                row["task_vector"] = {"codec": tv.codec, "params": tv.codec_params, "object": tv.object,
                                      "raw_bytes": tv.raw_bytes, "stored_bytes": tv.stored_bytes,
                                      "ratio": tv.raw_bytes / tv.stored_bytes if tv.stored_bytes else None,
                                      "rel_error": tv.rel_error, "rel_norm": tv.rel_norm}
            row["evals"] = [{"suite": e.suite, "split": e.split, "metric": e.metric, "value": e.value,
                             "episodes": e.episodes, "seed": e.seed}
                            for e in s.scalars(select(Eval).where(Eval.version_id == v.id).order_by(Eval.id))]
            return row

    def branches(self) -> list[dict]:
        head = self.head
        with self.db.read() as s:
            rows = s.scalars(select(Ref).where(Ref.kind == "branch").order_by(Ref.name)).all()
            return [{"name": r.name, "version": f"v{r.version_id}", "current": r.name == head.branch}
                    for r in rows]

    def tags(self) -> list[dict]:
        with self.db.read() as s:
            rows = s.scalars(select(Ref).where(Ref.kind == "tag").order_by(Ref.name)).all()
            return [{"name": r.name, "version": f"v{r.version_id}"} for r in rows]

    def reflog(self, ref: str | None = None, limit: int = 50) -> list[dict]:
        with self.db.read() as s:
            q = select(RefLog).order_by(RefLog.id.desc()).limit(limit)
            if ref:
                q = q.where(RefLog.ref == ref)
            return [{"ref": r.ref, "old": f"v{r.old_version_id}" if r.old_version_id is not None else None,
                     "new": f"v{r.new_version_id}", "action": r.action, "message": r.message,
                     "author": r.author, "created_at": _iso(r.created_at)} for r in s.scalars(q)]

    # ----------------------------------------------------------------- moving refs

    def create_branch(self, name: str, ref: str | None = None) -> dict:
        with self.db.write() as s:
            v = resolve(s, ref or "HEAD", self.head)
            create_ref(s, name, "branch", v.id, "branch", self.author, f"branch from {ref or 'HEAD'}")
        return {"name": name, "version": v.label, "current": False}

    def create_tag(self, name: str, ref: str) -> dict:
        with self.db.write() as s:
            v = resolve(s, ref, self.head)
            create_ref(s, name, "tag", v.id, "tag", self.author, f"tag {ref}")
        return {"name": name, "version": v.label}

    def rollback(self, ref: str, branch: str | None = None, force: bool = False) -> dict:
        head = self.head
        branch = branch or head.branch
        if branch is None:
            raise RefError(f"HEAD is detached at v{head.version}; pass --branch NAME")
        with self.db.write() as s:
            r = s.get(Ref, branch)
            if r is None or r.kind != "branch":
                raise RefError(f"no branch named {branch!r}")
            target = resolve(s, ref, head)
            tip = resolve(s, branch, head)
            if not force and target.id not in {a.id for a in ancestors(s, tip)}:
                raise RefError(f"{target.label} is not an ancestor of {branch!r} ({tip.label}); "
                               "--force moves the branch anyway")
            move_branch(s, branch, tip.id, target.id, "rollback", self.author, f"rollback to {ref}")
        return {"branch": branch, "from": tip.label, "to": target.label}

    # ----------------------------------------------------------------- lineage picture

    def graph(self, out: str | None = None) -> dict:
        """The version DAG with skills, alphas, refs, keyframes and best evals: .mmd, .svg or .png."""
        from skillbank.lineage.graph import Node, draw, mermaid

        with self.db.read() as s:
            refs = self._refs_by_version(s)
            keyframes = set(s.scalars(select(Keyframe.version_id)))
            evals: dict[int, dict[str, float]] = {}
            for e in s.scalars(select(Eval)):
                best = evals.setdefault(e.version_id, {})
                best[e.split] = max(best.get(e.split, e.value), e.value)
            nodes = [Node(v.id, v.parent_id, v.skill.name if v.skill else None,
                          format_alphas(v.alphas) if v.alphas else None, refs.get(v.id, []),
                          evals.get(v.id, {}), v.id == 0 or v.id in keyframes)
                     for v in s.scalars(select(Version).order_by(Version.id))]
        text = mermaid(nodes)
        if out is None or out.endswith(".mmd"):
            if out:
                write_text_atomic(Path(out), text)
            return {"versions": len(nodes), "out": out, "mermaid": text}
        if not out.endswith((".svg", ".png")):
            raise ValidationError(f"--out {out}: expected a .svg, .png or .mmd file")
        draw(nodes, Path(out))
        return {"versions": len(nodes), "out": out}

    # ----------------------------------------------------------------- evals

    def record_eval(self, ref: str, suite: str, split: str, value: float, *, metric: str = "success_rate",
                    episodes: int | None = None, seed: int | None = None) -> dict:
        """Attach a measured result to a version (append-only, like every record)."""
        if not math.isfinite(value):
            raise ValidationError(f"eval value {value!r} is not a finite number")
        if episodes is not None and episodes < 1:
            raise ValidationError("--episodes must be at least 1")
        with self.db.write() as s:
            v = resolve(s, ref, self.head)
            s.add(Eval(version_id=v.id, suite=suite, split=split, metric=metric, value=value,
                       episodes=episodes, seed=seed))
        return {"version": v.label, "suite": suite, "split": split, "metric": metric, "value": value,
                "episodes": episodes, "seed": seed}

    # ----------------------------------------------------------------- audit

    @integrity.explained
    def audit(self, path: str, *, min_alpha: float = 0.05, seed: int = 0) -> dict:
        """Which version and skills a checkpoint holds: exact by SHA-256, else estimated.

        An xxh3 match is only a candidate: it becomes "exact" when the SHA-256 matches too
        (`verified_by: sha256`), or when the version has none recorded yet (`verified_by: xxh3`,
        with a warning). A candidate whose SHA-256 differs is a forged collision: match "none".
        """
        from skillbank.lineage.audit import VersionNode, checkpoint_digests, estimate, match_names

        with open_source(path) as ckpt, self.db.read() as s:
            versions = s.scalars(select(Version).order_by(Version.id)).all()
            refs = self._refs_by_version(s)
            hint = {k.removeprefix("skillbank."): v for k, v in ckpt.metadata.items()
                    if k in ("skillbank.version", "skillbank.digest", "skillbank.bank")}
            specs = [TensorSpec.from_json(r) for r in self.store.get_json(versions[0].manifest)["tensors"]]
            digest, sha256 = checkpoint_digests(ckpt)
            report = {"path": path, "source": ckpt.source, "digest": digest, "sha256": sha256,
                      "hint": hint or None, "bank": self.id, "verified_by": None, "warnings": []}
            candidates = [v for v in versions if v.digest == digest]
            exact = ([v for v in candidates if v.sha256 == sha256] or
                     [v for v in candidates if v.sha256 is None])
            if exact:
                v = exact[0]
                report.update(match="exact", version=v.label, refs=refs.get(v.id, []),
                              skills=self._contained_skills(s, v), lineage=self._lineage_detail(s, v),
                              verified_by="xxh3" if v.sha256 is None else "sha256")
                if v.sha256 is None:
                    report["warnings"].append(
                        f"{v.label} has no recorded SHA-256, so this match rests on xxh3 alone (not proof "
                        "against a forged checkpoint); run `skillbank db backfill-sha256`")
                return self._flag_revoked(report)
            if candidates:
                v = candidates[0]
                report.update(match="none", version=None, skills=[], collides_with=v.label,
                              reason=f"it collides with {v.label}'s fast digest (xxh3 {digest}) but not its "
                                     f"SHA-256 (recorded {v.sha256}, checkpoint {sha256}): a tampered checkpoint "
                                     "crafted to pass as that version")
                return self._flag_revoked(report)
            names = match_names([sp.name for sp in specs], list(ckpt.tensors))
            shapes_ok = names is not None and all(
                math.prod(ckpt.tensors[names[sp.name]].shape) == sp.numel for sp in specs)
            if not shapes_ok:
                report.update(match="none", version=None, skills=[],
                              reason="its tensors do not match this bank's (names or shapes differ)")
                return self._flag_revoked(report)
            nodes = [VersionNode(v.id, v.parent_id, v.manifest) for v in versions]
            est = estimate(self.store, nodes, ckpt, names, specs, seed)
            skill_of = {v.id: v for v in versions if v.skill is not None}
            nearest = min(est["distances"], key=est["distances"].get) if est["distances"] else None
            contained = [{"name": skill_of[k].skill.name, "version": f"v{k}", "alpha": round(c, 4),
                          "recorded_alpha": format_alphas(skill_of[k].alphas)}
                         for k, c in sorted(est["coefficients"].items()) if c >= min_alpha]
            fuzzy = est["residual"] <= 0.5
            report.update(match="fuzzy" if fuzzy else "none", version=f"v{nearest}" if fuzzy and nearest is not None else None,
                          nearest={"version": f"v{nearest}", "distance": est["distances"][nearest]} if nearest is not None else None,
                          skills=contained if fuzzy else [], residual=est["residual"], samples=est["samples"],
                          renamed=any(k != v_ for k, v_ in names.items()))
            return self._flag_revoked(report)

    def _lineage_detail(self, s, version: Version) -> list[dict]:
        out = []
        for v in reversed(ancestors(s, version)):
            entry = {"version": v.label, "digest": v.digest, "author": v.author, "created_at": _iso(v.created_at),
                     "evals": [{"suite": e.suite, "split": e.split, "metric": e.metric, "value": e.value,
                                "episodes": e.episodes}
                               for e in s.scalars(select(Eval).where(Eval.version_id == v.id))]}
            if v.skill is None and v.parent_id is not None:
                entry["merge"] = self._merge_entry(v)
            elif v.skill is None:
                entry["base"] = {"source": v.source}
            else:
                sk, tv = v.skill, v.skill.task_vector
                entry.update(skill=sk.name, alpha=format_alphas(v.alphas), alphas=v.alphas,
                             demos={"uri": sk.demos_uri, "digest": sk.demos_digest, "dvc_hash": sk.demos_dvc_hash,
                                    "git_rev": sk.demos_git_rev},
                             trainer=sk.trainer, trainer_settings=sk.trainer_settings,
                             finetuned_digest=sk.finetuned_digest, codec=tv.codec)
            out.append(entry)
        return out

    # ----------------------------------------------------------------- keyframes

    def keyframes(self) -> frozenset[str]:
        """Weights digests of the versions kept whole (each is its own object in the store)."""
        with self.db.read() as s:
            return frozenset(s.scalars(select(Version.digest).join(Keyframe, Keyframe.version_id == Version.id)))

    @integrity.explained
    def pin(self, ref: str, progress: Progress = None, options: Options = Options()) -> dict:
        """Keep REF whole in the store, so it and its descendants rebuild from there."""
        with self.db.read() as s:
            v = resolve(s, ref, self.head)
            existing = s.get(Keyframe, v.id)
        if not self.store.has(v.digest):
            chain = open_chain(self.store, v.manifest, self.keyframes())
            try:
                with self.store.writer() as w:
                    w.write(header_bytes(canonical(chain.specs)))
                    digest = materialize(chain, _ObjectSink(w), progress, options)
                    if digest != v.digest:
                        raise IntegrityError(f"rebuilt {v.label} has digest {digest}, recorded {v.digest}")
                    w.commit()
            finally:
                chain.close()
        if existing is None:
            with self.db.write() as s:
                if s.get(Keyframe, v.id) is None:
                    s.add(Keyframe(version_id=v.id, reason="pin"))
        return {"version": v.label, "digest": v.digest, "keyframe": True}

    def unpin(self, ref: str) -> dict:
        with self.db.write() as s:
            v = resolve(s, ref, self.head)
            if v.id == 0:
                raise RefError("v0 is the base: it is always kept whole")
            row = s.get(Keyframe, v.id)
            if row is not None:
                s.delete(row)
        return {"version": v.label, "digest": v.digest, "keyframe": False}

    # ----------------------------------------------------------------- strong digests

    def rebuild_bytes(self, without_sha256: bool = False) -> int:
        """Bytes a full fsck (or the SHA-256 backfill) rebuilds: a progress bar's total."""
        q = select(func.sum(Version.n_bytes))
        if without_sha256:
            q = q.where(Version.sha256.is_(None))
        with self.db.read() as s:
            return int(s.scalar(q) or 0)

    def _rebuilt_digests(self, v: Version, keyframes: frozenset[str], sha256: bool, progress: Progress,
                         options: Options) -> tuple[str, str | None]:
        """Rebuild `v` without writing it anywhere: its xxh3 digest and, if asked, its SHA-256."""
        chain = open_chain(self.store, v.manifest, keyframes)
        try:
            hasher = WeightsDigest(chain.specs, sha256=sha256)
            return materialize(chain, None, progress, options, hasher=hasher), hasher.sha256
        finally:
            chain.close()

    def backfill_sha256(self, progress: Progress = None, options: Options = Options()) -> dict:
        """Record the SHA-256 of every version that has none (written before schema 0004).

        Each such version is rebuilt and hashed. Its SHA-256 is recorded only when the rebuild
        matches the recorded xxh3 digest, and only while the column is still NULL: a recorded value
        is never overwritten. The result vouches for the objects as they are now (trust on first
        use), so run it right after `db upgrade`.
        """
        with self.db.read() as s:
            todo = s.scalars(select(Version).where(Version.sha256.is_(None)).order_by(Version.id)).all()
        keyframes = self.keyframes()
        filled: list[dict] = []
        problems: list[dict] = []
        for v in todo:
            try:
                digest, sha256 = self._rebuilt_digests(v, keyframes, True, progress, options)
            except SkillbankError as e:
                problems.append({"version": v.label, "problem": str(e)})
                continue
            if digest != v.digest:
                problems.append({"version": v.label, "problem": f"rebuilds to {digest}, recorded {v.digest}; "
                                                               "SHA-256 not recorded (run `skillbank fsck`)"})
                continue
            with self.db.write() as s:
                s.execute(update(Version).where(Version.id == v.id, Version.sha256.is_(None))
                          .values(sha256=sha256))
            filled.append({"version": v.label, "sha256": sha256})
        return {"ok": not problems, "missing": len(todo), "filled": filled, "problems": problems}

    # --- remotes / export
    #
    # Objects travel through DVC's filesystem layer (store/remote.py) and keep the store's layout
    # under the remote's root (objects/ab/...). Every fetched object is hashed before use. A second
    # machine is a second bank directory on the same database (`clone`), fetching what it lacks.

    def remotes(self) -> list[dict]:
        from skillbank.store import remote as rm

        conf = rm.load_remotes(self.root)
        first = rm.default_name(conf)
        return [{"name": n, "url": c["url"], "default": n == first} for n, c in conf.items()]

    def remote_add(self, name: str, url: str, default: bool = False) -> dict:
        from skillbank.store import remote as rm

        if not rm.NAME_RE.match(name):
            raise ValidationError(f"remote name {name!r}: use letters, digits, '.', '_' or '-'")
        conf = rm.load_remotes(self.root)
        if name in conf:
            raise ValidationError(f"remote {name!r} already exists ({conf[name]['url']})")
        url = rm.normalize_url(url)
        rm.Remote(name, url).fs  # an unknown scheme or a missing DVC plugin fails now, in one line
        if default:
            for c in conf.values():
                c.pop("default", None)
        conf[name] = {"url": url, **({"default": True} if default or not conf else {})}
        rm.save_remotes(self.root, conf)
        return {"name": name, "url": url, "default": rm.default_name(conf) == name}

    def remote_remove(self, name: str) -> dict:
        from skillbank.store import remote as rm

        conf = rm.load_remotes(self.root)
        if name not in conf:
            raise ValidationError(f"no remote named {name!r}")
        removed = conf.pop(name)
        rm.save_remotes(self.root, conf)
        return {"name": name, "url": removed["url"], "removed": True}

    def _remote(self, name: str | None):
        from skillbank.store import remote as rm

        conf = rm.load_remotes(self.root)
        if not conf:
            raise ValidationError("no remote configured; add one with `skillbank remote add NAME URL`")
        name = name or rm.default_name(conf)
        if name not in conf:
            raise ValidationError(f"no remote named {name!r} (known: {', '.join(conf)})")
        return rm.Remote(name, conf[name]["url"])

    def _versions_for(self, refs) -> list[Version]:
        with self.db.read() as s:
            if refs:
                return [resolve(s, r, self.head) for r in refs]
            return list(s.scalars(select(Version).order_by(Version.id)))

    def _objects_for(self, versions: list[Version], ensure: Callable[[str], bool]) -> tuple[list[str], list[str]]:
        """Every object the versions need to rebuild (content first, manifests base-to-tip), and
        the keyframes on their chains (optional: a rebuild can always start from the base).
        `ensure(manifest)` makes a manifest readable, or returns False to skip the rest of that chain."""
        keyframes = self.keyframes()
        content: list[str] = []
        manifests: list[str] = []
        optional: list[str] = []
        seen: set[str] = set()
        # Depth-first, each manifest listed after the manifests it is rebuilt from (post-order):
        # its parent (unless it is kept whole: `base` set) and, for a delta step, the version its
        # task vector was encoded against.
        stack: list[tuple[str, bool]] = [(v.manifest, False) for v in reversed(versions)]
        while stack:
            digest, done = stack.pop()
            if done:
                manifests.append(digest)
                continue
            if digest in seen:
                continue
            seen.add(digest)
            if not ensure(digest):
                continue
            m = self.store.get_json(digest)
            step = m.get("step") or {}
            for d in (m.get("base"), m.get("config"), m.get("train_config"), step.get("task_vector")):
                if d and d not in seen:
                    seen.add(d)
                    content.append(d)
            if m.get("digest") in keyframes and m["digest"] not in seen:
                seen.add(m["digest"])
                optional.append(m["digest"])
            stack.append((digest, True))
            for dep in (None if m.get("base") else m.get("parent_manifest"), step.get("delta_parent_manifest")):
                if dep and dep not in seen:
                    stack.append((dep, False))
        return content + manifests, optional

    @integrity.explained
    def push(self, refs=(), remote: str | None = None) -> dict:
        """Upload every object the versions need (all versions when none is named) to a remote.

        Content goes before the manifests that name it, so a remote never holds a manifest whose
        objects are missing; objects the remote already holds (same size) are skipped."""
        r = self._remote(remote)
        versions = self._versions_for(refs)
        absent: list[str] = []  # with no REF: objects of versions added elsewhere and never fetched here

        def available(d: str) -> bool:
            if self.store.has(d) or r.size(d) is not None:
                return True
            if refs:
                raise IntegrityError(f"object {d} is neither in this bank nor on remote {r.name!r}; "
                                     "push it from the bank directory that added it")
            absent.append(d)
            return False

        needed, optional = self._objects_for(versions, available)
        uploaded = sent = 0
        for d in optional:
            if self.store.has(d):
                n = r.upload(self.store, d)
                uploaded, sent = uploaded + (n > 0), sent + n
        for d in needed:
            if not self.store.has(d):
                available(d)  # already on the remote, or recorded as absent (an error for a named REF)
                continue
            n = r.upload(self.store, d)
            uploaded, sent = uploaded + (n > 0), sent + n
        return {"remote": r.name, "url": r.url, "versions": [v.label for v in versions],
                "objects": len(needed) + len(optional), "uploaded": uploaded, "bytes": sent,
                "absent": absent}

    @integrity.explained
    def pull(self, refs=(), remote: str | None = None) -> dict:
        """Fetch every object the versions need (all when none is named) from a remote, verified."""
        r = self._remote(remote)
        versions = self._versions_for(refs)
        fetched = [0]

        def ensure(d: str) -> bool:
            if self.store.has(d):
                return True
            if not r.fetch(self.store, d):
                raise IntegrityError(f"object {d} is neither in this bank nor on remote {r.name!r} ({r.url})")
            fetched[0] += 1
            return True

        needed, optional = self._objects_for(versions, ensure)
        for d in needed:
            ensure(d)
        for d in optional:
            if not self.store.has(d) and r.fetch(self.store, d):
                fetched[0] += 1
        return {"remote": r.name, "url": r.url, "versions": [v.label for v in versions],
                "objects": len(needed) + len(optional), "fetched": fetched[0]}

    @classmethod
    def clone(cls, root: str | os.PathLike, db_url: str, *, remote_url: str | None = None,
              remote_name: str = "origin") -> tuple["Bank", dict]:
        """A new bank directory for an existing database (shared PostgreSQL, or a copied SQLite file).

        Writes bank.json with the database's bank_id and URL (without a password) and, optionally,
        a default remote; objects are then pulled or fetched lazily on checkout."""
        from sqlalchemy.engine import make_url

        from skillbank.store import remote as rm

        root = Path(root)
        if (root / BANK_FILE).exists():
            raise SkillbankError(f"a bank already exists at {root}")
        if remote_url and not rm.NAME_RE.match(remote_name):
            raise ValidationError(f"remote name {remote_name!r}: use letters, digits, '.', '_' or '-'")
        try:
            parsed = make_url(db_url)
        except Exception:
            raise SkillbankError(f"cannot use database URL {db_url!r}") from None
        if parsed.get_backend_name() == "sqlite":
            dbfile = parsed.database
            if not dbfile or dbfile == ":memory:" or not Path(dbfile).is_file():
                raise SkillbankError(f"no SQLite database at {dbfile or db_url!r}")
            parsed = parsed.set(database=str(Path(dbfile).resolve()))
            db_url = parsed.render_as_string(hide_password=False)
        saved_url = _without_password(db_url)
        db = Database(db_url)
        created = not root.exists()
        try:
            try:
                migrate.ensure_current(db.engine)
                with db.read() as s:
                    row = s.get(Meta, "bank_id")
                    branch_names = list(s.scalars(select(Ref.name).where(Ref.kind == "branch").order_by(Ref.name)))
                    n_versions = s.scalar(select(func.count()).select_from(Version))
            except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
                raise SkillbankError(f"cannot reach the database: {str(e.orig).strip().splitlines()[0]}") from None
            if row is None:
                raise SkillbankError(f"the database at {saved_url!r} holds no bank; nothing to clone")
            remotes = {}
            if remote_url:
                remote_url = rm.normalize_url(remote_url)
                rm.Remote(remote_name, remote_url).fs
                remotes = {remote_name: {"url": remote_url, "default": True}}
            ObjectStore(root).create()
            info = {"format": 1, "bank_id": row.value, "db_url": saved_url}
            if remotes:
                info["remotes"] = remotes
            write_text_atomic(root / BANK_FILE, json.dumps(info, indent=2) + "\n")
            head = Head(branch="main" if "main" in branch_names or not branch_names else branch_names[0])
            write_head(root, head, f"clone {saved_url}")
        except BaseException:
            db.dispose()
            if created:
                shutil.rmtree(root, ignore_errors=True)
            raise
        bank = cls(root, db, row.value)
        return bank, {"bank": row.value, "root": str(root), "db": saved_url, "versions": n_versions,
                      "branches": branch_names, "head": head.describe(),
                      "remote": {"name": remote_name, "url": remote_url} if remote_url else None}

    @integrity.explained
    def export(self, ref: str, fmt: str, out: str | os.PathLike, *, max_shard_size: int | None = None,
               progress: Progress = None, options: Options = Options()) -> dict:
        """A directory `from_pretrained` (hf) or `lerobot-train --policy.path` (lerobot) accepts."""
        return self._export(ref, fmt, self._outside(out), max_shard_size=max_shard_size, progress=progress,
                            options=options)

    def _export(self, ref: str, fmt: str, out: Path, *, max_shard_size: int | None = None,
                progress: Progress = None, options: Options = Options()) -> dict:
        from skillbank import hub

        if fmt not in ("hf", "lerobot"):
            raise ValidationError(f"--format {fmt!r}: expected hf or lerobot")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise SkillbankError(f"--out {out} exists and is not an empty directory")
        with self.db.read() as s:
            version = resolve(s, ref, self.head)
            lineage = self._lineage(s, version)
            details = [{"version": v.label, "skill": v.skill.name, "alpha": format_alphas(v.alphas),
                        "alphas": v.alphas, "demos_digest": v.skill.demos_digest,
                        "finetuned_digest": v.skill.finetuned_digest}
                       for v in reversed(ancestors(s, version)) if v.skill is not None]
        manifest = self.store.get_json(version.manifest)
        if fmt == "lerobot" and not manifest.get("config"):
            raise ValidationError(f"{version.label} has no config.json (its base was not a LeRobot policy "
                                  "directory); export it with --format hf")
        shard = max_shard_size or (manifest.get("layout") or {}).get("max_shard_size") or 5 * 10**9
        created = not out.exists()
        try:
            done = self._materialize(version, out, lineage, shard, progress, options)
            if manifest.get("train_config"):
                write_text_atomic(out / "train_config.json", self.store.get_bytes(manifest["train_config"]).decode())
            write_text_atomic(out / "README.md",
                              hub.export_card(fmt, version.label, version.digest, self.id, lineage, details))
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for p in out.iterdir():
                    p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)
            raise
        return {"version": version.label, "digest": version.digest, "format": fmt, "out": str(out),
                "files": sorted(p.name for p in out.iterdir()), "shards": len(done["files"]),
                "base_model": hub.base_model_of(lineage), "verified": True}

    @integrity.explained
    def push_hub(self, ref: str, target: str, *, revision: str | None = None, fmt: str = "hf",
                 max_shard_size: int | None = None, progress: Progress = None,
                 options: Options = Options()) -> dict:
        """Export REF and upload it to hf://ORG/NAME: one commit naming the version, tag skillbank-vN."""
        import tempfile

        from skillbank import hub

        repo_id = hub.parse_target(target)
        version = self.resolve(ref)
        hub.check_online(target)  # before any work: offline leaves nothing behind
        self.store.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.store.tmp, prefix="hub-") as work:
            folder = Path(work) / "export"
            exported = self._export(version.label, fmt, folder, max_shard_size=max_shard_size,
                                    progress=progress, options=options)  # a work dir of the bank's own
            with self.db.read() as s:
                v = s.get(Version, version.id)
                what = f"skill {v.skill.name} (alpha {format_alphas(v.alphas)})" if v.skill else "base"
            tag = f"skillbank-{version.label}"
            result = hub.upload(folder, repo_id, target, revision=revision,
                                commit_message=f"skillbank {version.label}: {what}, digest {version.digest}",
                                tag=tag, tag_message=f"skillbank {version.label} of bank {self.id}, "
                                                     f"digest {version.digest}")
        result.update(version=version.label, digest=version.digest, format=fmt, files=exported["files"],
                      base_model=exported["base_model"])
        return result

    # --- revoke / rebuild / merge

    def revoke(self, skill: str, reason: str) -> dict:
        """Withdraw a skill by name: every version that contains it stays, but `audit` flags it."""
        if not reason or not reason.strip():
            raise ValidationError("--reason is required: say why the skill is revoked")
        with self.db.write() as s:
            versions = s.scalars(select(Version.id).join(Skill, Version.skill_id == Skill.id)
                                 .where(Skill.name == skill).order_by(Version.id)).all()
            if not versions:
                raise ValidationError(f"no skill named {skill!r} in this bank")
            existing = s.get(Revocation, skill)
            if existing is not None:
                raise ValidationError(f"skill {skill!r} was already revoked by {existing.author} "
                                      f"at {_iso(existing.created_at)}: {existing.reason}")
            row = Revocation(skill_name=skill, reason=reason.strip(), author=self.author)
            s.add(row)
            s.flush()
            at = _iso(row.created_at)
        return {"skill": skill, "reason": reason.strip(), "author": self.author, "revoked_at": at,
                "versions": [f"v{v}" for v in versions]}

    def revocations(self) -> dict[str, dict]:
        with self.db.read() as s:
            return {r.skill_name: {"reason": r.reason, "author": r.author, "revoked_at": _iso(r.created_at)}
                    for r in s.scalars(select(Revocation))}

    def _flag_revoked(self, report: dict) -> dict:
        """Add `revoked`: the skills of an audit report that have been revoked (empty when none)."""
        revoked = self.revocations()
        report["revoked"] = [{"name": sk["name"], "version": sk.get("version"), **revoked[sk["name"]]}
                             for sk in report.get("skills", []) if sk["name"] in revoked]
        return report

    @integrity.explained
    def rebuild_without(self, ref: str, skill: str, branch: str | None = None, progress: Progress = None,
                        options: Options = Options()) -> dict:
        """Replay REF's chain without `skill` onto a new branch.

        The versions before the skill's first occurrence are kept. Every later step is replayed as
        an additive delta: its task vector (learned on top of the removed skill, encoded against
        the ORIGINAL parent) is decoded against that original parent and `alpha * tau` is added to
        the new parent. Each replayed version records `rebuilt_from` (the original version), keeps
        its skill row and alphas, and has no evals: they must be re-run.
        """

        branch = branch or f"rebuild-without-{skill}"
        check_name(branch, "branch")
        with self.db.read() as s:
            tip = resolve(s, ref, self.head)
            if s.get(Ref, branch) is not None:
                raise RefError(f"{branch!r} already exists; pass --branch NAME for the rebuilt chain")
            chain_versions = list(reversed(ancestors(s, tip)))  # base first
            hits = [i for i, v in enumerate(chain_versions) if v.skill is not None and v.skill.name == skill]
            if not hits:
                raise ValidationError(f"{tip.label} does not contain skill {skill!r}")
            start = chain_versions[hits[0] - 1]
            replay = [v for v in chain_versions[hits[0]:] if not (v.skill is not None and v.skill.name == skill)]
            for v in replay:
                if v.skill is None or v.second_parent_id is not None:
                    raise ValidationError(f"{v.label} is a branch merge; rebuild --without replays "
                                          "single-skill steps only (rebuild each branch, then merge again)")
            replay_info = [(v.id, v.label, v.manifest, v.skill_id, v.skill.name, v.method, v.alphas,
                            v.group_preset, v.n_params, v.n_bytes) for v in replay]
        steps = []
        for v_id, label, manifest, *_ in replay_info:
            m = self.store.get_json(manifest)
            step = m["step"]
            encoded_against = step.get("delta_parent_manifest") or m["parent_manifest"]
            steps.append({"method": step["method"], "apply": "delta", "task_vector": step["task_vector"],
                          "alphas": step["alphas"], "groups": step["groups"], "codec": step.get("codec"),
                          "delta_parent_manifest": encoded_against})
        digests: list[Digests] = []
        if steps:
            keyframes = self.keyframes()
            pool = Opened(self.store)  # every reader opened once, shared by the new chain and the original ones
            try:
                chain = open_chain(self.store, start.manifest, keyframes, pool)
                first = len(chain.steps)
                for st in steps:
                    original = open_chain(self.store, st["delta_parent_manifest"], keyframes, pool)
                    chain.steps.append(Step(st["method"], pool.task_vector(st["task_vector"]), st["alphas"],
                                            st["groups"], "delta", original, None))
                digests = replay_digests(chain, first, progress, options)
            finally:
                pool.close()
        start_manifest = self.store.get_json(start.manifest)
        parent_manifest, created = start.manifest, []
        for (v_id, label, manifest, *_), st, (digest, _) in zip(replay_info, steps, digests):
            parent_manifest = self.store.put_json({
                "format": MANIFEST_FORMAT, "tensors": start_manifest["tensors"], "base": None, "digest": digest,
                "parent_manifest": parent_manifest, "config": start_manifest.get("config"),
                "layout": start_manifest.get("layout"), "step": st, "rebuilt_from": manifest,
            })
            created.append(parent_manifest)
        versions: list[dict] = []
        for attempt in range(20):
            try:
                with self.db.write() as s:
                    vid = s.scalar(select(func.max(Version.id))) or 0
                    parent_id, versions = start.id, []
                    for (v_id, label, _, skill_id, name, method, alphas, preset, n_params, n_bytes), \
                            manifest, (digest, sha256) in zip(replay_info, created, digests):
                        vid += 1
                        s.add(Version(id=vid, parent_id=parent_id, skill_id=skill_id, method=method, alphas=alphas,
                                      group_preset=preset, digest=digest, sha256=sha256, manifest=manifest,
                                      source=None,
                                      n_params=n_params, n_bytes=n_bytes, author=self.author,
                                      rebuilt_from_id=v_id,
                                      message=f"{name} replayed from {label} without {skill}: its task vector "
                                              f"was learned on top of {skill} and is re-applied as stored; "
                                              "evals must be re-run"))
                        s.flush()
                        versions.append({"version": f"v{vid}", "parent": f"v{parent_id}", "skill": name,
                                         "rebuilt_from": label, "digest": digest})
                        parent_id = vid
                    create_ref(s, branch, "branch", parent_id, "rebuild",
                               self.author, f"rebuild {tip.label} without {skill}")
                break
            except sa_exc.IntegrityError:
                if attempt == 19:
                    raise
        return {"branch": branch, "from": tip.label, "without": skill, "kept_base": start.label,
                "version": f"v{parent_id}", "versions": versions}

    @integrity.explained
    def merge_branches(self, ref_a: str, ref_b: str, method: str = "task-arithmetic", *,
                       branch: str | None = None, weights: tuple[float, float] = (1.0, 1.0),
                       params: dict | None = None, message: str | None = None, progress: Progress = None,
                       options: Options = Options()) -> dict:
        """Combine the skills added on two branches since their common ancestor.

        The result is stored whole (a keyframe: the canonical serialisation whose digest is the
        version's digest), so it and its descendants rebuild from it; it records both parents.
        """

        if method not in COMBINERS:
            raise ValidationError(f"unknown merge method {method!r} (known: {', '.join(sorted(COMBINERS))})")
        weights = tuple(float(w) for w in weights)
        if len(weights) != 2 or not all(math.isfinite(w) for w in weights):
            raise ValidationError("--weights: two finite numbers, one per branch")
        p = {**COMBINE_DEFAULTS[method], **(params or {})}
        if method == "ties" and not 0.0 < float(p["density"]) <= 1.0:
            raise ValidationError("--density must be in (0, 1]")
        if method == "dare" and not 0.0 <= float(p["drop"]) < 1.0:
            raise ValidationError("--drop must be in [0, 1)")
        head = self.head
        with self.db.read() as s:
            a, b = resolve(s, ref_a, head), resolve(s, ref_b, head)
            anc = self._common_ancestor(s, a, b)
            if anc is None:
                raise ValidationError(f"{a.label} and {b.label} have no common ancestor")
            if anc.id in (a.id, b.id):
                inner, outer = (a, b) if anc.id == a.id else (b, a)
                raise ValidationError(f"{inner.label} is an ancestor of {outer.label}: nothing to combine "
                                      f"(move the branch instead)")
            if branch is None:
                r = s.get(Ref, ref_a)
                if r is None or r.kind != "branch":
                    raise RefError(f"{ref_a!r} is not a branch; pass --branch NAME to hold the merge")
                branch = ref_a
            check_name(branch, "branch")
            target = s.get(Ref, branch)
            if target is not None and (target.kind != "branch" or target.version_id != a.id):
                raise RefError(f"{branch!r} is at v{target.version_id}, not at {a.label}; name a new branch")
            expected = target.version_id if target is not None else None
            sides_skills = [[v.skill.name for v in reversed(ancestors(s, x))
                             if v.id > anc.id and v.skill is not None] for x in (a, b)]
            n_params, n_bytes = a.n_params, a.n_bytes
        keyframes = self.keyframes()
        chains = []
        keep = self.store.writer()
        try:
            for v in (anc, a, b):
                chains.append(open_chain(self.store, v.manifest, keyframes))
            digest, sha256 = combine_pass(chains[0], chains[1:], method, list(weights), p, keep, progress, options)
            if keep.commit() != digest:
                raise IntegrityError("the merged object's digest differs from its weights digest")
        except BaseException:
            keep.abort()
            raise
        finally:
            for c in chains:
                c.close()
        a_manifest = self.store.get_json(a.manifest)
        recipe = {"method": method, "weights": list(weights), "params": p, "ancestor": anc.label,
                  "ancestor_manifest": anc.manifest, "parents": [a.label, b.label]}
        manifest = self.store.put_json({
            "format": MANIFEST_FORMAT, "tensors": a_manifest["tensors"], "base": digest, "digest": digest,
            "parent_manifest": None, "parents": [a.manifest, b.manifest], "config": a_manifest.get("config"),
            "layout": a_manifest.get("layout"), "step": None, "merge": recipe,
        })
        msg = message or (f"merge {ref_b} into {ref_a} ({method}) since {anc.label}: "
                          f"{', '.join(sides_skills[0]) or '-'} + {', '.join(sides_skills[1]) or '-'}")
        for attempt in range(20):
            try:
                with self.db.write() as s:
                    vid = (s.scalar(select(func.max(Version.id))) or 0) + 1
                    s.add(Version(id=vid, parent_id=a.id, second_parent_id=b.id, skill_id=None,
                                  method=f"merge:{method}", alphas=None, group_preset=None, digest=digest,
                                  sha256=sha256,
                                  manifest=manifest, source=None, n_params=n_params, n_bytes=n_bytes,
                                  author=self.author, message=msg))
                    s.flush()
                    s.add(Keyframe(version_id=vid, reason="merge"))
                    if expected is None:
                        create_ref(s, branch, "branch", vid, "merge", self.author, msg)
                    else:
                        move_branch(s, branch, expected, vid, "merge", self.author, msg)
                break
            except sa_exc.IntegrityError:
                if attempt == 19:
                    raise
        return {"version": f"v{vid}", "parents": [a.label, b.label], "ancestor": anc.label, "branch": branch,
                "method": method, "weights": list(weights), "params": p, "digest": digest,
                "skills": {"a": sides_skills[0], "b": sides_skills[1]}}

    def _row_extra(self, s, v: Version) -> dict:
        """What log/show add for revocations, branch merges and rebuilt versions."""
        r = s.get(Revocation, v.skill.name) if v.skill is not None else None
        return {"revoked": r is not None, "revoked_reason": r.reason if r is not None else None,
                "second_parent": f"v{v.second_parent_id}" if v.second_parent_id is not None else None,
                "rebuilt_from": f"v{v.rebuilt_from_id}" if v.rebuilt_from_id is not None else None}

    def _merge_entry(self, v: Version) -> dict:
        m = self.store.get_json(v.manifest).get("merge") or {}
        return {"method": m.get("method", v.method), "parents": [f"v{v.parent_id}", f"v{v.second_parent_id}"],
                "ancestor": m.get("ancestor"), "weights": m.get("weights"), "params": m.get("params")}

    def _contained_skills(self, s, v: Version) -> list[dict]:
        """Every skill version reachable from `v` through first and second parents, oldest first."""
        found = [row for row in reachable(s, v) if row.skill is not None]
        return [{"name": x.skill.name, "version": x.label, "alpha": format_alphas(x.alphas), "alphas": x.alphas}
                for x in sorted(found, key=lambda x: x.id)]

    @staticmethod
    def _common_ancestor(s, a: Version, b: Version) -> Version | None:
        """The newest version reachable from both (through first and second parents)."""
        common = {x.id for x in reachable(s, a)} & {x.id for x in reachable(s, b)}
        return s.get(Version, max(common)) if common else None

    # ----------------------------------------------------------------- upkeep

    def referenced_objects(self) -> set[str]:
        """Every object a version or a database row names (what gc keeps)."""
        with self.db.read() as s:
            return ObjectUses.build(s, self.store).referenced()

    def fsck(self, rebuild: bool = True, progress: Progress = None, options: Options = Options(),
             repair: bool = False) -> dict:
        """Every object against its digest, every version's manifest and (by default) its rebuild.

        Reports what is here: nothing is fetched lazily. `repair` first restores damaged and
        missing objects from the remotes (integrity.repair), then checks; `repairs` says what it did.
        """
        with integrity.local_only(self.store):
            repairs = integrity.repair(self) if repair else None
            report = self._fsck(rebuild, progress, options)
        if repairs is not None:
            report["repairs"] = repairs
        return report

    def _fsck(self, rebuild: bool, progress: Progress, options: Options) -> dict:
        problems: list[dict] = integrity.object_problems(self)  # each with the versions it breaks
        with self.db.read() as s:
            versions = s.scalars(select(Version).order_by(Version.id)).all()
        checked = 0
        for v in versions:
            try:
                manifests_of(self.store, v.manifest)
                if rebuild:  # from the base, ignoring keyframes: those are checked as objects
                    digest, sha256 = self._rebuilt_digests(v, frozenset(), v.sha256 is not None, progress, options)
                    if digest != v.digest:
                        problems.append({"version": v.label, "problem": f"rebuilds to {digest}, recorded {v.digest}"})
                    elif v.sha256 is not None and sha256 != v.sha256:
                        problems.append({"version": v.label,
                                         "problem": f"rebuilds to its xxh3 digest but to SHA-256 {sha256}, "
                                                    f"recorded {v.sha256} (forged objects or an edited database)"})
                checked += 1
            except SkillbankError as e:
                problems.append({"version": v.label, "problem": str(e)})
        return {"ok": not problems, "objects": sum(1 for _ in self.store), "versions": len(versions),
                "rebuilt": checked if rebuild else 0, "problems": problems,
                "sha256_missing": [v.label for v in versions if v.sha256 is None]}

    def gc(self, grace_seconds: float = 3600.0, dry_run: bool = False) -> dict:
        """Remove objects no version references, once older than the grace period.

        The grace period protects a concurrent add-skill, whose objects are written before its
        rows are committed.
        """
        with self.db.read() as s:
            uses = ObjectUses.build(s, self.store)
        if uses.unreadable:
            # Its base, task vector and config are unknown: collecting now could delete them for good.
            raise IntegrityError(f"gc refused: manifest {uses.unreadable[0]} cannot be read here, so the objects "
                                 "it needs are unknown; run `skillbank fsck --repair` first")
        keep = uses.referenced()
        removed, freed = [], 0
        for d in list(self.store):
            if d in keep or self.store.age(d) < grace_seconds:
                continue
            removed.append(d)
            if not dry_run:
                freed += self.store.remove(d)
        stale = self.store.stale_temp_files(max(grace_seconds, 60.0))
        if not dry_run:
            for p in stale:
                p.unlink(missing_ok=True)
        return {"removed": len(removed), "bytes_freed": freed, "temp_files": len(stale), "dry_run": dry_run,
                "objects": removed}


def _interrupted_init(s, db_url: str | None, base_digest: str) -> bool:
    """The bank's own SQLite file holds exactly one version, this base: an init that was killed
    between its commit and writing bank.json, which a re-run may finish."""
    if db_url is not None:  # a shared database may hold someone else's bank with the same base
        return False
    ids = s.scalars(select(Version.id)).all()
    return ids == [0] and s.get(Version, 0).digest == base_digest


def _bank_database(root: Path, db_url: str | None) -> tuple[dict, Database]:
    """The bank's marker file and its database: --db, else the URL given at init, else SQLite inside."""
    info = bankdir.read_bank_file(root)
    url = db_url or info.get("db_url") or Bank.default_db_url(root)
    bankdir.check_sqlite_exists(url)
    bankdir.check_store_layout(root)
    return info, Database(url)


def _without_password(url: str) -> str:
    """The URL to keep in bank.json: a password never goes to a file other users may read."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.password:
        return url
    # not URL.set(password=None): `set` reads None as "leave unchanged" and keeps the password
    return parsed._replace(password=None).render_as_string(hide_password=False)


def upgrade_database(root: str | os.PathLike, db_url: str | None = None) -> dict:
    """`skillbank db upgrade` must work on exactly the databases that Bank.open refuses."""
    _, db = _bank_database(Path(root), db_url)
    try:
        before, after = migrate.upgrade(db.engine)
        with db.read() as s:
            missing = s.scalar(select(func.count()).select_from(Version).where(Version.sha256.is_(None)))
    finally:
        db.dispose()
    # Filling them means rebuilding every version: a separate, resumable command, not part of a
    # schema migration (which must stay quick and must work before the bank can be opened).
    return {"from": before, "to": after, "sha256_missing": missing}


class _ObjectSink:
    """Lets `materialize` stream a rebuild into a store object (its writer interface)."""

    def __init__(self, writer):
        self._w = writer

    def write(self, name: str, chunk) -> None:
        self._w.write(as_bytes(chunk))
