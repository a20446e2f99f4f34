"""The lossless `xor-zstd` codec and the task-vector container.

Bit patterns are generated directly (not as float values), so NaN payloads, signalling NaNs,
infinities, -0.0 and subnormals all go through the codec; "lossless" means the same bits back.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skillbank.codecs import BLOCK_ELEMS, DEFAULT_CODEC, TaskVectorReader, TaskVectorWriter, get_codec
from skillbank.codecs.container import MAGIC
from skillbank.errors import IntegrityError, ValidationError
from skillbank.merge.engine import blocks
from skillbank.store import ObjectStore
from skillbank.tensors import TensorSpec
from skillbank.tensors.dtypes import TORCH_TO_SAFETENSORS

# dtype -> (numpy type of its bit pattern, exponent bits, mantissa bits); None for non-floats
DTYPES = {
    torch.bfloat16: (np.uint16, 8, 7),
    torch.float16: (np.uint16, 5, 10),
    torch.float32: (np.uint32, 8, 23),
    torch.float64: (np.uint64, 11, 52),
    torch.int64: (np.uint64, None, None),
    torch.int32: (np.uint32, None, None),
    torch.uint8: (np.uint8, None, None),
    torch.bool: (np.uint8, None, None),
}
_SIGNED = {np.uint8: np.uint8, np.uint16: np.int16, np.uint32: np.int32, np.uint64: np.int64}


def special_patterns(dtype: torch.dtype) -> list[int]:
    """NaNs (quiet, signalling, negative, with payloads), +-Inf, +-0.0, subnormals, extremes."""
    _, e, m = DTYPES[dtype]
    if e is None:
        return []
    sign = 1 << (e + m)
    inf = ((1 << e) - 1) << m
    pats = [
        0, sign,  # +0.0, -0.0
        inf, sign | inf,  # +-Inf
        inf | (1 << (m - 1)), sign | inf | (1 << (m - 1)),  # quiet NaNs
        inf | 1, sign | inf | 1,  # signalling NaNs
        inf | ((1 << m) - 1), sign | inf | ((1 << m) - 1),  # all-ones payload (0xff.. is a NaN)
        inf | 0b101,  # a NaN with an odd payload
        1, sign | 1,  # smallest subnormals
        (1 << m) - 1,  # largest subnormal
        1 << m,  # smallest normal
        inf - 1, sign | (inf - 1),  # +-max finite
    ]
    return pats


def to_tensor(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor of `dtype` holding exactly these bit patterns."""
    if dtype == torch.bool:
        return torch.from_numpy(bits.astype(np.bool_))
    t = torch.from_numpy(bits.view(_SIGNED[bits.dtype.type]).copy())
    return t.view(dtype)


def bits_of(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bool:
        return t.view(torch.uint8).numpy()
    width = t.element_size()
    signed = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
    return t.contiguous().view(signed).numpy().view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width])


def make_pair(dtype: torch.dtype, n: int, seed: int, mode: str, special_rate: float):
    """(parent, finetuned) bit patterns of n elements; `mode` says how finetuned relates to parent."""
    rng = np.random.default_rng(seed)
    ut, e, _ = DTYPES[dtype]
    info = np.iinfo(ut)
    if dtype == torch.bool:
        parent = rng.integers(0, 2, n, dtype=np.uint8)
        flip = rng.random(n) < (0.5 if mode == "random" else 0.05 if mode == "near" else 0.0)
        return parent, parent ^ flip.astype(np.uint8)
    parent = rng.integers(0, info.max, n, dtype=ut, endpoint=True)
    if mode == "random":
        ft = rng.integers(0, info.max, n, dtype=ut, endpoint=True)
    elif mode == "near":  # a finetune: a few low bits change, most elements move a little
        low = rng.integers(0, 1 << 6, n, dtype=ut)
        ft = parent ^ (low * (rng.random(n) < 0.7).astype(ut))
    else:  # "same"
        ft = parent.copy()
    if e is not None and n and special_rate:
        specials = np.array(special_patterns(dtype), dtype=ut)
        for arr in (parent, ft):
            where = rng.random(n) < special_rate
            arr[where] = rng.choice(specials, int(where.sum()))
    return parent, ft


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(list(DTYPES)),
    n=st.one_of(st.integers(0, 16), st.integers(0, 5000)),
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(["random", "near", "same"]),
    special_rate=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
    level=st.sampled_from([1, 3, 9]),
)
def test_xor_zstd_is_bit_exact(dtype, n, seed, mode, special_rate, level):
    parent_bits, ft_bits = make_pair(dtype, n, seed, mode, special_rate)
    parent, ft = to_tensor(parent_bits, dtype), to_tensor(ft_bits, dtype)
    codec = get_codec("xor-zstd", level=level)
    data = codec.encode(parent, ft)
    assert isinstance(data, bytes)
    out = codec.decode(data, parent)
    assert out.dtype == dtype
    assert out.shape == (n,)
    np.testing.assert_array_equal(bits_of(out), ft_bits)
    # The parent is not modified along the way.
    np.testing.assert_array_equal(bits_of(parent), parent_bits)
    # A fresh codec decodes it too: nothing depends on state left in the encoder.
    np.testing.assert_array_equal(bits_of(get_codec("xor-zstd").decode(data, parent)), ft_bits)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]))
def test_xor_zstd_is_bit_exact_on_hypothesis_chosen_patterns(data, dtype):
    ut, _, _ = DTYPES[dtype]
    top = int(np.iinfo(ut).max)
    pattern = st.one_of(st.sampled_from(special_patterns(dtype)), st.integers(0, top))
    n = data.draw(st.integers(0, 64))
    p = np.array(data.draw(st.lists(pattern, min_size=n, max_size=n)), dtype=ut)
    f = np.array(data.draw(st.lists(pattern, min_size=n, max_size=n)), dtype=ut)
    codec = get_codec("xor-zstd")
    out = codec.decode(codec.encode(to_tensor(p, dtype), to_tensor(f, dtype)), to_tensor(p, dtype))
    np.testing.assert_array_equal(bits_of(out), f)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_every_pair_of_special_patterns_round_trips(dtype):
    ut = DTYPES[dtype][0]
    specials = np.array(special_patterns(dtype), dtype=ut)
    p = np.repeat(specials, len(specials))
    f = np.tile(specials, len(specials))
    parent, ft = to_tensor(p, dtype), to_tensor(f, dtype)
    assert torch.isnan(ft).any() and torch.isinf(ft).any()  # the patterns mean what they claim
    assert bool((torch.signbit(ft) & (ft == 0)).any())  # -0.0 is among them
    codec = get_codec("xor-zstd")
    np.testing.assert_array_equal(bits_of(codec.decode(codec.encode(parent, ft), parent)), f)


def test_codec_registry_and_params():
    codec = get_codec(DEFAULT_CODEC)
    assert codec.name == "xor-zstd" and codec.lossless
    assert codec.params() == {"level": 3}
    assert get_codec("xor-zstd", **get_codec("xor-zstd", level=7).params()).level == 7
    with pytest.raises(ValidationError, match="unknown codec"):
        get_codec("nope")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_incompressible_blocks_cost_little_more_than_raw(dtype):
    # Random bit patterns do not compress; the block must not grow past raw plus its plane table.
    parent_bits, ft_bits = make_pair(dtype, 5000, 11, "random", 0.0)
    parent, ft = to_tensor(parent_bits, dtype), to_tensor(ft_bits, dtype)
    width = parent.element_size()
    data = get_codec("xor-zstd").encode(parent, ft)
    assert len(data) <= 5000 * width + 1 + 5 * width
    np.testing.assert_array_equal(bits_of(get_codec("xor-zstd").decode(data, parent)), ft_bits)


def test_identical_blocks_compress_to_almost_nothing():
    parent = torch.randn(100_000).to(torch.bfloat16)
    data = get_codec("xor-zstd").encode(parent, parent.clone())
    assert len(data) < 200  # 200 kB of zero XOR


# --------------------------------------------------------------------------- damaged blocks


def test_damaged_block_bytes_raise_integrity_error():
    codec = get_codec("xor-zstd")
    parent = torch.randn(3000)
    ft = parent + 1e-3 * torch.randn(3000)
    data = codec.encode(parent, ft)
    # Every proper prefix of a block is refused (header, plane table or a plane body cut short).
    for k in sorted({0, 1, 2, 3, 5, 8, 12, 20, 21, 22, len(data) // 2, len(data) - 1}):
        with pytest.raises(IntegrityError):
            codec.decode(data[:k], parent)
    with pytest.raises(IntegrityError):
        codec.decode(b"definitely not a task-vector block", parent)
    with pytest.raises(IntegrityError):
        codec.decode(data, parent[:2999])  # a block for a different number of elements
    with pytest.raises(IntegrityError):
        codec.decode(data, parent[:1500])
    with pytest.raises(IntegrityError):
        codec.decode(data, parent.double())  # a block for a different element width
    with pytest.raises(IntegrityError):
        codec.decode(data, parent.to(torch.bfloat16))


def test_decode_keeps_the_parent_block_shape():
    # The engine may hand the codec a (rows, row_elems) view of a block.
    codec = get_codec("xor-zstd")
    parent = torch.randn(12, 34).to(torch.bfloat16)
    ft = (parent.float() + 0.01 * torch.randn(12, 34)).to(torch.bfloat16)
    out = codec.decode(codec.encode(parent, ft), parent)
    assert out.shape == (12, 34) and out.dtype == torch.bfloat16
    np.testing.assert_array_equal(bits_of(out.reshape(-1)), bits_of(ft.reshape(-1)))


# --------------------------------------------------------------------------- container


def _write_task_vector(store, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """Encode every tensor block by block on the engine's grid, in name order."""
    w = TaskVectorWriter(store, get_codec("xor-zstd"))
    for name in sorted(pairs):
        p, f = pairs[name]
        spec = TensorSpec(name, TORCH_TO_SAFETENSORS[p.dtype], tuple(p.shape))
        pf, ff = p.reshape(-1), f.reshape(-1)
        for _, first, count in blocks(spec):
            w.add_block(name, spec.dtype, spec.shape, pf[first:first + count], ff[first:first + count])
    return w.commit()


@pytest.fixture(scope="module")
def tv_pairs():
    g = torch.Generator().manual_seed(0)
    big_p = torch.randint(0, 256, (BLOCK_ELEMS + 3,), generator=g, dtype=torch.uint8)
    big_f = big_p.clone()
    big_f[::97] += 1  # a sparse change
    big_f[-3:] = torch.tensor([0, 255, 7], dtype=torch.uint8)  # and some in the second block
    w = torch.randn(40, 25, generator=g).to(torch.bfloat16)
    return {
        "big": (big_p, big_f),
        "layer.weight": (w, (w.float() + 1e-2 * torch.randn(40, 25, generator=g)).to(torch.bfloat16)),
        "layer.bias": (torch.randn(25, generator=g), torch.randn(25, generator=g)),
        "scale": (torch.tensor(1.5), torch.tensor(-0.0)),
        "steps": (torch.tensor([10], dtype=torch.int64), torch.tensor([250], dtype=torch.int64)),
        "mask": (torch.zeros(9, dtype=torch.bool), torch.ones(9, dtype=torch.bool)),
        "empty": (torch.zeros(0, 4, dtype=torch.float16), torch.zeros(0, 4, dtype=torch.float16)),
    }


def test_container_round_trips_tensors_and_blocks(tmp_path, tv_pairs):
    store = ObjectStore(tmp_path).create()
    digest = _write_task_vector(store, tv_pairs)
    assert store.verify(digest)
    raw = store.get_bytes(digest)
    assert raw.startswith(MAGIC) and raw.endswith(MAGIC)
    r = TaskVectorReader(store, digest)
    try:
        assert r.codec.name == "xor-zstd" and r.codec.params() == {"level": 3}
        assert r.block_elems == BLOCK_ELEMS
        assert set(r.tensors) == set(tv_pairs)
        assert len(r.tensors["big"]["blocks"]) == 2
        assert len(r.tensors["empty"]["blocks"]) == 1
        assert all(len(r.tensors[n]["blocks"]) == 1 for n in tv_pairs if n != "big")
        for name, (p, f) in tv_pairs.items():
            entry = r.tensors[name]
            assert entry["dtype"] == TORCH_TO_SAFETENSORS[p.dtype]
            assert entry["shape"] == list(p.shape)
            spec = TensorSpec(name, entry["dtype"], tuple(entry["shape"]))
            pf = p.reshape(-1)
            parts = [r.decode(name, i, pf[first:first + count]) for i, first, count in blocks(spec)]
            out = torch.cat(parts)
            assert out.dtype == f.dtype
            np.testing.assert_array_equal(bits_of(out), bits_of(f.reshape(-1)))
        # Blocks decode independently and in any order.
        second = r.decode("big", 1, tv_pairs["big"][0][BLOCK_ELEMS:])
        assert torch.equal(second, tv_pairs["big"][1][BLOCK_ELEMS:])
    finally:
        r.close()


def test_container_is_deterministic_and_content_addressed(tmp_path, tv_pairs):
    store = ObjectStore(tmp_path).create()
    small = {k: v for k, v in tv_pairs.items() if k != "big"}
    assert _write_task_vector(store, small) == _write_task_vector(store, small)
    changed = dict(small)
    changed["scale"] = (torch.tensor(1.5), torch.tensor(0.0))  # -0.0 vs 0.0: a different task vector
    assert _write_task_vector(store, changed) != _write_task_vector(store, small)


def test_container_abort_leaves_nothing(tmp_path):
    store = ObjectStore(tmp_path).create()
    w = TaskVectorWriter(store, get_codec("xor-zstd"))
    w.add_block("a", "F32", (4,), torch.zeros(4), torch.ones(4))
    assert w.stored_bytes > len(MAGIC)
    w.abort()
    assert list(store) == [] and list(store.tmp.iterdir()) == []


def test_corrupted_block_raises_integrity_error(tmp_path, tv_pairs):
    store = ObjectStore(tmp_path).create()
    digest = _write_task_vector(store, tv_pairs)
    r = TaskVectorReader(store, digest)
    offset, length = r.tensors["big"]["blocks"][1]
    r.close()
    path = store.path(digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(offset + length // 2)
        b = fh.read(1)[0]
        fh.seek(offset + length // 2)
        fh.write(bytes([b ^ 0x10]))
    with pytest.raises(IntegrityError, match="corrupt"):
        TaskVectorReader(ObjectStore(tmp_path), digest)


@pytest.mark.parametrize("content", [
    b"",
    b"tiny",
    b"x" * 15,
    b"x" * 100,  # no magic
    MAGIC + b"{}" + (2).to_bytes(8, "little") + MAGIC,  # a footer that lacks its fields
    MAGIC + b"[]" + (2).to_bytes(8, "little") + MAGIC,  # a footer that is not an object
    MAGIC + b"{}" + (20).to_bytes(8, "little") + MAGIC,  # footer length past the start
    MAGIC + b"{}" + (2**63).to_bytes(8, "little") + MAGIC,
    MAGIC + b'{"codec":"xor-zstd","params":[],"block_elems":1,"tensors":{}}' + (61).to_bytes(8, "little") + MAGIC,
    MAGIC + b'{"codec":"nope","params":{},"block_elems":1,"tensors":{}}' + (57).to_bytes(8, "little") + MAGIC,
], ids=["empty", "tiny", "15-bytes", "no-magic", "footer-lacks-fields", "footer-not-object",
        "footer-past-start", "footer-huge", "params-not-object", "unknown-codec"])
def test_objects_that_are_not_task_vectors_raise_integrity_error(tmp_path, content):
    store = ObjectStore(tmp_path).create()
    digest = store.put_bytes(content)  # intact objects, just not task vectors
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises((IntegrityError, ValidationError)) as ei:
        TaskVectorReader(store, digest)
    assert "\n" not in str(ei.value)
    assert len(os.listdir("/proc/self/fd")) == before  # the descriptor was closed


# --------------------------------------------------------------------------- compression


def test_compression_of_a_realistic_small_finetune():
    """A tiny MLP trained a few dozen SGD steps from the parent; bf16 copies, as policies ship."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 8))
    parent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(256, 32), torch.randn(256, 8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    finetuned = {k: v.detach().clone() for k, v in model.state_dict().items()}

    codec = get_codec("xor-zstd")
    raw = stored = 0
    changed = 0
    for name in parent:
        p = parent[name].to(torch.bfloat16).reshape(-1)
        f = finetuned[name].to(torch.bfloat16).reshape(-1)
        changed += int((p != f).sum())
        data = codec.encode(p, f)
        np.testing.assert_array_equal(bits_of(codec.decode(data, p)), bits_of(f))
        raw += p.numel() * p.element_size()
        stored += len(data)
    assert changed > 0.3 * raw / 2  # the finetune really moved most weights
    ratio = raw / stored
    assert ratio > 1.5, f"compression ratio {ratio:.2f}x"
