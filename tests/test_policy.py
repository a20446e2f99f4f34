"""The reference policy: parameter names that map onto RETAIN's groups, exact checkpoints, and
instruction embeddings from the shipped MiniLM model that are cached and reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xxhash
from safetensors.torch import save_file

from skillbank.errors import CheckpointError
from skillbank.groups import GROUPS, SKILLBANK_REF, detect_preset
from skillbank.policies import reference as ref
from skillbank.policies import RefPolicy, RefPolicyConfig

from fake_encoder import FAKE, fake_encoder as _fake_encoder  # noqa: E402  (registers it)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SKILLBANK_CACHE_DIR", str(d))
    return d


def make_policy(seed=0, **kw) -> RefPolicy:
    rng = np.random.default_rng(seed)
    cfg = RefPolicyConfig(text_encoder=FAKE, **kw).with_stats(
        rng.standard_normal((200, 39)), rng.uniform(-1, 1, (200, 4)))
    torch.manual_seed(seed)
    return RefPolicy(cfg)


def test_names_map_onto_the_three_groups():
    policy = make_policy()
    names = list(policy.state_dict())
    assert all(n.split(".", 1)[0] in GROUPS for n in names)
    assert {n.split(".", 1)[0] for n in names} == set(GROUPS)
    preset = detect_preset(names)
    assert preset.name == "skillbank-ref"
    assert all(preset.group_of(n) == n.split(".", 1)[0] for n in names)
    # The frozen text encoder is not part of the weights (it has no task vector to store).
    assert not any("bert" in n or "embeddings" in n for n in names)
    assert SKILLBANK_REF.coverage(names) == len(names)


def test_save_load_round_trip_is_exact(tmp_path):
    policy = make_policy(hidden=64)
    weights = policy.save_pretrained(tmp_path / "ckpt")
    assert weights == tmp_path / "ckpt" / "model.safetensors"
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["type"] == "skillbank_ref" and cfg["hidden"] == 64

    back = RefPolicy.from_pretrained(tmp_path / "ckpt")
    a, b = policy.state_dict(), back.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert back.config == policy.config
    obs = np.random.default_rng(1).standard_normal((5, 39)).astype(np.float32)
    np.testing.assert_array_equal(policy.act(obs, "reach the goal"), back.act(obs, "reach the goal"))

    # Saved again unchanged: byte-identical file, so a no-op finetune has a zero task vector.
    back.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == weights.read_bytes()


def test_stored_dtype_is_kept(tmp_path):
    policy = make_policy(hidden=32)
    policy.save_pretrained(tmp_path / "f32")
    sd = {k: v.to(torch.bfloat16) for k, v in policy.state_dict().items()}
    (tmp_path / "bf16").mkdir()
    save_file(sd, str(tmp_path / "bf16" / "model.safetensors"))
    (tmp_path / "bf16" / "config.json").write_text(policy.config.to_json())
    back = RefPolicy.from_pretrained(tmp_path / "bf16")
    assert next(back.parameters()).dtype == torch.float32  # computes in float32
    back.save_pretrained(tmp_path / "out")
    from safetensors.torch import load_file
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], sd[k]) for k in sd)


def test_config_round_trip():
    cfg = make_policy(hidden=48, action_layers=2).config
    text = cfg.to_json()
    assert json.loads(text)["type"] == "skillbank_ref"
    assert RefPolicyConfig.from_json(text) == cfg
    assert RefPolicyConfig.from_json(json.loads(text)) == cfg
    # Unknown keys (a newer skillbank) are ignored; another family's config is refused.
    assert RefPolicyConfig.from_json({**json.loads(text), "future_field": 1}) == cfg
    with pytest.raises(CheckpointError, match="skillbank_ref"):
        RefPolicyConfig.from_json({"type": "pi0"})
    with pytest.raises(CheckpointError, match="obs_mean"):
        RefPolicyConfig.from_json({**json.loads(text), "obs_mean": [0.0] * 3})


def test_refuses_pickle_and_mismatched_weights(tmp_path):
    policy = make_policy(hidden=32)
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(policy.config.to_json())
    torch.save(policy.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        RefPolicy.from_pretrained(d)
    with pytest.raises(CheckpointError, match="no config.json"):
        RefPolicy.from_pretrained(tmp_path)
    policy.save_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "hidden": 16}))
    with pytest.raises(CheckpointError, match="shape"):
        RefPolicy.from_pretrained(tmp_path / "ok")


def test_act_returns_actions_in_range():
    policy = make_policy(hidden=32)
    obs = np.random.default_rng(0).standard_normal((7, 39)) * 10
    a = policy.act(obs, "push the puck")
    assert a.shape == (7, 4) and a.dtype == np.float32
    lo, hi = np.array(policy.config.action_min), np.array(policy.config.action_max)
    assert np.all(a >= lo - 1e-5) and np.all(a <= hi + 1e-5)
    assert policy.act(obs[0], "push the puck").shape == (4,)


def test_minilm_embeddings_are_cached_and_deterministic(cache_dir, monkeypatch):
    """The real shipped encoder: loads offline, 384-d unit vectors, cached on disk by xxh3."""
    monkeypatch.setattr(ref, "_MEMORY", {})
    texts = ["pick up the red cup", "open the drawer", "pick up the red cup"]
    emb = ref.embed_instructions(texts)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    assert torch.equal(emb[0], emb[2])
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, atol=1e-5)
    files = sorted((cache_dir / "embeddings" / "all-MiniLM-L6-v2").glob("*.npy"))
    assert len(files) == 2
    assert ref.embedding_path("open the drawer").name == xxhash.xxh3_128_hexdigest(b"open the drawer") + ".npy"

    # Meaning, not just bytes: a paraphrase is closer than another task.
    para, other = ref.embed_instructions(["grasp the red mug", "close the window"])
    assert emb[0] @ para > emb[0] @ other

    # Served from disk, without the encoder, and bit-identical.
    monkeypatch.setattr(ref, "_MEMORY", {})
    with monkeypatch.context() as m:
        m.setitem(ref._ENCODERS, "all-MiniLM-L6-v2", (384, lambda t: pytest.fail("encoder called")))
        assert torch.equal(ref.embed_instructions(texts), emb)

    # Recomputed from scratch (no caches at all): the same bits again.
    for f in files:
        f.unlink()
    monkeypatch.setattr(ref, "_MEMORY", {})
    assert torch.equal(ref.embed_instructions(texts), emb)


def test_damaged_cache_entry_is_recomputed(cache_dir, monkeypatch):
    monkeypatch.setattr(ref, "_MEMORY", {})
    path = ref.embedding_path("lift the block", FAKE)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npy file")
    emb = ref.embed_instructions(["lift the block"], FAKE)
    np.testing.assert_array_equal(emb[0].numpy(), _fake_encoder(["lift the block"])[0])
    assert np.array_equal(np.load(path), emb[0].numpy())
