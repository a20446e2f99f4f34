"""DirectFile: O_DIRECT writes through an aligned stage must leave exactly the bytes written."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skillbank.tensors import direct
from skillbank.tensors.direct import DirectFile


@pytest.fixture
def small_stage(monkeypatch):
    """Two alignment units per stage, so short streams cross many stage boundaries."""
    monkeypatch.setattr(direct, "STAGE_BYTES", 2 * direct.ALIGN)


def _write_all(path: Path, parts: list[bytes], direct_io: bool = True) -> DirectFile:
    f = DirectFile(path, direct=direct_io)
    for p in parts:
        assert f.write(p) == len(p)
    f.flush()
    os.fsync(f.fileno())
    f.close()
    return f


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.one_of(st.integers(0, 300), st.integers(60_000, 300_000)), max_size=12),
       direct_io=st.booleans())
def test_the_file_holds_exactly_the_bytes_written(tmp_path, small_stage, sizes, direct_io):
    parts = [os.urandom(n) for n in sizes]
    path = tmp_path / "out.bin"
    _write_all(path, parts, direct_io)
    assert path.read_bytes() == b"".join(parts)


def test_direct_io_is_really_on_while_streaming(tmp_path, small_stage):
    f = DirectFile(tmp_path / "x")
    if not f.direct:
        f.close()
        pytest.skip("this filesystem refuses O_DIRECT")
    f.write(os.urandom(3 * direct.ALIGN + 5))
    assert fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    f.close()
    assert (tmp_path / "x").stat().st_size == 3 * direct.ALIGN + 5


def test_a_filesystem_that_refuses_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
    real = direct._open

    def refusing(path, use_direct: bool):
        if use_direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, False)

    monkeypatch.setattr(direct, "_open", refusing)
    data = os.urandom(1_000_003)
    f = _write_all(tmp_path / "y", [data])
    assert not f.direct
    assert (tmp_path / "y").read_bytes() == data


def test_short_writes_fall_back_to_buffered_and_lose_nothing(tmp_path, small_stage):
    f = DirectFile(tmp_path / "z")
    real = f._f

    class Short:  # a device that takes at most 1000 bytes per call
        def write(self, b):
            return real.write(memoryview(b)[:1000])

        def __getattr__(self, name):
            return getattr(real, name)

    f._f = Short()
    data = os.urandom(5 * direct.ALIGN + 17)
    f.write(data)
    f.close()
    assert not f.direct
    assert (tmp_path / "z").read_bytes() == data


def test_a_symlink_where_the_file_goes_is_refused(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        DirectFile(tmp_path / "link")
    assert target.read_bytes() == b"keep"


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_tmpfs_works_through_the_fallback(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        data = os.urandom(direct.STAGE_BYTES + 12345)
        _write_all(Path(d) / "w", [data[:100], data[100:]])
        assert (Path(d) / "w").read_bytes() == data


def test_a_second_writer_of_the_same_temp_path_is_refused_and_the_first_is_intact(tmp_path):
    import torch

    from skillbank.errors import CheckpointError
    from skillbank.tensors import CheckpointWriter, TensorSpec

    specs = [TensorSpec("w", "BF16", (4096, 64))]
    x = torch.randn(4096, 64).to(torch.bfloat16)
    first = CheckpointWriter(tmp_path, specs)
    first.write("w", x[:2048])
    with pytest.raises(CheckpointError, match="another checkout is writing"):
        CheckpointWriter(tmp_path, specs)
    first.write("w", x[2048:])
    (path,) = first.commit()
    from safetensors.torch import load_file

    assert torch.equal(load_file(path)["w"], x)
    second = CheckpointWriter(tmp_path, specs)  # the name is free again once the first is done
    second.write("w", x)
    second.commit()
    assert torch.equal(load_file(path)["w"], x)
    assert not list(tmp_path.glob("*.partial"))


def test_close_twice_is_a_no_op(tmp_path):
    f = DirectFile(tmp_path / "c")
    f.write(b"x" * 100_001)
    f.close()
    f.close()
    assert (tmp_path / "c").read_bytes() == b"x" * 100_001


def test_a_filesystem_without_locks_still_gets_its_file(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(direct.fcntl, "flock", no_locks)
    data = os.urandom(200_001)
    _write_all(tmp_path / "n", [data])
    assert (tmp_path / "n").read_bytes() == data
