"""LeRobotDataset v3 demos: round trip, layout, digest, errors, DVC provenance (fast, no simulator)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skillbank.errors import SkillbankError
from skillbank.train.demos import (DemoSet, DemosError, demos_digest, dvc_info, read_demos,
                                   write_demos)


def _episodes(lengths=(5, 7, 3), obs_dim=39, act_dim=4, seed=0):
    rng = np.random.default_rng(seed)
    tasks = ["reach the goal position", "push the puck to the goal"]
    return [{"obs": rng.normal(size=(t, obs_dim)).astype(np.float32),
             "action": rng.uniform(-1, 1, size=(t, act_dim)).astype(np.float32),
             "task": tasks[i % 2]} for i, t in enumerate(lengths)]


@pytest.fixture
def dataset(tmp_path):
    eps = _episodes()
    return write_demos(tmp_path / "demos", eps), eps


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    assert isinstance(excinfo.value, SkillbankError)
    return msg


# ----------------------------------------------------------------------------- round trip

def test_round_trip(dataset):
    path, eps = dataset
    ds = read_demos(path)
    assert isinstance(ds, DemoSet)
    assert ds.root == path and ds.fps == 80
    np.testing.assert_array_equal(ds.obs, np.concatenate([e["obs"] for e in eps]))
    np.testing.assert_array_equal(ds.action, np.concatenate([e["action"] for e in eps]))
    assert ds.obs.dtype == np.float32 and ds.action.dtype == np.float32
    assert ds.episode_index.tolist() == [0] * 5 + [1] * 7 + [2] * 3
    assert ds.task_index.tolist() == [0] * 5 + [1] * 7 + [0] * 3
    assert ds.tasks == {0: "reach the goal position", 1: "push the puck to the goal"}
    assert ds.n_episodes == 3 and ds.n_frames == 15 and ds.obs_dim == 39 and ds.action_dim == 4
    assert ds.instructions[4:6] == ["reach the goal position", "push the puck to the goal"]
    assert [(s.start, s.stop) for s in ds.episode_slices()] == [(0, 5), (5, 12), (12, 15)]


def test_layout_is_lerobot_v3(dataset):
    path, _ = dataset
    info = json.loads((path / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["fps"] == 80 and info["robot_type"] == "sawyer"
    assert info["total_episodes"] == 3 and info["total_frames"] == 15 and info["total_tasks"] == 2
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["chunks_size"] == 1000 and info["splits"] == {"train": "0:3"}
    feats = info["features"]
    assert feats["observation.state"] == {"dtype": "float32", "shape": [39],
                                          "names": [f"s{i}" for i in range(39)]}
    assert feats["action"]["shape"] == [4]
    for key, dtype in [("timestamp", "float32"), ("frame_index", "int64"),
                       ("episode_index", "int64"), ("index", "int64"), ("task_index", "int64")]:
        assert feats[key] == {"dtype": dtype, "shape": [1], "names": None}

    frames = pq.read_table(path / "data/chunk-000/file-000.parquet")
    assert frames.schema.field("observation.state").type == pa.list_(pa.float32(), 39)
    assert frames.column("index").to_pylist() == list(range(15))
    assert frames.column("frame_index").to_pylist()[5:8] == [0, 1, 2]
    np.testing.assert_allclose(frames.column("timestamp").to_numpy()[5:8], [0, 1 / 80, 2 / 80])

    episodes = pq.read_table(path / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert episodes[1] == {
        "episode_index": 1, "tasks": ["push the puck to the goal"], "length": 7,
        "data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": 5,
        "dataset_to_index": 12, "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}

    tasks = pq.read_table(path / "meta/tasks.parquet")
    assert tasks.column("task").to_pylist() == ["reach the goal position",
                                                "push the puck to the goal"]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    stats = json.loads((path / "meta/stats.json").read_text())
    assert stats["action"]["count"] == [15] and len(stats["observation.state"]["mean"]) == 39


def test_names_and_fps_are_written(tmp_path):
    eps = _episodes(lengths=(4,), obs_dim=3, act_dim=2)
    path = write_demos(tmp_path / "d", eps, fps=10, robot_type="so100",
                       state_names=["x", "y", "z"], action_names=["vx", "vy"])
    info = json.loads((path / "meta/info.json").read_text())
    assert info["robot_type"] == "so100" and info["fps"] == 10
    assert info["features"]["observation.state"]["names"] == ["x", "y", "z"]
    assert read_demos(path).fps == 10


def test_reads_lerobot_written_variants(tmp_path):
    """What LeRobot itself writes: variable-length list columns, the task string as pandas'
    __index_level_0__, stats/ columns in the episode table, frames split over two files."""
    root = tmp_path / "lr"
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    (root / "data/chunk-000").mkdir(parents=True)
    rng = np.random.default_rng(1)
    obs, act = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    for file, rows in ((0, range(0, 4)), (1, range(4, 6))):
        rows = list(rows)
        pq.write_table(pa.table({
            "observation.state": pa.array([obs[i].tolist() for i in rows], pa.list_(pa.float32())),
            "action": pa.array([act[i].tolist() for i in rows], pa.list_(pa.float64())),
            "timestamp": pa.array([0.0] * len(rows), pa.float32()),
            "frame_index": pa.array([i if i < 4 else i - 4 for i in rows], pa.int64()),
            "episode_index": pa.array([0 if i < 4 else 1 for i in rows], pa.int64()),
            "index": pa.array(rows, pa.int64()),
            "task_index": pa.array([0 if i < 4 else 1 for i in rows], pa.int64()),
        }), root / f"data/chunk-000/file-{file:03d}.parquet")
    pq.write_table(pa.table({
        "episode_index": [0, 1], "tasks": [["a"], ["b"]], "length": [4, 2],
        "data/chunk_index": [0, 0], "data/file_index": [0, 1],
        "dataset_from_index": [0, 4], "dataset_to_index": [4, 6],
        "stats/action/mean": [[0.0, 0.0], [0.0, 0.0]],
    }), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": [0, 1], "__index_level_0__": ["a", "b"]}),
                   root / "meta/tasks.parquet")
    (root / "meta/info.json").write_text(json.dumps({
        "codebase_version": "v3.0", "fps": 30, "total_frames": 6,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "features": {"observation.state": {"dtype": "float32", "shape": [3]},
                     "action": {"dtype": "float64", "shape": [2]},
                     "observation.images.top": {"dtype": "video", "shape": [8, 8, 3]}}}))
    ds = read_demos(root)
    np.testing.assert_allclose(ds.obs, obs.astype(np.float32))
    np.testing.assert_allclose(ds.action, act.astype(np.float32))
    assert ds.tasks == {0: "a", 1: "b"} and ds.n_episodes == 2 and ds.fps == 30


# ----------------------------------------------------------------------------- digest

def test_digest_is_stable_and_location_independent(tmp_path):
    eps = _episodes()
    a = write_demos(tmp_path / "a", eps)
    b = write_demos(tmp_path / "elsewhere" / "b", eps)
    d = demos_digest(a)
    assert len(d) == 32 and int(d, 16) >= 0
    assert demos_digest(a) == d == demos_digest(b)


def test_digest_sees_every_change(dataset, tmp_path):
    path, _ = dataset
    base = demos_digest(path)
    data = path / "data/chunk-000/file-000.parquet"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    flipped = demos_digest(path)
    assert flipped != base
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    assert demos_digest(path) == base
    (path / "README.md").write_text("notes\n")
    added = demos_digest(path)
    assert added not in (base, flipped)
    (path / "README.md").rename(path / "README.txt")
    assert demos_digest(path) not in (base, flipped, added)
    (path / "README.txt").unlink()
    assert demos_digest(path) == base
    different = write_demos(tmp_path / "other", _episodes(seed=1))
    assert demos_digest(different) != base


def test_digest_of_missing_directory(tmp_path):
    with pytest.raises(DemosError) as e:
        demos_digest(tmp_path / "nope")
    assert "no such dataset directory" in _one_line(e)


# ----------------------------------------------------------------------------- read errors

def _edit_info(path, **changes):
    f = path / "meta/info.json"
    info = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = v
    f.write_text(json.dumps(info))
    return info


def test_error_missing_info(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DemosError) as e:
        read_demos(tmp_path / "x")
    assert _one_line(e) == f"{tmp_path / 'x'}: not a LeRobot v3 dataset (meta/info.json missing)"
    with pytest.raises(DemosError) as e:
        read_demos(tmp_path / "missing")
    assert "no such directory" in _one_line(e)


def test_error_bad_json(dataset):
    path, _ = dataset
    (path / "meta/info.json").write_text("{not json")
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "not valid JSON" in _one_line(e)


@pytest.mark.parametrize("version", ["v2.1", "v1.6", None])
def test_error_wrong_version(dataset, version):
    path, _ = dataset
    _edit_info(path, codebase_version=version)
    with pytest.raises(DemosError) as e:
        read_demos(path)
    msg = _one_line(e)
    assert "expected v3.x" in msg
    if version == "v2.1":
        assert "convert_dataset_v21_to_v30" in msg


@pytest.mark.parametrize("feature", ["action", "observation.state"])
def test_error_missing_feature(dataset, feature):
    path, _ = dataset
    info = json.loads((path / "meta/info.json").read_text())
    del info["features"][feature]
    (path / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert f"no '{feature}' feature" in _one_line(e)


def test_error_feature_width_mismatch(dataset):
    path, _ = dataset
    info = json.loads((path / "meta/info.json").read_text())
    info["features"]["action"]["shape"] = [7]
    (path / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "'action' has width 4, meta/info.json says 7" in _one_line(e)


def test_error_no_parquet_files(dataset):
    path, _ = dataset
    (path / "data/chunk-000/file-000.parquet").unlink()
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "no parquet files under data/" in _one_line(e)


def test_error_no_episode_files(dataset):
    path, _ = dataset
    (path / "meta/episodes/chunk-000/file-000.parquet").unlink()
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "no parquet files under meta/episodes/" in _one_line(e)


def test_error_missing_tasks(dataset):
    path, _ = dataset
    (path / "meta/tasks.parquet").unlink()
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "meta/tasks.parquet missing" in _one_line(e)


def test_error_corrupt_parquet(dataset):
    path, _ = dataset
    (path / "data/chunk-000/file-000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "data/chunk-000/file-000.parquet is not a readable parquet file" in _one_line(e)


def test_error_total_frames_mismatch(dataset):
    path, _ = dataset
    _edit_info(path, total_frames=99)
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "says 99 frames, data/ holds 15" in _one_line(e)


def _rewrite_episodes(path, **columns):
    f = path / "meta/episodes/chunk-000/file-000.parquet"
    t = pq.read_table(f)
    for name, values in columns.items():
        t = t.set_column(t.column_names.index(name), name, pa.array(values, pa.int64()))
    pq.write_table(t, f)


def test_error_episode_lengths_mismatch(dataset):
    path, _ = dataset
    _rewrite_episodes(path, length=[5, 8, 3])
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "episode lengths add up to 16 frames, data/ holds 15" in _one_line(e)
    _rewrite_episodes(path, length=[6, 6, 3], dataset_from_index=[0, 6, 12],
                      dataset_to_index=[6, 12, 15])
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "episode 0: meta/episodes says 6 frames, data/ holds 5" in _one_line(e)


def test_error_unknown_task_index(dataset):
    path, _ = dataset
    pq.write_table(pa.table({"task_index": pa.array([0], pa.int64()), "task": ["only one"]}),
                   path / "meta/tasks.parquet")
    with pytest.raises(DemosError) as e:
        read_demos(path)
    assert "task_index 1, which meta/tasks.parquet lacks" in _one_line(e)


# ----------------------------------------------------------------------------- write errors

@pytest.mark.parametrize("episodes, fragment", [
    ([], "no episodes to write"),
    ([{"obs": np.zeros((3, 2)), "action": np.zeros((4, 1)), "task": "t"}],
     "3 observations but 4 actions"),
    ([{"obs": np.zeros((3, 2)), "action": np.zeros((3, 1)), "task": "t"},
      {"obs": np.zeros((3, 5)), "action": np.zeros((3, 1)), "task": "t"}],
     "episode 1 has obs/action widths 5/1, episode 0 has 2/1"),
    ([{"obs": np.zeros(3), "action": np.zeros((3, 1)), "task": "t"}], "must be 2-D"),
    ([{"obs": np.zeros((0, 2)), "action": np.zeros((0, 1)), "task": "t"}], "episode 0 is empty"),
    ([{"obs": np.full((2, 2), np.nan), "action": np.zeros((2, 1)), "task": "t"}], "NaN or Inf"),
    ([{"obs": np.zeros((2, 2)), "action": np.zeros((2, 1)), "task": ""}], "non-empty string"),
    ([{"obs": np.zeros((2, 2)), "task": "t"}], "has no 'action'"),
])
def test_write_errors(tmp_path, episodes, fragment):
    with pytest.raises(DemosError) as e:
        write_demos(tmp_path / "d", episodes)
    assert fragment in _one_line(e)
    assert not (tmp_path / "d").exists()


def test_write_refuses_to_clobber(dataset, tmp_path):
    path, eps = dataset
    before = demos_digest(path)
    with pytest.raises(DemosError) as e:
        write_demos(path, eps[:1])
    assert "already exists" in _one_line(e)
    assert demos_digest(path) == before
    write_demos(path, eps[:1], overwrite=True)
    assert read_demos(path).n_episodes == 1
    other = tmp_path / "not-a-dataset"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DemosError) as e:
        write_demos(other, eps, overwrite=True)
    assert "is not a LeRobot dataset" in _one_line(e)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(DemosError) as e:
        write_demos(tmp_path / "f", eps, fps=0)
    assert "fps must be a positive integer" in _one_line(e)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary directory left behind


# ----------------------------------------------------------------------------- DVC provenance

def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
                           "-c", "commit.gpgsign=false", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / ".gitignore").write_text("/data/demos\n")
    _git(root, "add", ".gitignore")
    _git(root, "commit", "-q", "-m", "init")
    (root / "data").mkdir()
    return root


def test_dvc_info_from_dvc_file(repo):
    demos = write_demos(repo / "data/demos", _episodes())
    assert dvc_info(demos) == {}  # in git but not DVC-tracked
    (repo / "data/demos.dvc").write_text(
        "outs:\n- md5: 3f2a1b5c9d8e7f60a1b2c3d4e5f60718.dir\n  size: 12345\n  nfiles: 5\n"
        "  hash: md5\n  path: demos\n")
    _git(repo, "add", "data/demos.dvc")
    _git(repo, "commit", "-q", "-m", "track demos")
    head = _git(repo, "rev-parse", "HEAD")
    assert dvc_info(demos) == {"dvc_hash": "3f2a1b5c9d8e7f60a1b2c3d4e5f60718.dir", "git_rev": head}
    # A dataset inside a DVC-tracked directory is pinned by that directory's hash.
    nested = write_demos(repo / "data/demos/sub", _episodes())
    assert dvc_info(nested)["dvc_hash"] == "3f2a1b5c9d8e7f60a1b2c3d4e5f60718.dir"


def test_dvc_info_from_dvc_lock(repo):
    demos = write_demos(repo / "data/demos", _episodes())
    (repo / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  record:\n    cmd: python record.py\n    outs:\n"
        "    - path: data/demos\n      hash: md5\n      md5: aaaabbbbccccddddeeeeffff00001111.dir\n")
    info = dvc_info(demos)
    assert info["dvc_hash"] == "aaaabbbbccccddddeeeeffff00001111.dir"
    assert info["git_rev"] == _git(repo, "rev-parse", "HEAD")


def test_dvc_info_never_raises(repo, tmp_path):
    demos = write_demos(repo / "data/demos", _episodes())
    (repo / "data/demos.dvc").write_text("outs: [: this is not yaml")
    assert dvc_info(demos) == {}
    assert dvc_info(tmp_path / "does-not-exist") == {}
    assert dvc_info(None) == {}
    # DVC-tracked outside any git repository: the hash, and no revision.
    loose = write_demos(tmp_path / "loose" / "demos", _episodes())
    (tmp_path / "loose/demos.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: demos\n")
    assert dvc_info(loose) == {"dvc_hash": "0123456789abcdef0123456789abcdef.dir", "git_rev": None}
