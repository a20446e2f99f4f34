"""Hostile and malformed input at the command line: one table of cases, one test (issue #6).

Each case builds its hostile input beside a fresh copy of one small bank (main: v0 -> v1, side:
v0 -> v2, tag rel at v1, HEAD on main), runs the console entry point `skillbank.cli.main`
in-process, and checks what DESIGN invariants 5 and 6 promise:

- exit 1, exactly one non-empty line on stderr starting with "error:", no traceback, no stdout;
- the bank exactly as it was: every file's bytes (objects, HEAD, logs, bank.json; tmp/ empty)
  and every row of every table of its SQLite database;
- nothing created or changed anywhere else under the test's directory (a name that escapes, a
  config that points outside), and nothing unpickled (the pickles here create a marker file when
  loaded).

Tampering with the bank (a damaged HEAD, a cycle in the database, a link in objects/) is part of
a case's input: the snapshot is taken after it. Unit-level refusals are tested in test_tensors.py,
test_codecs*.py and test_demos.py; the cases here that overlap tests/test_cli.py's BAD_INPUTS are
variants it does not have.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sqlite3
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import load_model, make_finetuned, make_model, run_main, save_model
from skillbank.cli import cli
from skillbank.train.demos import write_demos

MARKER = "UNPICKLED"


class Evil:
    """Unpickling this creates the marker file: proof that something ran pickle.load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- the template bank

@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template")
    models = root / "models"
    base = make_model(models / "base.safetensors", seed=0)
    ft1 = make_finetuned(base, models / "ft1.safetensors", seed=1)
    ft2 = make_finetuned(base, models / "ft2.safetensors", seed=2)
    bank = root / "bank"

    def ok(*args):
        r = CliRunner().invoke(cli, ["--bank", str(bank), *map(str, args)])
        assert r.exit_code == 0, (args, r.output, r.exception)

    ok("init", "--base", base)
    ok("add-skill", "s1", "--finetuned", ft1, "--alpha", "0.8")
    ok("branch", "side", "v0")
    ok("add-skill", "s2", "--finetuned", ft2, "--alpha", "0.5", "--from", "v0", "--branch", "side")
    ok("tag", "rel", "v1")
    ok("checkout", "v1", "--out", root / "v1")
    ok("checkout", "main")
    make_finetuned(root / "v1", models / "ft-v1.safetensors", seed=5)
    shutil.rmtree(root / "v1")
    return root


@dataclass
class Ctx:
    """What a case builds its input with: a fresh bank copy, a scratch dir, the template's models."""

    tmp: Path
    bank: Path
    models: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def ft(self) -> Path:
        """A valid checkpoint finetuned from v1 (main's tip): what a case damages."""
        return self.models / "ft-v1.safetensors"

    def path(self, name: str) -> Path:
        p = self.tmp / "in" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_model(self.ft)

    def variant(self, name: str, edit: Callable[[dict], None]) -> Path:
        t = self.tensors()
        edit(t)
        return save_model(self.path(f"{name}.safetensors"), t)

    def lie(self, name: str, edit: Callable[[dict], object], length: Callable[[int], int] | None = None) -> Path:
        """The finetuned file with its JSON header edited (data bytes unchanged); `edit` may
        return replacement header bytes. `length(file size)` overrides the 8-byte header length."""
        raw = self.ft.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        text = edit(header)
        text = text if isinstance(text, bytes) else json.dumps(header).encode()
        path = self.path(f"{name}.safetensors")
        size = 8 + len(text) + len(raw) - 8 - n
        path.write_bytes(struct.pack("<Q", len(text) if length is None else length(size)) + text + raw[8 + n:])
        return path

    def sql(self, *statements: str) -> None:
        with sqlite3.connect(self.bank / "bank.db") as con:
            con.execute("PRAGMA foreign_keys=OFF")
            for s in statements:
                con.execute(s)

    def demos(self, name: str = "demos") -> Path:
        rng = np.random.default_rng(0)
        eps = [{"obs": rng.standard_normal((5, 39)), "action": rng.standard_normal((5, 4)), "task": "reach"}]
        return write_demos(self.path(name), eps)


# ----------------------------------------------------------------------------- snapshots

DB_FILES = {"bank.db", "bank.db-wal", "bank.db-shm"}


def files_under(root: Path, skip=frozenset()) -> dict[str, str]:
    """Every file and link under `root` (not followed): relative path -> hash of bytes / target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel in skip:
                continue
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def db_rows(bank: Path) -> dict[str, list]:
    with sqlite3.connect(f"file:{bank / 'bank.db'}?mode=ro", uri=True) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"'))) for t in tables}


def snapshot(ctx: Ctx) -> dict:
    return {"bank": files_under(ctx.bank, DB_FILES), "rows": db_rows(ctx.bank),
            "around": files_under(ctx.tmp, {f"bank/{f}" for f in DB_FILES} | {"bank"})}


CASE_SECONDS = 60


# ----------------------------------------------------------------------------- case builders

def add(path_of, alpha="0.8", *extra):
    return lambda c: ["add-skill", "bad", "--finetuned", path_of(c), "--alpha", alpha, *extra]


def add_ft(*extra, alpha="0.8"):
    return add(lambda c: c.ft, alpha, *extra)


def init(path_of):
    """init of a new bank beside the existing one: it must not appear."""
    return lambda c: ["--bank", c.tmp / "new-bank", "init", "--base", path_of(c)]


def pickle_file(name: str, torch_zip: bool = False):
    def build(c: Ctx) -> Path:
        path = c.path(name)
        if torch_zip:
            torch.save({"w": torch.zeros(2), "evil": Evil(c.tmp / MARKER)}, path)
        else:
            path.write_bytes(pickle.dumps({"w": Evil(c.tmp / MARKER)}))
        return path
    return build


def directory(name: str, files: dict[str, Callable[[Ctx, Path], None]]):
    def build(c: Ctx) -> Path:
        d = c.path(name)
        d.mkdir(parents=True, exist_ok=True)
        for fname, make in files.items():
            make(c, d / fname)
        return d
    return build


def split_map(names):
    half = len(names) // 2
    return {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}


def sharded(name: str, weight_map_of=split_map, tweak=None, index_text: str | None = None):
    """A two-shard copy of the finetuned checkpoint; `tweak(c, dir, first, second, weight_map)`
    edits the shards' tensors and the index before they are written."""
    def build(c: Ctx) -> Path:
        d = c.path(name)
        d.mkdir(parents=True, exist_ok=True)
        t = c.tensors()
        names = sorted(t)
        first, second = {k: t[k] for k in names[:len(names) // 2]}, {k: t[k] for k in names[len(names) // 2:]}
        weight_map = weight_map_of(names)
        if tweak:
            tweak(c, d, first, second, weight_map)
        save_model(d / "model-00001-of-00002.safetensors", first)
        save_model(d / "model-00002-of-00002.safetensors", second)
        (d / "model.safetensors.index.json").write_text(index_text or json.dumps({"weight_map": weight_map}))
        return d
    return build


def third_shard(c, d, first, second, weight_map):
    save_model(d / "model-00003-of-00003.safetensors", first)
    weight_map["x"] = "model-00003-of-00003.safetensors"


def written(name: str, data_of: Callable[[Ctx], bytes]):
    def build(c: Ctx) -> Path:
        p = c.path(name)
        p.write_bytes(data_of(c))
        return p
    return build


def set_entry(field, value, name="language.proj.weight"):
    def edit(h):
        h[name][field] = value
    return edit


def overlap(h):
    a, b = h["action.head.bias"], h["action.head.weight"]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]


def dup_key(h):
    text = json.dumps(h)
    first = json.dumps({"action.steps": h["action.steps"]})[1:-1]
    return text[:-1].encode() + b"," + first.encode() + b"}"


def deep(h):
    h["language.proj.weight"]["shape"] = "@"
    return json.dumps(h).replace('"@"', "[" * 100_000 + "]" * 100_000).encode()


def big_number(h):
    h["language.proj.weight"]["data_offsets"][1] = "@"
    return json.dumps(h).replace('"@"', "9" * 5000).encode()


def sparse_file(name: str, header_length: int, size: int):
    """A file of `size` bytes (a hole after the length field) that claims a `header_length` header."""
    def build(c: Ctx) -> Path:
        p = c.path(name)
        p.write_bytes(struct.pack("<Q", header_length))
        os.truncate(p, size)
        return p
    return build


def truncated(c: Ctx) -> Path:
    raw = c.ft.read_bytes()
    p = c.path("short.safetensors")
    p.write_bytes(raw[:-1])
    return p


def extra_tensor(name, value=None):
    def edit(t):
        t[name] = torch.zeros(4) if value is None else value
    return edit


def info_edit(change: Callable[[dict], None]):
    def build(c: Ctx) -> Path:
        d = c.demos()
        info = json.loads((d / "meta/info.json").read_text())
        change(info)
        (d / "meta/info.json").write_text(json.dumps(info))
        return d
    return build


def demos_with(extra: Callable[[Path], None]):
    def build(c: Ctx) -> Path:
        d = c.demos()
        extra(d)
        return d
    return build


def demos_add(build, alpha="0.8"):
    return lambda c: ["add-skill", "bad", "--demos", build(c), "--alpha", alpha]


def bank_json(change: Callable[[dict, Ctx], None]):
    def tamper(c: Ctx):
        path = c.bank / "bank.json"
        info = json.loads(path.read_text())
        change(info, c)
        path.write_text(json.dumps(info))
    return tamper


def then(tamper: Callable[[Ctx], None], args: list):
    """Tamper with the bank (part of the input), then run `args` (strings or callables of ctx)."""
    def build(c: Ctx) -> list:
        tamper(c)
        return [a(c) if callable(a) else a for a in args]
    return build


def head_file(text: str):
    return lambda c: (c.bank / "HEAD").write_text(text)


def lerobot_dir(config: Callable[[Ctx, Path], None]):
    def build(c: Ctx) -> Path:
        d = c.path("lerobot")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(c.models / "base.safetensors", d / "model.safetensors")
        config(c, d / "config.json")
        return d
    return build


def fifo(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(p)


# ----------------------------------------------------------------------------- the table

CASES: dict[str, tuple[str, Callable[[Ctx], list], str]] = {
    # --- pickle: refused by name, before a byte is read; the marker proves nothing was unpickled
    "pickle-pt": ("pickle", add(pickle_file("evil.pt")), "safetensors only"),
    "pickle-bin": ("pickle", add(pickle_file("pytorch_model.bin")), "safetensors only"),
    "pickle-torch-zip-pth": ("pickle", add(pickle_file("evil.pth", torch_zip=True)), "never unpickles"),
    "pickle-ckpt-as-base": ("pickle", init(pickle_file("evil.ckpt")), "safetensors only"),
    "pickle-pkl-audit": ("pickle", lambda c: ["audit", pickle_file("evil.pkl")(c)], "safetensors only"),
    "pickle-only-dir": ("pickle", add(directory("pt-dir", {"pytorch_model.bin": lambda c, p: p.write_bytes(
        pickle.dumps(Evil(c.tmp / MARKER)))})), "only pickle weights"),
    "pickle-shard-in-index": ("pickle", add(directory("idx-bin", {
        "pytorch_model.bin": lambda c, p: p.write_bytes(pickle.dumps(Evil(c.tmp / MARKER))),
        "model.safetensors.index.json": lambda c, p: p.write_text(json.dumps(
            {"weight_map": {"w": "pytorch_model.bin"}}))})), "safetensors only"),
    "pickle-bytes-named-safetensors": ("pickle", add(written("evil.safetensors", lambda c: pickle.dumps(
        Evil(c.tmp / MARKER)))), "not a valid safetensors file"),

    # --- safetensors headers that lie
    "header-offsets-past-data": ("header", add(lambda c: c.lie("past", set_entry("data_offsets", [0, 10**9]))),
                                 "fall outside"),
    "header-offsets-negative": ("header", add(lambda c: c.lie("neg", set_entry("data_offsets", [-4, 131068]))),
                                "fall outside"),
    "header-offsets-reversed": ("header", add(lambda c: c.lie("rev", set_entry("data_offsets", [8, 4]))),
                                "fall outside"),
    "header-offsets-overlap": ("header", add(lambda c: c.lie("overlap", overlap)), "overlap"),
    "header-shape-vs-bytes": ("header", add(lambda c: c.lie("shape", set_entry("shape", [128, 255]))), "needs"),
    "header-dtype-vs-bytes": ("header", add(lambda c: c.lie("dtype", set_entry("dtype", "F16"))), "needs"),
    "header-unknown-dtype": ("header", add(lambda c: c.lie("f128", set_entry("dtype", "F128"))), "unsupported dtype"),
    "header-dtype-not-a-string": ("header", add(lambda c: c.lie("dtlist", set_entry("dtype", ["F32"]))),
                                  "unsupported dtype"),
    "header-huge-dim-of-empty-tensor": ("header", add(lambda c: c.lie("huge-dim", set_entry(
        "shape", [0, 2**70], "action.steps"))), "bad shape"),
    "header-length-past-eof": ("header", add(lambda c: c.lie("len", lambda h: None, length=lambda size: size - 7)),
                               "runs past the end"),
    "header-length-huge": ("header", add(lambda c: c.lie("len-huge", lambda h: None, length=lambda size: 2**63)), "larger than"),
    "header-over-the-100-MiB-cap": ("header", add(sparse_file("big.safetensors", 100 * 2**20 + 1, 101 * 2**20)),
                                    "larger than"),
    "header-not-json": ("header", add(lambda c: c.lie("notjson", lambda h: b"{not json")), "not JSON"),
    "header-not-utf8": ("header", add(lambda c: c.lie("utf8", lambda h: b'{"\xff": 1}')), "not JSON"),
    "header-duplicate-key": ("header", add(lambda c: c.lie("dup", dup_key)), "appears twice"),
    "header-nested-100k-deep": ("header", add(lambda c: c.lie("deep", deep)), "nested too deeply"),
    "header-5000-digit-number": ("header", add(lambda c: c.lie("digits", big_number)), "not JSON"),
    "header-metadata-not-strings": ("header", add(lambda c: c.lie("meta", lambda h: h.update(
        __metadata__={"k": 1}))), "__metadata__"),
    "header-data-truncated": ("header", add(truncated), "fall outside"),
    "header-lie-as-base": ("header", init(lambda c: c.lie("base-lie", overlap)), "overlap"),
    "header-lie-audit": ("header", lambda c: ["audit", c.lie("audit-lie", set_entry("data_offsets", [0, 7]))],
                         "needs"),
    "index-shard-outside": ("header", add(sharded("sh-out", lambda n: {**split_map(n), n[0]: "../x.safetensors"})),
                            "points outside"),
    "index-shard-absolute": ("header", add(sharded("sh-abs", lambda n: {**split_map(n), n[0]: "/etc/passwd"})),
                             "points outside"),
    "index-tensor-in-two-shards": ("header", add(sharded("sh-two", tweak=third_shard)), "more than one shard"),
    "index-not-json": ("header", add(sharded("sh-bad", index_text="[[[")), "not a valid safetensors index"),

    # --- names that would escape a directory when written out
    "name-tensor-dotdot": ("escape", add(lambda c: c.variant("dotdot", extra_tensor("../../escaped"))), "'..' part"),
    "name-tensor-absolute": ("escape", add(lambda c: c.variant("abs", extra_tensor("/tmp/escaped"))), "absolute"),
    "name-tensor-newline": ("escape", add(lambda c: c.variant("nl", extra_tensor("a\nb"))), "control"),
    "name-tensor-in-base": ("escape", init(lambda c: save_model(c.path("evil-base.safetensors"), {
        "ok.weight": torch.zeros(2), "../../escaped": torch.zeros(2)})), "'..' part"),
    "name-skill-absolute": ("escape", lambda c: ["add-skill", "/tmp/escaped", "--finetuned", c.ft],
                            "invalid skill name"),
    "name-branch-dotdot": ("escape", lambda c: ["branch", "../../escaped", "v1"], "invalid branch name"),
    "name-tag-absolute": ("escape", lambda c: ["tag", "/tmp/escaped", "v1"], "invalid tag name"),
    "name-remote-dotdot": ("escape", lambda c: ["remote", "add", "../../escaped", c.tmp / "remote"], "remote name"),
    "name-hf-revision-dotdot": ("escape", add(lambda c: "hf://org/name@../../../../escaped"), "expected hf://"),
    "name-hf-repo-dotdot": ("escape", add(lambda c: "hf://../.."), "expected hf://"),
    "name-hub-target-dotdot": ("escape", lambda c: ["push", "v1", "hf://../escaped"], "expected hf://"),
    "name-demos-data-path-dotdot": ("escape", demos_add(info_edit(lambda i: i.update(
        data_path="../../escaped/{chunk_index:03d}-{file_index:03d}.parquet"))), "points outside"),
    "name-demos-data-path-absolute": ("escape", demos_add(info_edit(lambda i: i.update(
        data_path="/etc/{chunk_index}-{file_index}.parquet"))), "points outside"),
    "name-out-partial-is-a-link": ("escape", then(
        lambda c: (c.path("out").mkdir(), os.symlink(c.tmp / "escaped", c.path("out") / ".model.safetensors.partial")),
        ["checkout", "v1", "--out", lambda c: c.path("out")]), "symbolic links"),

    # --- wrong dtypes and shapes, missing and extra tensors (test_cli.py has the plain ones)
    "int-buffer-dtype": ("dtype-shape", add(lambda c: c.variant("i32", lambda t: t.update(
        {"action.steps": t["action.steps"].to(torch.int32)}))), "dtype"),
    "float-as-int": ("dtype-shape", add(lambda c: c.variant("f-as-i", lambda t: t.update(
        {"action.head.bias": t["action.head.bias"].to(torch.int32)}))), "dtype"),
    "vector-as-column": ("dtype-shape", add(lambda c: c.variant("col", lambda t: t.update(
        {"action.head.bias": t["action.head.bias"].reshape(64, 1).contiguous()}))), "shape"),
    "matrix-transposed": ("dtype-shape", add(lambda c: c.variant("T", lambda t: t.update(
        {"vision.enc.weight": t["vision.enc.weight"].T.contiguous()}))), "shape"),
    "tensor-renamed": ("dtype-shape", add(lambda c: c.variant("renamed", lambda t: t.update(
        {"action.head.bias2": t.pop("action.head.bias")}))), "lacks"),
    "shard-missing-a-tensor": ("dtype-shape", add(sharded("sh-drop", tweak=lambda c, d, a, b, wm: (
        b.pop("vision.enc.weight"), wm.pop("vision.enc.weight")))), "lacks"),
    "extra-tensor-in-shard": ("dtype-shape", add(sharded("sh-extra", tweak=lambda c, d, a, b, wm: (
        b.update({"extra.weight": torch.zeros(3)}), wm.update({"extra.weight": "model-00002-of-00002.safetensors"})))),
        "lacks"),
    "no-tensors": ("dtype-shape", add(lambda c: save_model(c.path("empty.safetensors"), {})), "lacks"),
    "no-tensors-as-base": ("dtype-shape", init(lambda c: save_model(c.path("empty-base.safetensors"), {})),
                           "holds no tensors"),

    # --- NaN / Inf (test_cli.py: NaN in F32, +Inf in BF16)
    "nan-f16": ("nonfinite", add(lambda c: c.variant("nan16", lambda t: t["action.head.weight"].view(-1).__setitem__(
        5, float("nan")))), "NaN"),
    "neg-inf-f32-bias": ("nonfinite", add(lambda c: c.variant("ninf", lambda t: t["action.head.bias"].__setitem__(
        0, float("-inf")))), "Inf"),
    "nan-in-a-shard": ("nonfinite", add(sharded("sh-nan", tweak=lambda c, d, a, b, wm: b.update(
        {"vision.enc.weight": b["vision.enc.weight"].clone().fill_(float("nan"))}))), "NaN"),

    "nan-in-base": ("nonfinite", init(lambda c: save_model(c.path("nan-base.safetensors"), {
        "w": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)})), "NaN"),

    # --- alpha outside [0, 1]
    "alpha-minus-inf": ("alpha", add_ft(alpha="-inf"), "outside [0, 1]"),
    "alpha-just-above-1": ("alpha", add_ft(alpha="1.0000001"), "outside [0, 1]"),
    "alpha-overflows": ("alpha", add_ft(alpha="1e309"), "outside [0, 1]"),
    "alpha-5000-digits": ("alpha", add_ft(alpha="9" * 5000), "outside [0, 1]"),
    "alpha-empty": ("alpha", add_ft(alpha=""), "not a number"),
    "alpha-group-nan": ("alpha", add_ft(alpha="vision=nan,language=1,action=1"), "outside [0, 1]"),
    "alpha-group-without-value": ("alpha", add_ft(alpha="vision=,language=1,action=1"), "not a number"),
    "alpha-two-plain-values": ("alpha", add_ft(alpha="0.5,0.5"), "not a number"),
    "merge-weight-nan": ("alpha", lambda c: ["merge", "main", "side", "--weights", "nan,1"], "two finite numbers"),
    "alpha-bad-before-training": ("alpha", demos_add(lambda c: c.demos(), alpha="2"), "outside [0, 1]"),

    # --- unknown refs, and cycles a tampered bank could hold
    "ref-version-beyond-int64": ("refs", lambda c: ["log", "v" + "9" * 30], "unknown version"),
    "ref-version-int64-max-plus-1": ("refs", lambda c: ["checkout", f"v{2**63}"], "unknown version"),
    "ref-ancestor-huge": ("refs", lambda c: ["show", "main~" + "9" * 40], "past the base"),
    "ref-ancestor-5000-digits": ("refs", lambda c: ["log", "main~" + "9" * 5000], "past the base"),
    "ref-version-5000-digits": ("refs", lambda c: ["show", "v" + "9" * 5000], "unknown version"),
    "ref-empty": ("refs", lambda c: ["show", " "], "empty ref"),
    "ref-unknown-digest": ("refs", lambda c: ["show", "0123456789abcdef"], "unknown ref"),
    "head-not-json": ("refs", then(head_file("garbage"), ["log"]), "HEAD is unreadable"),
    "head-not-an-object": ("refs", then(head_file("[1, 2]"), ["add-skill", "x", "--finetuned", lambda c: c.ft]),
                           "neither a branch nor a version"),
    "head-branch-not-a-string": ("refs", then(head_file('{"branch": 5, "version": null}'), ["log"]),
                                 "neither a branch nor a version"),
    "head-version-negative": ("refs", then(head_file('{"branch": null, "version": -1}'), ["checkout", "HEAD"]),
                              "neither a branch nor a version"),
    "head-branch-gone": ("refs", then(head_file('{"branch": "gone", "version": null}'), ["log"]),
                         "does not exist"),
    "cycle-parent-is-itself": ("refs", then(lambda c: c.sql("UPDATE versions SET parent_id = 1 WHERE id = 1"),
                                            ["log", "v1"]), "cycle"),
    "cycle-two-versions-checkout": ("refs", then(lambda c: c.sql("UPDATE versions SET parent_id = 2 WHERE id = 1",
                                                                 "UPDATE versions SET parent_id = 1 WHERE id = 2"),
                                                 ["checkout", "v1", "--out", lambda c: c.path("out")]), "cycle"),
    "cycle-ancestor-ref": ("refs", then(lambda c: c.sql("UPDATE versions SET parent_id = 1 WHERE id = 1"),
                                        ["show", "v1~1000000000"]), "cycle"),
    "cycle-audit": ("refs", then(lambda c: c.sql("UPDATE versions SET parent_id = 2 WHERE id = 1",
                                                 "UPDATE versions SET parent_id = 1 WHERE id = 2"),
                                 ["audit", lambda c: c.ft]), "not older"),
    "cycle-rollback": ("refs", then(lambda c: c.sql("UPDATE versions SET parent_id = 1 WHERE id = 1"),
                                    ["rollback", "v0", "--branch", "main"]), "cycle"),

    # --- demos that are not a LeRobot v3 dataset
    "demos-v2-dataset": ("demos", demos_add(info_edit(lambda i: i.update(codebase_version="v2.1"))), "v2.1"),
    "demos-info-not-json": ("demos", demos_add(demos_with(lambda d: (d / "meta/info.json").write_text("{"))),
                            "not valid JSON"),
    "demos-no-data": ("demos", demos_add(demos_with(lambda d: shutil.rmtree(d / "data"))), "no parquet files"),
    "demos-a-file": ("demos", demos_add(lambda c: c.ft), "not a directory"),
    "demos-format-width": ("demos", demos_add(info_edit(lambda i: i.update(
        data_path="data/{chunk_index:0999999999d}/{file_index}.parquet"))), "not a chunk/file template"),
    "demos-format-attribute": ("demos", demos_add(info_edit(lambda i: i.update(
        data_path="data/{chunk_index.__class__}/{file_index}.parquet"))), "not a chunk/file template"),
    "demos-fifo-inside": ("demos", demos_add(demos_with(lambda d: fifo(d / "meta" / "pipe"))),
                          "not a regular file"),
    "demos-link-to-dev-zero": ("demos", demos_add(demos_with(lambda d: os.symlink("/dev/zero", d / "zero"))),
                               "not a regular file"),
    "demos-fifo-as-episodes": ("demos", demos_add(demos_with(lambda d: (
        os.remove(d / "meta/episodes/chunk-000/file-000.parquet"),
        fifo(d / "meta/episodes/chunk-000/file-000.parquet")))), "not a regular file"),

    # --- configuration that points outside the bank
    "config-db-url-names-missing-sqlite": ("config", then(bank_json(lambda i, c: i.update(
        db_url=f"sqlite:///{c.tmp / 'elsewhere.db'}")), ["log"]), "no SQLite database"),
    "config-db-flag-names-missing-sqlite": ("config", lambda c: ["--db", f"sqlite:///{c.tmp / 'typo.db'}", "log"],
                                            "no SQLite database"),
    "config-db-env-names-missing-sqlite": ("config", then(lambda c: c.monkeypatch.setenv(
        "SKILLBANK_DB_URL", f"sqlite:///{c.tmp / 'env.db'}"), ["branch"]), "no SQLite database"),
    "config-db-url-not-a-string": ("config", then(bank_json(lambda i, c: i.update(db_url=["x"])), ["log"]),
                                   "bank.json is damaged"),
    "config-bank-json-not-json": ("config", then(lambda c: (c.bank / "bank.json").write_text("{"), ["log"]),
                                  "bank.json is damaged"),
    "config-bank-json-without-id": ("config", then(bank_json(lambda i, c: i.pop("bank_id")), ["log"]),
                                    "bank.json is damaged"),
    "config-remotes-malformed": ("config", then(bank_json(lambda i, c: i.update(remotes=[1, 2])), ["remote", "list"]),
                                 '"remotes" must map'),
    "config-objects-fan-out-link": ("config", then(lambda c: (
        c.path("elsewhere").mkdir(), os.symlink(c.path("elsewhere"), c.bank / "objects" / "zz")), ["gc", "--grace", "0"]),
        "symbolic link"),
    "config-logs-head-link": ("config", then(lambda c: (
        c.path("target").write_text("keep"), (c.bank / "logs" / "HEAD").unlink(),
        os.symlink(c.path("target"), c.bank / "logs" / "HEAD")), ["checkout", "v0"]), "symbolic links"),
    "config-lerobot-config-not-json": ("config", init(lerobot_dir(lambda c, p: p.write_bytes(b"\xff\xfe binary"))),
                                       "not a usable config.json"),
    "config-lerobot-config-not-an-object": ("config", init(lerobot_dir(lambda c, p: p.write_text("[1]"))),
                                            "not a usable config.json"),
    "config-lerobot-config-huge": ("config", init(lerobot_dir(lambda c, p: (p.write_text("{}"),
                                                                            os.truncate(p, 17 * 2**20)))),
                                   "not a usable config.json"),
}


def test_case_count_by_category():
    """Every category the issue names has cases (the report counts them)."""
    counts: dict[str, int] = {}
    for category, _, _ in CASES.values():
        counts[category] = counts.get(category, 0) + 1
    assert set(counts) == {"pickle", "header", "escape", "dtype-shape", "nonfinite", "alpha", "refs", "demos",
                           "config"}
    assert counts["header"] >= 10 and min(counts.values()) >= 3


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_fails_with_one_line_and_changes_nothing(case, template, tmp_path, monkeypatch):
    _, build, message = CASES[case]
    shutil.copytree(template / "bank", tmp_path / "bank", symlinks=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SKILLBANK_DB_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = Ctx(tmp_path, tmp_path / "bank", template / "models", monkeypatch)
    args = [str(a) for a in build(ctx)]
    argv = args if args[0] == "--bank" else ["--bank", str(ctx.bank), *args]
    before = snapshot(ctx)

    code, stdout, stderr = run_main(*argv, timeout=CASE_SECONDS)

    lines = stderr.splitlines()
    assert code == 1, f"exit {code}\nstdout: {stdout}\nstderr: {stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].strip() != "error:", stderr
    assert "Traceback" not in stderr and stdout == ""
    assert message in lines[0], f"{message!r} not in {lines[0]!r}"
    after = snapshot(ctx)
    assert after["rows"] == before["rows"], "database rows changed"
    assert after["bank"] == before["bank"], "bank files changed"
    assert after["around"] == before["around"], "files outside the bank changed"
    assert not any((ctx.bank / "tmp").iterdir()), "temp files left in the bank"
    assert not (tmp_path / MARKER).exists(), "something unpickled a checkpoint"
    assert not (tmp_path / "escaped").exists()
