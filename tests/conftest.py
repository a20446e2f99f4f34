"""Shared fixtures: a throwaway PostgreSQL server, a `db_url` that runs a test on SQLite and on
PostgreSQL, and small but real safetensors models.

Models are written with safetensors/torch directly, and read back for checks with a tiny reader
here that parses the safetensors format with numpy alone, so that the expected weights a test
computes never go through skillbank's own reader, merge or writer.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

try:
    from pgserver import PgServer, PgServerError, pg_available
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.pgserver import PgServer, PgServerError, pg_available


# ----------------------------------------------------------------------------- databases

@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the whole session (about a second to start)."""
    ok, reason = pg_available()
    if not ok:
        pytest.skip(f"PostgreSQL not available: {reason}")
    with PgServer() as server:
        yield server


_db_counter = itertools.count()


def _fresh_pg_database(request, server: PgServer):
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40].strip("_")
    name = f"t{next(_db_counter)}_{stem}"
    url = server.create_database(name)
    return name, url


def _drop_pg_database(server: PgServer, name: str) -> None:
    # FORCE closes the connections that engines of the test may still hold open.
    try:
        server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except PgServerError:
        pass


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
                ids=["sqlite", "postgresql"])
def db_url(request):
    """None (the bank's own SQLite file) or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    server = request.getfixturevalue("pg_server")
    name, url = _fresh_pg_database(request, server)
    yield url
    _drop_pg_database(server, name)


@pytest.fixture
def pg_url(request, pg_server):
    """A fresh PostgreSQL database only (for tests that are about PostgreSQL itself)."""
    name, url = _fresh_pg_database(request, pg_server)
    yield url
    _drop_pg_database(pg_server, name)


# ----------------------------------------------------------------------------- models

# name -> (safetensors dtype, shape). About 82k parameters: every test stays fast.
SMALL_SPECS: dict[str, tuple[str, tuple[int, ...]]] = {
    "vision.enc.weight": ("BF16", (128, 256)),
    "language.proj.weight": ("F32", (128, 256)),
    "action.head.weight": ("F16", (64, 256)),
    "action.head.bias": ("F32", (64,)),
    "action.steps": ("I64", (4,)),
}

TORCH_DTYPE = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
               "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}


def group_of(name: str) -> str:
    """The parameter group of a test tensor, from its name prefix (vision. / language. / action.)."""
    return name.split(".", 1)[0]


def make_tensors(seed: int = 0, specs: dict | None = None) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, shape) in (specs or SMALL_SPECS).items():
        dt = TORCH_DTYPE[dtype]
        if dt.is_floating_point:
            values = rng.standard_normal(shape).astype(np.float32) * 0.05
            out[name] = torch.from_numpy(values).to(dt)
        elif dt == torch.bool:
            out[name] = torch.from_numpy(rng.integers(0, 2, shape).astype(bool))
        else:
            out[name] = torch.from_numpy(rng.integers(0, 1000, shape)).to(dt)
    return out


def save_model(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def weights_file(path: str | Path) -> Path:
    """A .safetensors file, or the model.safetensors inside a checkout / LeRobot directory."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def load_model(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(weights_file(path)))


def make_model(path: str | Path, seed: int = 0, specs: dict | None = None) -> Path:
    """A small policy-shaped model: bf16 vision, fp32 language, fp16 action, an int64 buffer."""
    return save_model(path, make_tensors(seed, specs))


def finetune_tensors(parent: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """What a short finetune does: every float moves by ~`scale` of its tensor's spread; ints bump."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in parent.items():
        if t.is_floating_point():
            x = t.to(torch.float32)
            std = float(x.std()) if x.numel() > 1 else float(x.abs().mean() or 1.0)
            noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)
            out[name] = (x + scale * std * noise).to(t.dtype)
        elif t.dtype == torch.bool:
            out[name] = t.clone()
        else:
            out[name] = t + 1
    return out


def make_finetuned(parent_path: str | Path, out_path: str | Path, seed: int = 1, scale: float = 0.01) -> Path:
    """Finetune (in the weights sense) the model at `parent_path` and save it at `out_path`."""
    return save_model(out_path, finetune_tensors(load_model(parent_path), seed, scale))


# ----------------------------------------------------------------------------- independent reading

_NP_DTYPE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors_np(path: str | Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str]]:
    """{name: (dtype, array)} and __metadata__, parsed with numpy only; BF16 comes back as float32
    (exact: bf16 is the top half of a float32). A directory is read through its index, if any."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors, meta = {}, {}
            for shard in shards:
                t, m = read_safetensors_np(path / shard)
                assert not set(t) & set(tensors), "tensor in two shards"
                tensors.update(t)
                meta.update(m)
            return tensors, meta
        path = path / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    data = raw[8 + n:]
    out = {}
    for name, e in header.items():
        a, b = e["data_offsets"]
        buf = data[a:b]
        if e["dtype"] == "BF16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=np.dtype(_NP_DTYPE[e["dtype"]]).newbyteorder("<"))
        out[name] = (e["dtype"], arr.reshape(e["shape"]).copy())
    return out, meta


def round_to(dtype: str, x: np.ndarray) -> np.ndarray:
    """float64 -> the stored dtype (round to nearest even), returned as float64."""
    if dtype == "F32":
        return x.astype(np.float32).astype(np.float64)
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "BF16":
        f = x.astype(np.float32)
        bits = f.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return (rounded.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "F64":
        return x
    raise ValueError(dtype)


def ulp(dtype: str, x: np.ndarray) -> np.ndarray:
    """The spacing of the stored dtype at |x| (float64 array)."""
    ax = np.abs(x)
    if dtype == "F32":
        return np.spacing(ax.astype(np.float32)).astype(np.float64)
    if dtype == "F16":
        return np.spacing(ax.astype(np.float16)).astype(np.float64)
    if dtype == "BF16":
        tiny = 2.0 ** -126
        e = np.floor(np.log2(np.maximum(ax, tiny)))
        return 2.0 ** (e - 7)
    if dtype == "F64":
        return np.spacing(ax)
    raise ValueError(dtype)


# The merge runs one step wider than storage (fp32 for bf16/fp16, fp64 for fp32), so besides the
# final rounding it may err by about this much relative to the size of its operands. That only
# shows where the result cancels to far below its operands (a merge of unrelated weights).
COMPUTE_EPS = {"BF16": 2.0 ** -22, "F16": 2.0 ** -22, "F32": 2.0 ** -51, "F64": 2.0 ** -51}


def retain_np(parent: dict, finetuned: dict, alpha_of) -> tuple[dict, dict]:
    """One RETAIN step computed independently in float64: (1 - a) * parent + a * finetuned.

    `parent`/`finetuned` map names to (dtype, array). Returns (rounded child, exact child): the
    rounded one (name -> (dtype, array) in the stored dtype) is the parent of the next step; the
    exact one (name -> (dtype, float64 array, operand magnitude)) is what a check compares the
    bank's bytes against. Integer buffers are copied from the finetuned model (the parent's when
    alpha is 0)."""
    rounded, exact = {}, {}
    for name, (dtype, p) in parent.items():
        fdtype, f = finetuned[name]
        assert fdtype == dtype
        a = alpha_of(name)
        if dtype in ("F32", "F16", "BF16", "F64"):
            p64, f64 = p.astype(np.float64), f.astype(np.float64)
            x = (1.0 - a) * p64 + a * f64
            exact[name] = (dtype, x, np.abs(p64) + np.abs(a * (f64 - p64)))
            rounded[name] = (dtype, round_to(dtype, x))
        else:
            v = f if a != 0 else p
            rounded[name] = (dtype, v.copy())
            exact[name] = (dtype, v.copy(), None)
    return rounded, exact


def assert_within_one_ulp(actual: dict, expected_exact: dict) -> None:
    """Every float of `actual` (as read from disk) within one ulp of its stored dtype of the
    exact expected value (plus the compute dtype's rounding at the operands' scale, see
    COMPUTE_EPS); integer buffers equal."""
    assert set(actual) == set(expected_exact)
    for name, (dtype, got) in actual.items():
        edtype, want, mag = expected_exact[name]
        assert dtype == edtype, name
        if dtype in ("F32", "F16", "BF16", "F64"):
            g = got.astype(np.float64)
            tol = np.maximum(ulp(dtype, g), ulp(dtype, want)) + COMPUTE_EPS[dtype] * mag
            err = np.abs(g - want)
            worst = float(np.max(err / tol)) if err.size else 0.0
            assert worst <= 1.0, f"{name}: off by {worst:.3f} ulp of {dtype}"
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def objects_snapshot(bank_dir: str | Path) -> set[str]:
    root = Path(bank_dir) / "objects"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()


# ----------------------------------------------------------------------------- the console entry point

class CommandHung(BaseException):
    """A BaseException, so that no handler of the command under test can swallow it as an error."""


def run_main(*args, timeout: int = 0) -> tuple[int, str, str]:
    """`skillbank ARGS` through the console entry point main(), in-process: (exit code, stdout, stderr).

    An exception main() does not turn into an exit code escapes and fails the test, traceback and
    all: exactly what a user must never see. `timeout` (s): SIGALRM raises CommandHung in the
    command, for inputs that could make it loop.
    """
    import signal
    import sys

    from click.testing import CliRunner

    from skillbank.cli import main

    def _alarm(signum, frame):
        raise CommandHung(f"no outcome within {timeout} s (a loop over a cycle, a read that never ends?)")

    runner, old = CliRunner(), sys.argv
    previous = signal.signal(signal.SIGALRM, _alarm) if timeout else None
    code = 0
    with runner.isolation() as (out, err, _):
        sys.argv = ["skillbank", *map(str, args)]
        if timeout:
            signal.alarm(timeout)
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            if timeout:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
            sys.argv = old
            sys.stdout.flush()
            sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()
