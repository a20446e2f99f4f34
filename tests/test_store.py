"""skillbank.store.ObjectStore: content addressing, atomic writes, and corruption detection."""

from __future__ import annotations

import os
import re
import stat

import pytest
import xxhash

from skillbank.errors import IntegrityError
from skillbank.store import ObjectStore, hash_file
from skillbank.store.objects import MAP_WINDOW


@pytest.fixture
def store(tmp_path):
    return ObjectStore(tmp_path / "bank").create()


def _writable(path) -> None:
    os.chmod(path, 0o644)


def _flip_bit(path, offset: int, bit: int = 0) -> None:
    _writable(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def _truncate(path, size: int) -> None:
    _writable(path)
    os.truncate(path, size)


def test_create_makes_objects_and_tmp(tmp_path):
    s = ObjectStore(tmp_path / "b")
    assert list(s) == []  # iterating a store that was never created is fine
    s.create()
    assert (tmp_path / "b" / "objects").is_dir() and (tmp_path / "b" / "tmp").is_dir()
    s.create()  # idempotent


@pytest.mark.parametrize("data", [b"", b"x", b"hello skillbank", bytes(range(256)) * 1000],
                         ids=["empty", "one-byte", "text", "256kB"])
def test_put_get_round_trip_and_digest_is_xxh3_128(store, data):
    digest = store.put_bytes(data)
    assert digest == xxhash.xxh3_128_hexdigest(data)
    assert re.fullmatch(r"[0-9a-f]{32}", digest)
    assert store.get_bytes(digest) == data
    assert store.has(digest)
    assert store.size(digest) == len(data)
    assert store.verify(digest)
    assert store.open_verified(digest).read_bytes() == data
    assert hash_file(store.path(digest)) == digest


def test_fan_out_layout(store):
    digest = store.put_bytes(b"layout")
    p = store.path(digest)
    assert p == store.root / "objects" / digest[:2] / digest[2:]
    assert len(p.parent.name) == 2 and len(p.name) == 30
    assert p.is_file()
    assert sorted(x.name for x in (store.root / "objects").iterdir()) == [digest[:2]]
    assert [x.name for x in p.parent.iterdir()] == [digest[2:]]


def test_objects_are_read_only(store):
    digest = store.put_bytes(b"immutable")
    mode = store.path(digest).stat().st_mode
    assert stat.S_IMODE(mode) & 0o222 == 0
    assert stat.S_IMODE(mode) & 0o444 == 0o444


def test_same_bytes_twice_is_one_object(store):
    a = store.put_bytes(b"same")
    b = store.put_bytes(b"same")
    assert a == b
    assert list(store) == [a]
    assert list(store.tmp.iterdir()) == []  # the second temp file was removed


def test_json_round_trip_is_canonical(store):
    a = store.put_json({"b": 1, "a": [1, 2, {"z": None}]})
    b = store.put_json({"a": [1, 2, {"z": None}], "b": 1})
    assert a == b  # key order does not change the digest
    assert store.get_json(a) == {"a": [1, 2, {"z": None}], "b": 1}
    assert store.get_bytes(a) == b'{"a":[1,2,{"z":null}],"b":1}'


def test_streaming_writer_commits_what_was_written(store):
    chunks = [b"abc" * 1000, memoryview(b"defg"), bytearray(b"\0" * 5)]
    with store.writer() as w:
        for c in chunks:
            w.write(c)
        assert w.tell() == 3000 + 4 + 5
        digest = w.commit()
    data = b"".join(bytes(c) for c in chunks)
    assert digest == xxhash.xxh3_128_hexdigest(data)
    assert store.get_bytes(digest) == data
    assert list(store.tmp.iterdir()) == []


def test_large_object_spanning_read_blocks(store):
    data = os.urandom(MAP_WINDOW + 12345)
    digest = store.put_bytes(data)
    assert store.verify(digest)
    assert hash_file(store.path(digest)) == xxhash.xxh3_128_hexdigest(data)
    _flip_bit(store.path(digest), MAP_WINDOW + 100, 3)  # damage in the second mapped window
    assert not store.verify(digest)


@pytest.mark.parametrize("damage", ["flip-first", "flip-middle", "flip-last", "truncate", "empty", "extend"])
def test_corruption_is_detected(tmp_path, damage):
    data = bytes(range(256)) * 64
    digest = ObjectStore(tmp_path).create().put_bytes(data)
    path = ObjectStore(tmp_path).path(digest)
    if damage == "flip-first":
        _flip_bit(path, 0, 7)
    elif damage == "flip-middle":
        _flip_bit(path, len(data) // 2, 0)
    elif damage == "flip-last":
        _flip_bit(path, len(data) - 1, 4)
    elif damage == "truncate":
        _truncate(path, len(data) - 1)
    elif damage == "empty":
        _truncate(path, 0)
    else:
        _writable(path)
        with open(path, "ab") as f:
            f.write(b"!")
    # A fresh store: nothing has been verified in it yet.
    s = ObjectStore(tmp_path)
    with pytest.raises(IntegrityError, match=f"object {digest} is corrupt"):
        s.get_bytes(digest)
    with pytest.raises(IntegrityError, match=f"object {digest} is corrupt"):
        s.open_verified(digest)
    with pytest.raises(IntegrityError, match="corrupt"):
        s.get_json(digest)
    assert s.verify(digest) is False
    assert s.has(digest)  # still there: detection does not delete evidence


def test_open_verified_rechecks_after_the_object_changes_size(store):
    data = b"0123456789" * 100
    digest = store.put_bytes(data)
    assert store.open_verified(digest) == store.path(digest)
    _truncate(store.path(digest), 10)
    with pytest.raises(IntegrityError, match="corrupt"):
        store.open_verified(digest)


def test_missing_objects(store):
    digest = "0" * 32
    assert not store.has(digest)
    assert store.verify(digest) is False
    with pytest.raises(IntegrityError, match="missing"):
        store.get_bytes(digest)
    with pytest.raises(IntegrityError, match="missing"):
        store.open_verified(digest)


@pytest.mark.parametrize("bad", ["", "abc", "0" * 31, "0" * 33, "G" * 32, "A" * 32, "../" + "0" * 29,
                                 "00/" + "0" * 29])
def test_malformed_digests_are_refused(store, bad):
    with pytest.raises(IntegrityError, match="malformed"):
        store.path(bad)
    with pytest.raises(IntegrityError, match="malformed"):
        store.get_bytes(bad)


def test_aborting_a_writer_leaves_nothing(store):
    w = store.writer()
    w.write(b"half an object")
    assert len(list(store.tmp.iterdir())) == 1  # it was being written in tmp/
    w.abort()
    assert list(store.tmp.iterdir()) == []
    assert list((store.root / "objects").iterdir()) == []
    assert list(store) == []
    w.abort()  # a second abort is harmless


def test_an_exception_inside_the_writer_context_aborts(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer() as w:
            w.write(b"partial")
            raise RuntimeError("boom")
    assert list(store.tmp.iterdir()) == []
    assert list((store.root / "objects").iterdir()) == []


def test_iteration_lists_exactly_the_objects(store):
    payloads = [f"object {i}".encode() for i in range(40)]
    digests = {store.put_bytes(p) for p in payloads}
    assert len(digests) == 40
    # Things that are not objects: a temp file, stray files, a bad fan-out dir, a non-hex name.
    pending = store.writer()
    pending.write(b"not committed")
    (store.root / "objects" / "README").write_text("stray")
    (store.root / "objects" / "zzz").mkdir()
    some = next(iter(digests))
    (store.root / "objects" / some[:2] / "not-a-digest").write_text("x")
    listed = list(store)
    assert sorted(listed) == sorted(digests)
    assert listed == sorted(listed)  # deterministic order
    pending.abort()


def test_remove_and_age(store):
    keep = store.put_bytes(b"keep")
    gone = store.put_bytes(b"gone!")
    assert store.age(gone) >= 0
    assert store.remove(gone) == 5
    assert not store.has(gone)
    assert list(store) == [keep]


def test_recommitting_an_existing_object_refreshes_its_mtime(store):
    digest = store.put_bytes(b"refresh")
    old = store.path(digest).stat().st_mtime - 10_000
    os.utime(store.path(digest), (old, old))
    assert store.age(digest) > 9_000
    assert store.put_bytes(b"refresh") == digest
    assert store.age(digest) < 100


def test_stale_temp_files(store):
    w = store.writer()
    w.write(b"x")
    assert store.stale_temp_files(older_than=3600) == []
    assert store.stale_temp_files(older_than=0) == [w.tmp_path]
    w.abort()
    assert store.stale_temp_files(older_than=0) == []



def test_hash_file_of_an_empty_file_and_across_map_windows(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert hash_file(empty) == xxhash.xxh3_128(b"").hexdigest()
    data = os.urandom(2 * MAP_WINDOW + 1)
    big = tmp_path / "big"
    big.write_bytes(data)
    assert hash_file(big) == xxhash.xxh3_128(data).hexdigest()
