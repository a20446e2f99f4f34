"""Sharing a bank: DVC remotes (push / pull / lazy fetch), a second bank directory on the same
database, and Hugging Face Hub exports and pushes.

Remotes are local directories (DVC's LocalFileSystem); nothing here touches the network. The hub
push is tested up to the point where the network is needed: with HF_HUB_OFFLINE it must fail in one
line and leave nothing behind, and, with HfApi's methods replaced by recording fakes, the arguments
skillbank passes are checked.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import xxhash
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import load_model, make_finetuned, make_model, objects_snapshot, run_main
from skillbank import hub
from skillbank.cli import cli

CONFIG = {"type": "act", "n_obs_steps": 1, "chunk_size": 4}


class SB:
    """`skillbank --bank DIR [--db URL] ...` for one bank directory."""

    def __init__(self, bank: Path, db: str | None = None):
        self.bank = Path(bank)
        self.db = db

    def argv(self, args) -> list[str]:
        return ["--bank", str(self.bank), *(["--db", self.db] if self.db else []), *map(str, args)]

    def ok(self, *args) -> str:
        result = CliRunner().invoke(cli, self.argv(args))
        if result.exit_code != 0:
            tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
            raise AssertionError(f"skillbank {' '.join(map(str, args))} exited {result.exit_code}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}\n{tb}")
        return result.stdout

    def json(self, *args):
        return json.loads(self.ok(*args, "--json"))

    def fail(self, *args, code: int = 1) -> str:
        """Through the console entry point: exit `code`, one line on stderr, no traceback."""
        got, stdout, stderr = run_main(*self.argv(args))
        assert got == code, f"exit {got}, expected {code}\nstdout: {stdout}\nstderr: {stderr}"
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {stderr!r}"
        assert "Traceback" not in stderr and stdout == ""
        return lines[0]


def sqlite_url(bank_dir: Path) -> str:
    return f"sqlite:///{(bank_dir / 'bank.db').resolve()}"


@pytest.fixture
def bank_a(tmp_path, db_url):
    """Bank A: a LeRobot-style base (with config.json) and two skills on main (v0..v2)."""
    policy = tmp_path / "policy"
    make_model(policy / "model.safetensors", seed=0)
    (policy / "config.json").write_text(json.dumps(CONFIG))
    ft1 = make_finetuned(policy / "model.safetensors", tmp_path / "ft1.safetensors", seed=1)
    a = SB(tmp_path / "a", db_url)
    a.json("init", "--base", policy)
    a.db = None  # remembered in bank.json
    a.json("add-skill", "stack-cups", "--finetuned", ft1, "--alpha", "0.8")
    v1 = tmp_path / "v1"
    a.ok("checkout", "v1", "--out", v1)
    a.ok("checkout", "main")
    ft2 = make_finetuned(v1 / "model.safetensors", tmp_path / "ft2.safetensors", seed=2)
    a.json("add-skill", "wipe-board", "--finetuned", ft2, "--alpha", "vision=1,language=0.7,action=1")
    a.shared_db = db_url or sqlite_url(a.bank)
    return a


def remote_files(remote: Path) -> dict[str, Path]:
    root = remote / "objects"
    return {p.parent.name + p.name: p for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def tmp_leftovers(bank: Path) -> list[str]:
    t = bank / "tmp"
    return sorted(p.name for p in t.iterdir()) if t.is_dir() else []


# ----------------------------------------------------------------------------- remote config

def test_remote_add_list_and_errors(tmp_path, bank_a):
    a = bank_a
    r = a.json("remote", "add", "origin", tmp_path / "remote")
    assert r == {"name": "origin", "url": str((tmp_path / "remote").resolve()), "default": True}
    a.json("remote", "add", "backup", tmp_path / "backup", "--default")
    listed = a.json("remote", "list")
    assert [(x["name"], x["default"]) for x in listed] == [("origin", False), ("backup", True)]
    info = json.loads((a.bank / "bank.json").read_text())
    assert set(info["remotes"]) == {"origin", "backup"}
    assert "already exists" in a.fail("remote", "add", "origin", tmp_path / "elsewhere")
    assert "foo://" in a.fail("remote", "add", "weird", "foo://bucket/x")
    line = a.fail("remote", "add", "cloud", "s3://bucket/prefix")  # dvc-s3 is not installed here
    assert "cloud" in line and "dvc-s3" in line
    assert "no remote named" in a.fail("push", "--remote", "nope")
    a.json("remote", "remove", "backup")
    assert [x["name"] for x in a.json("remote", "list")] == ["origin"]


# ----------------------------------------------------------------------------- push / pull

def test_push_pull_and_second_bank_directory_bit_identical(tmp_path, bank_a):
    a, remote = bank_a, tmp_path / "remote"
    a.json("remote", "add", "origin", remote)
    pushed = a.json("push")
    assert pushed["versions"] == ["v0", "v1", "v2"] and pushed["uploaded"] == pushed["objects"] > 0
    files = remote_files(remote)
    assert len(files) == pushed["objects"]
    for digest, p in files.items():  # our xxh3 fan-out layout, each file named by its digest
        assert p.parent.parent.name == "objects" and len(p.parent.name) == 2
        assert xxhash.xxh3_128_hexdigest(p.read_bytes()) == digest
    assert a.json("push")["uploaded"] == 0  # already there

    # A second machine: a new bank directory on the same database, fed by the remote.
    b = SB(tmp_path / "b")
    cloned = b.json("clone", "--db", a.shared_db, "--remote", remote)
    assert cloned["versions"] == 3 and cloned["head"] == "branch 'main'"
    assert json.loads((b.bank / "bank.json").read_text())["bank_id"] == cloned["bank"]
    assert objects_snapshot(b.bank) == set()
    pulled = b.json("pull", "v2")
    assert pulled["fetched"] == pulled["objects"] == pushed["objects"]
    assert objects_snapshot(b.bank) == objects_snapshot(a.bank)
    assert b.json("pull", "v2")["fetched"] == 0

    a.ok("checkout", "v2", "--out", tmp_path / "out_a")
    b.ok("checkout", "v2", "--out", tmp_path / "out_b")
    got_a, got_b = tree_bytes(tmp_path / "out_a"), tree_bytes(tmp_path / "out_b")
    assert set(got_a) == {"model.safetensors", "config.json", "README.md"}
    assert got_a == got_b  # bit-identical, stamped metadata and card included
    assert b.json("fsck")["ok"]
    assert tmp_leftovers(b.bank) == []


def test_push_named_version_only_sends_its_chain(tmp_path, bank_a):
    a, remote = bank_a, tmp_path / "remote"
    a.json("remote", "add", "origin", remote)
    r1 = a.json("push", "v1")
    assert r1["versions"] == ["v1"]
    # base, config, one task vector, two manifests
    assert len(remote_files(remote)) == r1["objects"] == 5
    r2 = a.json("push", "v2")
    assert r2["uploaded"] == 2  # only v2's task vector and manifest are new


def test_corrupt_object_on_remote_is_refused(tmp_path, bank_a):
    a, remote = bank_a, tmp_path / "remote"
    a.json("remote", "add", "origin", remote)
    a.json("push")
    tv = a.json("show", "v2")["task_vector"]["object"]
    bad = remote / "objects" / tv[:2] / tv[2:]
    os.chmod(bad, 0o644)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))

    b = SB(tmp_path / "b")
    b.json("clone", "--db", a.shared_db, "--remote", remote)
    line = b.fail("pull", "v2")
    assert tv in line and "corrupt" in line and "origin" in line
    assert not (b.bank / "objects" / tv[:2] / tv[2:]).exists()
    assert tmp_leftovers(b.bank) == []
    # the lazy path refuses it too, and writes no output
    line = b.fail("checkout", "v2", "--out", tmp_path / "out_b")
    assert tv in line and "corrupt" in line
    assert not (tmp_path / "out_b" / "model.safetensors").exists()
    # v1 does not need that object: it still comes through whole
    b.ok("checkout", "v1", "--out", tmp_path / "out_b1")
    a.ok("checkout", "v1", "--out", tmp_path / "out_a1")
    assert tree_bytes(tmp_path / "out_a1") == tree_bytes(tmp_path / "out_b1")


def test_lazy_fetch_on_checkout(tmp_path, bank_a):
    a, remote = bank_a, tmp_path / "remote"
    a.json("remote", "add", "origin", remote)
    a.json("push")
    b = SB(tmp_path / "b")
    b.json("clone", "--db", a.shared_db, "--remote", remote)
    assert objects_snapshot(b.bank) == set()
    b.ok("checkout", "v2", "--out", tmp_path / "out_b")  # no pull: objects fetched as needed
    a.ok("checkout", "v2", "--out", tmp_path / "out_a")
    assert tree_bytes(tmp_path / "out_a") == tree_bytes(tmp_path / "out_b")
    assert objects_snapshot(b.bank) <= objects_snapshot(a.bank)
    assert len(objects_snapshot(b.bank)) == len(objects_snapshot(a.bank))
    assert tmp_leftovers(b.bank) == []


def test_missing_everywhere_is_one_line(tmp_path, bank_a):
    a = bank_a
    b = SB(tmp_path / "b")
    b.json("clone", "--db", a.shared_db, "--remote", tmp_path / "empty-remote")
    line = b.fail("checkout", "v1", "--out", tmp_path / "out")
    assert "missing" in line and "'origin'" in line
    assert "neither in this bank nor on remote" in b.fail("pull", "v1")


def test_clone_errors(tmp_path, bank_a):
    a = bank_a
    assert "already exists" in SB(a.bank).fail("clone", "--db", a.shared_db)
    assert "no SQLite database" in SB(tmp_path / "c").fail("clone", "--db", f"sqlite:///{tmp_path}/nope.db")
    assert not (tmp_path / "c").exists() and not (tmp_path / "nope.db").exists()
    # a clone without a remote works on whatever objects it has; here none: one clear line
    b = SB(tmp_path / "b")
    b.json("clone", "--db", a.shared_db)
    assert "missing" in b.fail("checkout", "v1", "--out", tmp_path / "out")
    assert b.json("log")[0]["version"] == "v2"


# ----------------------------------------------------------------------------- export

def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def test_export_hf_directory(tmp_path, bank_a):
    a = bank_a
    out = tmp_path / "hf"
    r = a.json("export", "v2", "--format", "hf", "--out", out)
    assert r["files"] == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == CONFIG
    a.ok("checkout", "v2", "--out", tmp_path / "co")
    want = load_model(tmp_path / "co")
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"  # transformers' from_pretrained requires it

    v1 = a.json("show", "v1")
    card = front_matter((out / "README.md").read_text())
    assert card["base_model"] == f"skillbank:v1@{v1['digest']}"  # the real parent
    sb = card["skillbank"]
    assert sb["version"] == "v2" and sb["digest"] == r["digest"]
    assert sb["parent"] == {"version": "v1", "digest": v1["digest"]}
    assert [s["name"] for s in sb["skills"]] == ["stack-cups", "wipe-board"]
    assert sb["alphas"]["stack-cups"] == {"*": 0.8}
    assert sb["alphas"]["wipe-board"] == {"vision": 1.0, "language": 0.7, "action": 1.0}
    assert "pipeline_tag" in card and "skillbank" in card["tags"]
    # audit recognises the export exactly
    assert a.json("audit", out)["version"] == "v2"
    assert "not an empty directory" in a.fail("export", "v2", "--out", out)


def test_export_sharded_and_lerobot(tmp_path, bank_a):
    a = bank_a
    out = tmp_path / "sharded"
    r = a.json("export", "v1", "--out", out, "--max-shard-size", "40kB")
    assert r["shards"] > 1 and "model.safetensors.index.json" in r["files"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(out / shard)))
    want = load_model(a.bank.parent / "v1")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    le = tmp_path / "lerobot"
    r = a.json("export", "v1", "--format", "lerobot", "--out", le)
    assert set(r["files"]) == {"README.md", "config.json", "model.safetensors"}  # no train_config stored
    card = front_matter((le / "README.md").read_text())
    assert card["library_name"] == "lerobot" and "lerobot" in card["tags"]
    assert card["skillbank"]["skills"][0]["name"] == "stack-cups"
    v0 = a.json("show", "v0")
    assert card["base_model"] == f"skillbank:v0@{v0['digest']}"


def test_export_lerobot_needs_a_config(tmp_path):
    base = make_model(tmp_path / "base.safetensors")
    a = SB(tmp_path / "bank")
    a.json("init", "--base", base)
    assert "--format hf" in a.fail("export", "v0", "--format", "lerobot", "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    r = a.json("export", "v0", "--out", tmp_path / "y")
    assert r["files"] == ["README.md", "model.safetensors"]
    assert "base_model" not in front_matter((tmp_path / "y" / "README.md").read_text())


def test_base_model_points_at_the_hub_repo_of_an_hf_base():
    lineage = [{"version": "v0", "digest": "a" * 32, "source": "hf://lerobot/pi0@0123abcd"},
               {"version": "v1", "digest": "b" * 32, "skill": "x"}]
    assert hub.base_model_of(lineage) == "lerobot/pi0"
    card = front_matter(hub.export_card("hf", "v1", "b" * 32, "bank", lineage,
                                        [{"version": "v1", "skill": "x", "alpha": "0.8", "alphas": {"*": 0.8},
                                          "demos_digest": "d" * 16, "finetuned_digest": "f" * 32}]))
    assert card["base_model"] == "lerobot/pi0"
    assert card["skillbank"]["demos_digests"] == ["d" * 16]


# ----------------------------------------------------------------------------- hub push

def test_hf_push_offline_fails_in_one_line_and_leaves_nothing(tmp_path, bank_a, monkeypatch):
    a = bank_a
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = objects_snapshot(a.bank)
    line = a.fail("push", "v2", "hf://my-lab/policy")
    assert "HF_HUB_OFFLINE" in line and "hf://my-lab/policy" in line
    assert objects_snapshot(a.bank) == before and tmp_leftovers(a.bank) == []
    assert "expected hf://ORG/NAME" in a.fail("push", "v2", "hf://no-slash")


def test_hf_push_arguments(tmp_path, bank_a, monkeypatch):
    """The real hub cannot be reached here, so HfApi's create_repo / create_branch / upload_folder /
    create_tag are replaced by recording fakes: this checks only the arguments skillbank passes
    (and the folder it uploads), not the hub's behaviour."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake(name):
        def record(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                kwargs["_files"] = sorted(p.name for p in folder.iterdir())
                kwargs["_card"] = front_matter((folder / "README.md").read_text())
                return SimpleNamespace(oid="c0ffee" * 6 + "beef", commit_url="https://hub/commit")
            return None
        return record

    for name in ("create_repo", "create_branch", "upload_folder", "create_tag"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, fake(name))
    a = bank_a
    r = a.json("push", "v2", "hf://my-lab/policy", "--revision", "experiments")
    names = [c[0] for c in calls]
    assert names == ["create_repo", "create_branch", "upload_folder", "create_tag"]
    kw = {c[0]: c[2] for c in calls}
    assert kw["create_repo"]["repo_id"] == "my-lab/policy" and kw["create_repo"]["exist_ok"] is True
    assert kw["create_branch"]["branch"] == "experiments"
    up = kw["upload_folder"]
    assert up["repo_id"] == "my-lab/policy" and up["revision"] == "experiments"
    assert "v2" in up["commit_message"] and "wipe-board" in up["commit_message"]
    assert up["_files"] == ["README.md", "config.json", "model.safetensors"]
    assert up["_card"]["skillbank"]["version"] == "v2"
    assert kw["create_tag"]["tag"] == "skillbank-v2" and kw["create_tag"]["revision"] == "c0ffee" * 6 + "beef"
    assert r["tag"] == "skillbank-v2" and r["revision"] == "experiments"
    assert tmp_leftovers(a.bank) == []  # the export folder was temporary

    calls.clear()
    a.json("push", "v1", "hf://my-lab/policy")  # main: no branch to create
    assert [c[0] for c in calls] == ["create_repo", "upload_folder", "create_tag"]
    assert calls[1][2]["revision"] is None and calls[2][2]["tag"] == "skillbank-v1"


def test_a_skill_added_on_the_second_machine_travels_back(tmp_path, bank_a):
    """Shared database: B adds v3; until B pushes, A's `push` skips it and `push v3` says why."""
    a, remote = bank_a, tmp_path / "remote"
    a.json("remote", "add", "origin", remote)
    a.json("push")
    b = SB(tmp_path / "b")
    b.json("clone", "--db", a.shared_db, "--remote", remote)
    b.ok("checkout", "main", "--out", tmp_path / "b_v2")
    ft3 = make_finetuned(tmp_path / "b_v2" / "model.safetensors", tmp_path / "ft3.safetensors", seed=3)
    assert b.json("add-skill", "open-drawer", "--finetuned", ft3, "--alpha", "0.9")["version"] == "v3"

    r = a.json("push")
    assert "v3" in r["versions"] and len(r["absent"]) == 1 and r["uploaded"] == 0
    assert "push it from the bank directory that added it" in a.fail("push", "v3")
    assert "missing" in a.fail("checkout", "v3", "--out", tmp_path / "a_v3")

    assert b.json("push", "v3")["uploaded"] == 2  # its task vector and manifest
    a.ok("checkout", "v3", "--out", tmp_path / "a_v3")  # lazily fetched
    b.ok("checkout", "v3", "--out", tmp_path / "b_v3")
    assert tree_bytes(tmp_path / "a_v3") == tree_bytes(tmp_path / "b_v3")


def test_a_rebuilt_version_travels_with_its_delta_chain(tmp_path, bank_a):
    """`rebuild --without` writes delta steps whose task vectors were encoded against another
    version: push/pull must follow that reference too (pulled alone, the rebuilt version checks out)."""
    a, remote = bank_a, tmp_path / "remote"
    r = a.json("rebuild", "v2", "--without", "stack-cups")
    new = r.get("version") or r["new_version"]
    a.json("remote", "add", "origin", remote)
    a.json("push", new)
    b = SB(tmp_path / "b")
    b.json("clone", "--db", a.shared_db, "--remote", remote)
    b.json("pull", new)
    b.json("remote", "remove", "origin")  # no lazy fetch: the pull must have brought everything
    b.ok("checkout", new, "--out", tmp_path / "out_b")
    a.ok("checkout", new, "--out", tmp_path / "out_a")
    assert tree_bytes(tmp_path / "out_a") == tree_bytes(tmp_path / "out_b")
