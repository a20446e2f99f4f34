"""The lossy task-vector codecs: int8, sparse-topk, dare, lowrank, bitdelta.

Blocks are what the merge engine hands a codec: a (rows, row_elems) matrix for tensors with
ndim >= 2, a flat run otherwise. Expected values are computed here from the definitions (in
float64 / numpy where it matters), not through the codecs' own helpers.
"""

from __future__ import annotations

import functools
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import read_safetensors_np, save_model
from skillbank.codecs import CODECS, get_codec
from skillbank.codecs.delta import EXACT, HEADER, LOSSY
from skillbank.errors import IntegrityError, ValidationError

LOSSY_NAMES = ["int8", "sparse-topk", "dare", "lowrank", "bitdelta"]
FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bits(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of t's dtype at |t|, as float64."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def make_pair(dtype, shape, seed: int, scale: float, rel: float, zero_frac: float = 0.0):
    """A parent block and a 'finetuned' one that moved by ~rel of the parent's scale."""
    rng = np.random.default_rng(seed)
    p = np.asarray(rng.standard_normal(shape) * scale)
    d = np.asarray(rng.standard_normal(shape) * scale * rel)
    if zero_frac:
        d[rng.random(shape) < zero_frac] = 0.0
    pt = torch.from_numpy(p).to(dtype)
    ft = (pt.double() + torch.from_numpy(d)).to(dtype)
    return pt, ft


def delta_of(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return f.to(wide(p.dtype)) - p.to(wide(p.dtype))


def rule(p: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """The decode contract: round_to_dtype(parent_wide + delta), zero deltas as -0.0."""
    w = wide(p.dtype)
    dd = dd.reshape(p.shape)
    dd = torch.where(dd == 0, torch.tensor(-0.0, dtype=w), dd)
    return (p.to(w) + dd).to(p.dtype)


blocks_st = st.tuples(
    st.sampled_from(FLOATS),
    st.one_of(st.tuples(st.integers(1, 300)), st.tuples(st.integers(1, 24), st.integers(1, 48)),
              st.just((0,)), st.just(()), st.just((3, 0)), st.just((2, 3, 5))),
    st.integers(0, 2 ** 32 - 1),
    st.sampled_from([1e-3, 0.05, 1.0, 300.0]),
    st.sampled_from([1e-3, 1e-2, 0.1]),
    st.sampled_from([0.0, 0.3, 1.0]),
)


# ----------------------------------------------------------------------------- registry, params

def test_registered_with_params_round_trip():
    for name in LOSSY_NAMES:
        codec = get_codec(name)
        assert name in CODECS and codec.name == name and codec.lossless is False
        assert codec.device_exact is (name != "lowrank")
        again = get_codec(name, **codec.params())
        assert again.params() == codec.params()
    assert get_codec("int8").params() == {"group_size": 128}
    assert get_codec("sparse-topk").params() == {"density": 0.1}
    assert get_codec("dare").params() == {"density": 0.1, "seed": 0}
    assert get_codec("lowrank").params() == {"rank": 16, "factor_dtype": "fp32"}


@pytest.mark.parametrize("name,params", [
    ("int8", {"group_size": 0}), ("int8", {"group_size": "x"}), ("sparse-topk", {"density": 0}),
    ("sparse-topk", {"density": 1.5}), ("dare", {"density": -1}), ("dare", {"seed": -1}),
    ("lowrank", {"rank": 0}), ("lowrank", {"factor_dtype": "fp8"}), ("int8", {"group_size": True}),
])
def test_bad_params_are_validation_errors(name, params):
    with pytest.raises(ValidationError):
        get_codec(name, **params)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", LOSSY_NAMES)
@SETTINGS
@given(block=blocks_st)
def test_round_trip_shape_dtype_determinism(name, block):
    dtype, shape, seed, scale, rel, zero_frac = block
    p, f = make_pair(dtype, shape, seed, scale, rel, zero_frac)
    codec = get_codec(name)
    data = codec.encode(p, f)
    assert isinstance(data, bytes)
    assert codec.encode(p.clone(), f.clone()) == data  # encode twice: same bytes
    out = codec.decode(data, p)
    assert out.dtype == p.dtype and out.shape == p.shape
    assert bits(get_codec(name, **codec.params()).decode(data, p.clone())) == bits(out)  # decode twice
    assert bool(torch.isfinite(out).all())
    dd = codec.decode_delta(data, p)
    if dd is None:  # stored exactly
        assert bits(out) == bits(f)
    else:
        assert bits(out) == bits(rule(p, dd))
    if zero_frac == 1.0:  # nothing moved: the parent comes back bit for bit
        assert bits(out) == bits(p)


@pytest.mark.parametrize("name", LOSSY_NAMES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool]
                         + ([torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else []))
def test_non_float_blocks_are_exact(name, dtype):
    gen = torch.Generator().manual_seed(3)
    if dtype == torch.bool:
        p = torch.rand(40, 7, generator=gen) > 0.5
        f = torch.rand(40, 7, generator=gen) > 0.5
    elif dtype.is_floating_point:
        p = torch.randn(40, 7, generator=gen).to(dtype)
        f = (p.float() + 0.1).to(dtype)
    else:
        p = torch.randint(0, 100, (40, 7), generator=gen).to(dtype)
        f = p + 1
    codec = get_codec(name)
    data = codec.encode(p, f)
    assert HEADER.unpack_from(data)[2] == EXACT
    out = codec.decode(data, p)
    assert out.dtype == dtype and bits(out) == bits(f)


@pytest.mark.parametrize("name", LOSSY_NAMES)
def test_non_finite_delta_falls_back_to_exact(name):
    p = torch.tensor([[3.0e38, -3.0e38, 1.0, 2.0]] * 4)
    f = torch.tensor([[-3.0e38, 3.0e38, 1.5, 2.5]] * 4)  # f - p overflows fp32
    codec = get_codec(name)
    data = codec.encode(p, f)
    assert HEADER.unpack_from(data)[2] == EXACT
    assert bits(codec.decode(data, p)) == bits(f)


def test_fp16_value_overflow_falls_back_to_exact():
    p = torch.tensor([-60000.0, 1.0, 2.0, 3.0] * 8, dtype=torch.float16)
    f = torch.tensor([60000.0, 1.0, 2.0, 3.0] * 8, dtype=torch.float16)  # the delta is not an fp16
    for name in ("sparse-topk", "dare"):
        codec = get_codec(name, density=1.0)
        data = codec.encode(p, f)
        assert HEADER.unpack_from(data)[2] == EXACT
        assert bits(codec.decode(data, p)) == bits(f)


# ----------------------------------------------------------------------------- error bounds

@SETTINGS
@given(block=blocks_st, group_size=st.sampled_from([1, 7, 128, 1000]))
def test_int8_error_is_at_most_half_a_step(block, group_size):
    dtype, shape, seed, scale, rel, zero_frac = block
    p, f = make_pair(dtype, shape, seed, scale, rel, zero_frac)
    codec = get_codec("int8", group_size=group_size)
    data = codec.encode(p, f)
    out, dd = codec.decode(data, p), codec.decode_delta(data, p)
    if p.numel() == 0:
        return
    assert HEADER.unpack_from(data)[2] == LOSSY
    d = delta_of(p, f).double().reshape(-1)
    n = d.numel()
    groups = math.ceil(n / group_size)
    padded = torch.zeros(groups * group_size, dtype=torch.float64)
    padded[:n] = d.abs()
    step = (padded.view(groups, group_size).amax(dim=1) / 127).float().double()
    step = step.repeat_interleave(group_size)[:n]
    err = (dd.double().reshape(-1) - d).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-300).all()), float((err / step).max())
    # On the weights: the same, plus one rounding to the stored dtype (and the wide delta's own).
    got, want = out.double().reshape(-1), f.double().reshape(-1)
    tol = step / 2 * (1 + 1e-5) + ulp(out).reshape(-1) + ulp(f).reshape(-1)
    assert bool(((got - want).abs() <= tol).all())


@SETTINGS
@given(block=blocks_st)
def test_bitdelta_keeps_signs_and_row_l1(block):
    dtype, shape, seed, scale, rel, zero_frac = block
    p, f = make_pair(dtype, shape, seed, scale, rel, zero_frac)
    codec = get_codec("bitdelta")
    data = codec.encode(p, f)
    out, dd = codec.decode(data, p), codec.decode_delta(data, p)
    if p.numel() == 0:
        return
    d = delta_of(p, f).double()
    rows = d.shape[0] if d.dim() >= 2 else 1
    d, dd = d.reshape(rows, -1), dd.double().reshape(rows, -1)
    assert bool((torch.sign(dd)[d != 0] == torch.sign(d)[d != 0]).all())
    assert bool((dd.abs() == dd.abs()[:, :1]).all())  # one magnitude per row
    l1, l1_dec = d.abs().sum(dim=1), dd.abs().sum(dim=1)
    assert torch.allclose(l1_dec, l1, rtol=1e-6, atol=0)
    # And on the weights, up to one rounding per element to the stored dtype.
    moved = (out.double() - p.double()).reshape(rows, -1).abs().sum(dim=1)
    slack = ulp(out).reshape(rows, -1).sum(dim=1)
    assert bool(((moved - l1).abs() <= 1e-6 * l1 + slack).all())


@SETTINGS
@given(dtype=st.sampled_from(FLOATS), rows=st.integers(20, 70), cols=st.integers(20, 70),
       k=st.integers(1, 16), rank=st.sampled_from([4, 16]), seed=st.integers(0, 2 ** 32 - 1),
       shift=st.integers(-12, 4))
def test_lowrank_is_exact_for_a_low_rank_delta(dtype, rows, cols, k, rank, seed, shift):
    # Small integers times a power of two: p + A @ B is exact in every float dtype, so f - p has
    # rank k exactly (no rounding noise of f to blur it).
    k = min(k, rank)
    gen = torch.Generator().manual_seed(seed)
    unit = 2.0 ** shift
    p = (torch.randint(-50, 51, (rows, cols), generator=gen).double() * unit).to(dtype)
    a = torch.randint(-3, 4, (rows, k), generator=gen).double()
    b = torch.randint(-3, 4, (k, cols), generator=gen).double()
    f = (p.double() + (a @ b) * unit * (1 if k <= 4 else 0.25)).to(dtype)
    d = f.double() - p.double()
    assert int(torch.linalg.matrix_rank(d)) <= k
    codec = get_codec("lowrank", rank=rank)
    data = codec.encode(p, f)
    out = codec.decode(data, p)
    if HEADER.unpack_from(data)[2] == EXACT:  # factors no smaller than the block: stored exactly
        assert rank * (rows + cols) * 4 >= rows * cols * p.element_size()
        assert bits(out) == bits(f)
        return
    # Exact up to the fp32 noise of the factors, which is absolute (~1e-7 of the largest delta), so a
    # weight that lands on or near zero may keep a speck of it.
    err = (out.double() - f.double()).abs()
    assert bool((err <= 1e-5 * float(d.abs().max()) + ulp(f)).all())
    far = f.double().abs() > 1e-3 * float(d.abs().max())
    if dtype in (torch.bfloat16, torch.float16):  # away from zero the noise is below half an ulp
        assert torch.equal(out[far], f[far])


def test_lowrank_is_the_optimal_truncation():
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(96, 64, generator=gen, dtype=torch.float64)
    f = p + 0.01 * torch.randn(96, 64, generator=gen, dtype=torch.float64)
    f64 = f.clone()
    for rank in (1, 8, 16):
        codec = get_codec("lowrank", rank=rank)
        dd = codec.decode_delta(codec.encode(p, f64), p)
        d = f64 - p
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        best = float(s[rank:].square().sum().sqrt())
        got = float((dd - d).norm())
        assert got == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lowrank_one_d_and_fp16_factors(dtype):
    p, f = make_pair(dtype, (300,), 1, 1.0, 0.01)
    codec = get_codec("lowrank")
    data = codec.encode(p, f)
    assert HEADER.unpack_from(data)[2] == EXACT and bits(codec.decode(data, p)) == bits(f)
    p, f = make_pair(dtype, (64, 200), 2, 1.0, 0.01)
    d32, d16 = get_codec("lowrank").encode(p, f), get_codec("lowrank", factor_dtype="fp16").encode(p, f)
    assert len(d16) < len(d32)
    o32 = get_codec("lowrank").decode(d32, p).double()
    o16 = get_codec("lowrank", factor_dtype="fp16").decode(d16, p).double()
    d = (f.double() - p.double()).norm()
    assert float((o16 - o32).norm()) < 0.01 * float(d)


@SETTINGS
@given(block=blocks_st, density=st.sampled_from([0.01, 0.1, 0.5, 1.0]))
def test_sparse_topk_keeps_exactly_the_top_k(block, density):
    dtype, shape, seed, scale, rel, _ = block
    p, f = make_pair(dtype, shape, seed, scale, rel)
    codec = get_codec("sparse-topk", density=density)
    data = codec.encode(p, f)
    out = codec.decode(data, p)
    n = p.numel()
    if n == 0:
        return
    d = delta_of(p, f).reshape(-1)
    k = min(n, max(1, round(density * n)))
    mag = d.abs().double().numpy()
    order = np.argsort(-mag, kind="stable")
    if k < n and mag[order[k - 1]] == mag[order[k]]:
        # A tie at the threshold: any k of the tied entries would do; check the magnitudes only.
        changed = (bits_array(out) != bits_array(p))
        assert changed.sum() <= k and (mag[changed].min(initial=np.inf) >= mag[order[k - 1]])
        return
    keep = np.zeros(n, dtype=bool)
    keep[order[:k]] = True
    w = wide(dtype)
    stored = d.to(dtype).to(w)  # kept deltas live in the tensor's own dtype
    expected = rule(p, torch.where(torch.from_numpy(keep), stored, torch.zeros_like(stored)))
    assert bits(out) == bits(expected)
    assert (bits_array(out)[~keep] == bits_array(p)[~keep]).all()  # the rest is the parent, bit for bit


def bits_array(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                            8: torch.int64}[t.element_size()]).numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.9])
def test_dare_density_and_rescale(dtype, density):
    p, f = make_pair(dtype, (400, 500), 7, 0.05, 0.1)
    codec = get_codec("dare", density=density, seed=11)
    data = codec.encode(p, f)
    out, dd = codec.decode(data, p), codec.decode_delta(data, p).reshape(-1)
    d = delta_of(p, f).reshape(-1)
    moved = d != 0  # where the finetune moved a weight, a kept entry decodes to a nonzero delta
    kept = (dd != 0) & moved
    n = int(moved.sum())
    frac = float(kept.sum()) / n
    assert abs(frac - density) < 6 * math.sqrt(density * (1 - density) / n)
    survivors = (d.double() / density).to(dtype).to(wide(dtype))  # rescaled, in the stored dtype
    assert torch.equal(dd[kept], survivors[kept])
    assert bool((dd[~kept] == 0).all())
    assert bits(out) == bits(rule(p, torch.where(kept, survivors, torch.zeros_like(d))))
    # DARE is unbiased: the sum of the decoded deltas tracks the true one.
    sd = float(d.double().norm()) * math.sqrt((1 - density) / density)
    assert abs(float(dd.double().sum()) - float(d.double().sum())) < 6 * sd + 1e-12


def test_dare_mask_is_a_function_of_seed_and_parent():
    p, f = make_pair(torch.float32, (64, 64), 1, 1.0, 0.01)
    a = get_codec("dare", seed=1)
    assert a.encode(p, f) == get_codec("dare", seed=1).encode(p.clone(), f.clone())
    assert a.encode(p, f) != get_codec("dare", seed=2).encode(p, f)
    p2 = p.clone()
    p2[0, 0] = p2[0, 0] + 1
    assert not torch.equal(a.mask(p), a.mask(p2))
    assert torch.equal(a.mask(p), a.mask(p.clone()))


# ----------------------------------------------------------------------------- malformed payloads

@pytest.mark.parametrize("name", LOSSY_NAMES)
def test_malformed_payloads_raise_integrity_error(name):
    p, f = make_pair(torch.bfloat16, (64, 96), 4, 1.0, 0.02)
    codec = get_codec(name)
    data = codec.encode(p, f)
    other = "int8" if name != "int8" else "bitdelta"
    tag, version, mode, n = HEADER.unpack_from(data)
    body = data[HEADER.size:]
    bad = [
        b"", b"x", data[:HEADER.size - 1], data[:HEADER.size], data[:-1], data[:len(data) // 2],
        data + b"\0", get_codec(other).encode(p, f),
        HEADER.pack(tag, version + 1, mode, n) + body,
        HEADER.pack(tag, version, 7, n) + body,
        HEADER.pack(tag, version, mode, n + 1) + body,
        HEADER.pack(tag, version, EXACT, n) + body,
        HEADER.pack(tag, version, mode, n) + b"\x28\xb5\x2f\xfd" + b"\xff" * 40,  # a zstd magic, then junk
        HEADER.pack(tag, version, mode, n) + bytes(64),
    ]
    for blob in bad:
        with pytest.raises(IntegrityError) as info:
            codec.decode(blob, p)
        assert "\n" not in str(info.value)
    with pytest.raises(IntegrityError):
        codec.decode(data, p.reshape(-1)[:-1])  # a parent of another size
    with pytest.raises(IntegrityError):
        codec.decode(data, p.to(torch.int16))  # a lossy block against an integer parent


def _sections_blob(name: str, sections: list[bytes], n: int) -> bytes:
    """A well-framed LOSSY payload with the given sections (to reach the section checks)."""
    import zstandard

    body = struct.pack("<B", len(sections)) + b"".join(struct.pack("<Q", len(s)) for s in sections) + b"".join(sections)
    return HEADER.pack(get_codec(name).tag, 1, LOSSY, n) + zstandard.ZstdCompressor().compress(body)


def test_well_framed_but_wrong_sections():
    p = torch.zeros(8, 20)
    n = p.numel()  # 160: two int8 groups
    cases = [
        ("int8", [b"", b""]),
        ("int8", [struct.pack("<f", 1.0), bytes(n)]),  # one scale short
        ("int8", [struct.pack("<ff", 1.0, float("nan")), bytes(n)]),
        ("int8", [struct.pack("<ff", 1.0, -1.0), bytes(n)]),
        ("int8", [struct.pack("<ff", 1.0, 1.0), b"\x80" * n]),
        ("int8", [struct.pack("<ff", 1.0, 1.0), bytes(n - 1)]),
        ("int8", [struct.pack("<f", 1.0)]),
        ("sparse-topk", [bytes(n // 8), b"\0\0"]),  # no bit set, one value
        ("sparse-topk", [b"\xff" * (n // 8), b""]),
        ("sparse-topk", [bytes(n // 8 - 1), b""]),
        ("dare", [b"\x80" + bytes(n // 8 - 1), struct.pack("<f", float("inf"))]),
        ("bitdelta", [struct.pack("<f", 1.0) * 7, bytes(n // 8)]),
        ("bitdelta", [struct.pack("<f", -1.0) * 8, bytes(n // 8)]),
        ("lowrank", [struct.pack("<BI", 0, 0), b"", b""]),
        ("lowrank", [struct.pack("<BI", 0, 9), bytes(4 * 8 * 9), bytes(4 * 9 * 20)]),
        ("lowrank", [struct.pack("<BI", 5, 1), bytes(4 * 8), bytes(4 * 20)]),
        ("lowrank", [struct.pack("<BI", 0, 1), bytes(4 * 8), bytes(4 * 19)]),
        ("lowrank", [struct.pack("<BI", 0, 1), bytes(4 * 8), struct.pack("<f", float("nan")) * 20]),
        ("lowrank", [b"\0", bytes(4 * 8), bytes(4 * 20)]),
    ]
    for name, sections in cases:
        with pytest.raises(IntegrityError):
            get_codec(name).decode(_sections_blob(name, sections, n), p)
    ok = _sections_blob("int8", [struct.pack("<ff", 0.5, 0.5), bytes([2]) * n], n)
    assert torch.equal(get_codec("int8").decode(ok, p), torch.ones(8, 20))
    ok = _sections_blob("lowrank", [struct.pack("<BI", 0, 1), struct.pack("<f", 2.0) * 8,
                                    struct.pack("<f", 0.5) * 20], n)
    assert torch.equal(get_codec("lowrank").decode(ok, p), torch.ones(8, 20))


@pytest.mark.parametrize("name", LOSSY_NAMES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_corrupted_payloads_never_crash(name, data):
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float32, torch.int64]))
    if dtype == torch.int64:
        p = torch.arange(200).reshape(10, 20)
        f = p + 1
    else:
        p, f = make_pair(dtype, (10, 20), 9, 1.0, 0.05)
    payload = bytearray(get_codec(name).encode(p, f))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if op == "flip" and payload:
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del payload[data.draw(st.integers(0, len(payload))):]
        else:
            payload += bytes(data.draw(st.binary(min_size=1, max_size=16)))
    try:
        out = get_codec(name).decode(bytes(payload), p)
    except IntegrityError as e:
        assert "\n" not in str(e)
    else:
        assert out.shape == p.shape and out.dtype == p.dtype


# ----------------------------------------------------------------------------- a realistic delta

@functools.lru_cache(maxsize=None)
def trained_mlp(steps: int = 40, seed: int = 0):
    """(parent, finetuned) float32 state dicts of a ~54k-parameter MLP, finetuned by SGD from init."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                              torch.nn.ReLU(), torch.nn.Linear(128, 32))
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 32))
    parent = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(64, 64)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    finetuned = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return parent, finetuned


def blocks_of(t: torch.Tensor, block_elems: int = 1 << 20):
    """The engine's blocks: whole rows of about block_elems, as (rows, row_elems) or flat."""
    if t.dim() < 2:
        yield t.reshape(-1)
        return
    m = t.reshape(t.shape[0], -1)
    step = max(1, block_elems // m.shape[1])
    for i in range(0, m.shape[0], step):
        yield m[i:i + step]


def measure(name: str, dtype: torch.dtype, **params) -> tuple[float, float]:
    """(stored bytes / raw bf16 delta bytes, ||decoded - f|| / ||f - p||) over the MLP."""
    parent, finetuned = trained_mlp()
    codec = get_codec(name, **params)
    stored = raw = 0
    err_sq = delta_sq = 0.0
    for k in parent:
        p, f = parent[k].to(dtype), finetuned[k].to(dtype)
        for pb, fb in zip(blocks_of(p), blocks_of(f)):
            data = codec.encode(pb, fb)
            out = codec.decode(data, pb)
            stored += len(data)
            raw += pb.numel() * 2
            err_sq += float((out.double() - fb.double()).square().sum())
            delta_sq += float((fb.double() - pb.double()).square().sum())
    return stored / raw, math.sqrt(err_sq / delta_sq)


def test_realistic_delta_is_a_finetune():
    parent, finetuned = trained_mlp()
    n = sum(v.numel() for v in parent.values())
    assert 40_000 < n < 60_000
    d = math.sqrt(sum(float((finetuned[k] - parent[k]).square().sum()) for k in parent))
    norm = math.sqrt(sum(float(parent[k].square().sum()) for k in parent))
    assert 0.005 < d / norm < 0.3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,max_ratio,max_err", [
    ("int8", 0.6, 0.02), ("sparse-topk", 0.3, 0.8), ("dare", 0.3, 4.0), ("lowrank", 0.6, 0.3),
    ("bitdelta", 0.1, 0.7),
])
def test_realistic_delta_is_smaller_than_raw(name, dtype, max_ratio, max_err):
    """Sizes against the raw bf16 delta (2 bytes per element) of a short SGD finetune."""
    ratio, err = measure(name, dtype)
    assert ratio < max_ratio, (name, dtype, ratio)
    assert err < max_err, (name, dtype, err)
    if name == "dare":  # unbiased but noisy by design: the error is about sqrt((1 - p) / p) = 3
        assert err > 2.0
    if dtype == torch.float32:  # against lossless fp32 the lossy codecs win; on bf16 int8 does not
        lossless, _ = measure("xor-zstd", dtype)
        assert ratio < lossless


# ----------------------------------------------------------------------------- end to end

MLP_NAMES = {"0.weight": "vision.enc.weight", "0.bias": "vision.enc.bias", "2.weight": "language.proj.weight",
             "2.bias": "language.proj.bias", "4.weight": "action.head.weight", "4.bias": "action.head.bias"}
EPS = {"vision": 2.0 ** -8, "language": 2.0 ** -24, "action": 2.0 ** -11}  # bf16, fp32, fp16


def policy_tensors(state: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    """The MLP as a small policy: bf16 vision, fp32 language, fp16 action, an int64 buffer."""
    return {
        "vision.enc.weight": state["0.weight"].to(torch.bfloat16),
        "vision.enc.bias": state["0.bias"].to(torch.bfloat16),
        "language.proj.weight": state["2.weight"].float(),
        "language.proj.bias": state["2.bias"].float(),
        "action.head.weight": state["4.weight"].to(torch.float16),
        "action.head.bias": state["4.bias"].to(torch.float16),
        "action.steps": torch.tensor([steps, 0, 1, 2], dtype=torch.int64),
    }


def as_f64(path) -> dict[str, np.ndarray]:
    tensors, _ = read_safetensors_np(path)
    return {k: a.astype(np.float64) if dt != "I64" else a for k, (dt, a) in tensors.items()}


@pytest.mark.parametrize("codec", LOSSY_NAMES)
def test_bank_add_skill_lossy_and_checkout_rebuilds(tmp_path, codec):
    from skillbank.api import Bank

    parent, finetuned = trained_mlp()
    base = save_model(tmp_path / "base.safetensors", policy_tensors(parent, 0))
    ft1 = save_model(tmp_path / "ft1.safetensors", policy_tensors(finetuned, 40))
    bank, info = Bank.init(tmp_path / "bank", str(base))
    try:
        r1 = bank.add_skill("reach", str(ft1), 0.8, codec=codec)
        assert r1["version"] == "v1" and r1["codec"] == codec
        assert r1["stored_bytes"] < r1["raw_bytes"]
        out1 = bank.checkout("main", tmp_path / "v1")  # a branch: HEAD stays attached
        assert out1["verified"] and out1["digest"] == r1["digest"]
        got = as_f64(tmp_path / "v1")
        p, f = as_f64(base), as_f64(ft1)
        np.testing.assert_array_equal(got["action.steps"], f["action.steps"])  # buffers exact
        if codec == "int8":  # close to the exact RETAIN merge: int8 error is small
            for k in p:
                if k != "action.steps":
                    want = p[k] + 0.8 * (f[k] - p[k])
                    moved = np.linalg.norm(0.8 * (f[k] - p[k]))
                    rounding = np.linalg.norm(want) * EPS[k.split(".")[0]]
                    assert np.linalg.norm(got[k] - want) <= 0.05 * moved + rounding, k
        # A second skill on top of the lossy version (its parent is what decode gave back).
        p2, f2 = trained_mlp(steps=25, seed=1)
        v1 = {k: torch.from_numpy(a) for k, (_, a) in read_safetensors_np(tmp_path / "v1")[0].items()}
        ft2_state = {k: v1[name].float() + 0.5 * (f2[k] - p2[k]) for k, name in MLP_NAMES.items()}
        ft2 = save_model(tmp_path / "ft2.safetensors", policy_tensors(ft2_state, 65))
        r2 = bank.add_skill("grasp", str(ft2), "vision=1,language=0.5,action=0.9", codec=codec)
        again = bank.checkout("v1", tmp_path / "v1-again")
        assert again["digest"] == r1["digest"]
        assert (tmp_path / "v1" / "model.safetensors").read_bytes() == \
            (tmp_path / "v1-again" / "model.safetensors").read_bytes()
        out2 = bank.checkout("v2", tmp_path / "v2")
        assert out2["verified"] and out2["digest"] == r2["digest"]
    finally:
        bank.close()
