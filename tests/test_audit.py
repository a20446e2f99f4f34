"""audit: exact by digest whatever the layout; estimated alphas for checkpoints merged elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from skillbank.api import Bank
from skillbank.cli import cli


def _model(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "vision.enc.weight": torch.randn(256, 512, generator=g).to(dtype),
        "language.proj.weight": torch.randn(128, 96, generator=g).to(dtype),
        "action.head.weight": torch.randn(8, 128, generator=g).to(dtype),
        "action.steps": torch.tensor([1], dtype=torch.int64),
    }


def _finetune(parent: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.double() + scale * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
            if v.is_floating_point() else v for k, v in parent.items()}


def _remerge(parent, ft, alpha):
    return {k: ((1 - alpha) * parent[k].double() + alpha * ft[k].double()).to(parent[k].dtype)
            if parent[k].is_floating_point() else ft[k] for k in parent}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def chain(request, tmp_path):
    dtype = request.param
    base = _model(0, dtype)
    save_file(base, tmp_path / "base.safetensors")
    bank, _ = Bank.init(tmp_path / "bank", str(tmp_path / "base.safetensors"))
    fts = []
    for i, alpha in enumerate([0.8, 0.6]):
        bank.checkout("main", tmp_path / "parent")
        parent = load_file(tmp_path / "parent" / "model.safetensors")
        ft = _finetune(parent, i + 1)
        fts.append((parent, ft))
        save_file(ft, tmp_path / f"ft{i}.safetensors")
        bank.add_skill(f"skill{i}", str(tmp_path / f"ft{i}.safetensors"), alpha)
    yield bank, tmp_path, fts, dtype
    bank.close()


def test_exact_match_for_any_layout_and_metadata(chain):
    bank, tmp, _, _ = chain
    bank.checkout("v2", tmp / "single")
    bank.checkout("v2", tmp / "sharded", max_shard_size=100_000)
    for path in (tmp / "single" / "model.safetensors", tmp / "sharded"):
        r = bank.audit(str(path))
        assert r["match"] == "exact" and r["version"] == "v2"
        assert [s["name"] for s in r["skills"]] == ["skill0", "skill1"]
        assert [e["version"] for e in r["lineage"]] == ["v0", "v1", "v2"]
        assert r["hint"]["version"] == "v2"


def test_metadata_is_only_a_hint(chain):
    bank, tmp, _, _ = chain
    bank.checkout("v1", tmp / "v1")
    sd = load_file(tmp / "v1" / "model.safetensors")
    save_file(sd, tmp / "liar.safetensors", metadata={"skillbank.version": "v2"})
    r = bank.audit(str(tmp / "liar.safetensors"))
    assert r["match"] == "exact" and r["version"] == "v1"


def test_fuzzy_recovers_the_alpha_of_a_remerge_outside_skillbank(chain):
    bank, tmp, fts, dtype = chain
    parent, ft = fts[1]  # the second skill, re-merged onto v1 with another alpha
    save_file(_remerge(parent, ft, 0.35), tmp / "remerged.safetensors")
    r = bank.audit(str(tmp / "remerged.safetensors"))
    assert r["match"] == "fuzzy"
    est = {s["name"]: s["alpha"] for s in r["skills"]}
    assert abs(est["skill1"] - 0.35) <= 0.05
    assert abs(est["skill0"] - 0.8) <= 0.05
    if dtype == torch.float32:
        assert r["residual"] < 0.01


def test_fuzzy_survives_a_dtype_cast_and_a_known_prefix(chain):
    bank, tmp, _, _ = chain
    bank.checkout("v1", tmp / "v1")
    sd = {"model." + k: (v.float() if v.is_floating_point() else v)
          for k, v in load_file(tmp / "v1" / "model.safetensors").items()}
    save_file(sd, tmp / "renamed.safetensors")
    r = bank.audit(str(tmp / "renamed.safetensors"))
    assert r["match"] in ("exact", "fuzzy")
    est = {s["name"]: s["alpha"] for s in r["skills"]}
    assert abs(est["skill0"] - 0.8) <= 0.05 and est.get("skill1", 0.0) < 0.05


def test_unrelated_checkpoint_matches_none(chain):
    bank, tmp, _, dtype = chain
    save_file(_model(99, dtype), tmp / "other.safetensors")
    r = bank.audit(str(tmp / "other.safetensors"))
    assert r["match"] == "none" and r["nearest"]["version"].startswith("v")
    save_file({"x": torch.zeros(3)}, tmp / "alien.safetensors")
    assert bank.audit(str(tmp / "alien.safetensors"))["match"] == "none"


def test_cli_gates_exit_3_and_json_shape(chain):
    bank, tmp, _, _ = chain
    bank.checkout("v1", tmp / "deploy")
    runner = CliRunner()
    args = ["--bank", str(tmp / "bank"), "audit", str(tmp / "deploy"), "--json"]
    ok = runner.invoke(cli, args + ["--require-skill", "skill0", "--forbid-skill", "skill1"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["match"] == "exact" and data["version"] == "v1"
    assert data["skills"][0].keys() >= {"name", "version", "alpha"}
    bad = runner.invoke(cli, args + ["--require-skill", "skill1"])
    assert bad.exit_code == 3
    assert "required skill 'skill1'" in bad.stderr
