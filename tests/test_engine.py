"""The streaming engine: same bytes whatever the chunking, threading or device; keyframes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from skillbank.api import Bank
from skillbank.errors import SkillbankError
from skillbank.merge import Options, materialize, open_chain, plan
from skillbank.merge.engine import resolve_device
from skillbank.tensors import TensorSpec


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "vision.enc.weight": torch.randn(700, 3100, generator=g).to(torch.bfloat16),  # 3 blocks
        "language.proj.weight": torch.randn(64, 48, generator=g),
        "action.head.weight": torch.randn(8, 64, generator=g).half(),
        "action.head.bias": torch.randn(8, generator=g),
        "action.steps": torch.tensor([3], dtype=torch.int64),
        "action.scale": torch.tensor(0.5),
    }


def _finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.double() + 0.01 * v.double().abs().mean() * torch.randn(v.shape, generator=g,
                                                                               dtype=torch.float64)).to(v.dtype)
            if v.is_floating_point() else v + 1 for k, v in base.items()}


@pytest.fixture(scope="module")
def chain_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = _model(0)
    save_file(base, root / "base.safetensors")
    bank, _ = Bank.init(root / "bank", str(root / "base.safetensors"))
    for i, alpha in enumerate(["0.8", "vision=1,language=0.7,action=0.5", "0.3"]):
        save_file(_finetune(base, i + 1), root / f"ft{i}.safetensors")
        bank.add_skill(f"s{i}", str(root / f"ft{i}.safetensors"), alpha, keyframe="never")
    yield bank
    bank.close()


def test_plan_covers_every_block_once_in_name_order():
    specs = [TensorSpec("b", "BF16", (700, 3100)), TensorSpec("a", "F32", (5,)), TensorSpec("c", "I64", ())]
    chunks = plan(specs, chunk_mb=1)
    pieces = [p for c in chunks for p in c.pieces]
    assert [p.spec.name for p in pieces][0] == "a"
    for spec in specs:
        mine = [p for p in pieces if p.spec.name == spec.name]
        assert sum(p.count for p in mine) == spec.numel
        assert [p.first for p in mine] == sorted(p.first for p in mine)
    assert all(c.nbytes <= 2**20 or len(c.pieces) == 1 for c in chunks)


@settings(max_examples=8, deadline=None)
@given(chunk_mb=st.sampled_from([0.1, 1.0, 3.0, 64.0]), workers=st.integers(1, 4))
def test_rebuild_bytes_do_not_depend_on_chunking_or_threads(chain_bank, chunk_mb, workers):
    v = chain_bank.resolve("v3")
    chain = open_chain(chain_bank.store, v.manifest)
    try:
        assert materialize(chain, None, options=Options(chunk_mb=chunk_mb, workers=workers)) == v.digest
    finally:
        chain.close()


def test_keyframe_shortens_the_chain_and_keeps_the_bytes(chain_bank, tmp_path):
    full = chain_bank.checkout("v3", tmp_path / "full")
    chain_bank.pin("v2")
    chain = open_chain(chain_bank.store, chain_bank.resolve("v3").manifest, chain_bank.keyframes())
    try:
        assert len(chain.steps) == 1
    finally:
        chain.close()
    again = chain_bank.checkout("v3", tmp_path / "kf")
    assert again["digest"] == full["digest"]
    assert (tmp_path / "kf" / "model.safetensors").read_bytes() == (tmp_path / "full" / "model.safetensors").read_bytes()
    assert chain_bank.store.has(chain_bank.resolve("v2").digest)
    chain_bank.unpin("v2")
    chain_bank.gc(grace_seconds=0)
    assert not chain_bank.store.has(chain_bank.resolve("v2").digest)
    assert chain_bank.fsck()["ok"]


def test_auto_keyframe_is_written_during_add_skill(tmp_path):
    base = _model(5)
    save_file(base, tmp_path / "base.safetensors")
    save_file(_finetune(base, 6), tmp_path / "ft.safetensors")
    bank, _ = Bank.init(tmp_path / "bank", str(tmp_path / "base.safetensors"))
    r = bank.add_skill("s", str(tmp_path / "ft.safetensors"), 0.6, keyframe="always")
    assert r["keyframe"] and bank.store.has(r["digest"])
    stored = load_file(bank.store.path(r["digest"]))
    bank.checkout(r["version"], tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert stored.keys() == out.keys() and all(torch.equal(stored[k], out[k]) for k in out)
    bank.close()


def test_cuda_requested_without_cuda_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SkillbankError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(SkillbankError):
        resolve_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rebuild_is_byte_identical_to_cpu(chain_bank, tmp_path):
    cpu = chain_bank.checkout("v3", tmp_path / "cpu", options=Options(device="cpu"))
    gpu = chain_bank.checkout("v3", tmp_path / "gpu", options=Options(device="cuda"))
    assert cpu["digest"] == gpu["digest"]
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (tmp_path / "gpu" / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- checks while streaming

def _damaged_bank(tmp_path, where: str):
    """A fresh two-version bank whose base object has one byte flipped at `where`."""
    base = _model(0)
    save_file(base, tmp_path / "base.safetensors")
    save_file(_finetune(base, 1), tmp_path / "ft.safetensors")
    bank, _ = Bank.init(tmp_path / "bank", str(tmp_path / "base.safetensors"))
    bank.add_skill("s", str(tmp_path / "ft.safetensors"), 0.5, keyframe="never")
    digest = bank.store.get_json(bank.resolve("v0").manifest)["base"]
    path = bank.store.path(digest)
    data = bytearray(path.read_bytes())
    data[{"data": len(data) - 1000, "header": 12}[where]] ^= 0x20
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    bank.close()
    return Bank.open(tmp_path / "bank"), digest  # a new store: nothing is known to be verified


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_corrupt_object_fails_the_pass_that_streamed_it(tmp_path, where):
    bank, digest = _damaged_bank(tmp_path, where)
    try:
        if where == "data":
            # Opening does not hash the object (that runs beside the pass) ...
            chain = open_chain(bank.store, bank.resolve("v1").manifest)
            try:
                # ... and the pass refuses to return a result computed from corrupt bytes.
                with pytest.raises(SkillbankError, match=f"object {digest} is corrupt"):
                    materialize(chain, None)
            finally:
                chain.close()
        # A header that no longer parses is reported as the corruption it is, not as its symptom.
        with pytest.raises(SkillbankError, match=f"{digest}.*corrupt"):
            bank.checkout("v1", tmp_path / "out")
        assert not (tmp_path / "out" / "model.safetensors").exists()
    finally:
        bank.close()
