"""Demonstrations as a LeRobotDataset v3 directory, read and written with pyarrow alone.

Why pyarrow and not `lerobot`: lerobot needs Python 3.12 and pulls in a video stack; a state-only
dataset is four small files whose layout LeRobot v3 defines:

    meta/info.json                              codebase_version "v3.0", fps, features, path templates
    meta/tasks.parquet                          task string (the pandas index) -> task_index
    meta/episodes/chunk-000/file-000.parquet    one row per episode: length, tasks, where its frames are
    data/chunk-000/file-000.parquet             one row per frame
    meta/stats.json                             min / max / mean / std / count per feature

Datasets written here load with `lerobot.datasets.LeRobotDataset(repo_id, root=...)`, and datasets
written by LeRobot (state-based, any number of data files) read here. Only `observation.state` and
`action` are used; image and video features are ignored.

Provenance: `demos_digest` hashes every byte of the directory, and `dvc_info` finds the DVC hash
and git revision when the demos are tracked with DVC, so a skill records exactly what it learned from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import xxhash

from skillbank.errors import SkillbankError, show

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000  # LeRobot's files per chunk directory
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 500
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
DATA_DIR = "data"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = DATA_DIR + "/" + CHUNK_FILE + ".parquet"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"

STATE_KEY = "observation.state"
ACTION_KEY = "action"
# The bookkeeping features every LeRobot dataset has (LeRobot's DEFAULT_FEATURES).
INDEX_FEATURES = {
    "timestamp": "float32",
    "frame_index": "int64",
    "episode_index": "int64",
    "index": "int64",
    "task_index": "int64",
}

_FLOAT_DTYPES = ("float32", "float64", "float16")


class DemosError(SkillbankError):
    """Demonstrations cannot be read or written: the message names the dataset and the problem."""


def _pa():
    """pyarrow, imported late so that `import skillbank` stays cheap."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


@dataclass
class DemoSet:
    """Every frame of a dataset in memory: state-based demos are small (39 + 4 floats a frame)."""

    root: Path
    obs: np.ndarray  # (N, D) float32, observation.state
    action: np.ndarray  # (N, A) float32
    task_index: np.ndarray  # (N,) int64
    episode_index: np.ndarray  # (N,) int64
    tasks: dict[int, str]  # task_index -> task string (for Meta-World demos: the instruction)
    fps: int

    @property
    def n_frames(self) -> int:
        return int(self.obs.shape[0])

    @property
    def n_episodes(self) -> int:
        return int(np.unique(self.episode_index).size)

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.action.shape[1])

    @property
    def instructions(self) -> list[str]:
        """The task string of every frame, for language-conditioned trainers."""
        return [self.tasks[int(i)] for i in self.task_index]

    def episode_slices(self) -> list[slice]:
        """Where each episode's frames are (frames of an episode are contiguous, in order)."""
        if self.n_frames == 0:
            return []
        cuts = np.flatnonzero(np.diff(self.episode_index)) + 1
        edges = [0, *cuts.tolist(), self.n_frames]
        return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


# ----------------------------------------------------------------------------- writing

def _feature_names(prefix: str, n: int, names: list[str] | None, where: str) -> list[str]:
    if names is None:
        return [f"{prefix}{i}" for i in range(n)]
    names = [str(x) for x in names]
    if len(names) != n:
        raise DemosError(f"{where}: {len(names)} names given for a feature of width {n}")
    return names


def _check_episodes(episodes: list[dict], where: str) -> tuple[int, int]:
    if not episodes:
        raise DemosError(f"{where}: no episodes to write")
    dims = None
    for i, ep in enumerate(episodes):
        for key in ("obs", "action", "task"):
            if key not in ep:
                raise DemosError(f"{where}: episode {i} has no '{key}'")
        obs, act = np.asarray(ep["obs"]), np.asarray(ep["action"])
        if obs.ndim != 2 or act.ndim != 2:
            raise DemosError(f"{where}: episode {i}: obs and action must be 2-D (T, D), "
                             f"got shapes {obs.shape} and {act.shape}")
        if obs.shape[0] != act.shape[0]:
            raise DemosError(f"{where}: episode {i}: {obs.shape[0]} observations but "
                             f"{act.shape[0]} actions")
        if obs.shape[0] == 0:
            raise DemosError(f"{where}: episode {i} is empty")
        if dims is None:
            dims = (obs.shape[1], act.shape[1])
        elif (obs.shape[1], act.shape[1]) != dims:
            raise DemosError(f"{where}: episode {i} has obs/action widths "
                             f"{obs.shape[1]}/{act.shape[1]}, episode 0 has {dims[0]}/{dims[1]}")
        if not (np.isfinite(obs).all() and np.isfinite(act).all()):
            raise DemosError(f"{where}: episode {i} contains NaN or Inf")
        if not isinstance(ep["task"], str) or not ep["task"].strip():
            raise DemosError(f"{where}: episode {i}: task must be a non-empty string")
    return dims  # type: ignore[return-value]


def _fixed_list(pa, values: np.ndarray):
    """A (N, D) array as a fixed_size_list<float32>[D] column (what HF datasets' Sequence(length=D) gives)."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _stats(values: np.ndarray) -> dict[str, list]:
    """LeRobot's per-feature statistics (reduced over frames, kept per dimension)."""
    v = values.astype(np.float64).reshape(values.shape[0], -1)
    return {
        "min": v.min(axis=0).tolist(),
        "max": v.max(axis=0).tolist(),
        "mean": v.mean(axis=0).tolist(),
        "std": v.std(axis=0).tolist(),
        "count": [int(v.shape[0])],
    }


def _tasks_table(pa, task_list: list[str]):
    """meta/tasks.parquet as pandas writes it: the task string is the DataFrame's index, so
    LeRobot's `pd.read_parquet(...)` gets the tasks back as index labels."""
    table = pa.table({
        "task_index": pa.array(range(len(task_list)), type=pa.int64()),
        "task": pa.array(task_list, type=pa.string()),
    })
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                            "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
             "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode",
             "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    return table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})


def write_demos(path, episodes: list[dict], fps: int = 80, robot_type: str = "sawyer", *,
                state_names: list[str] | None = None, action_names: list[str] | None = None,
                overwrite: bool = False) -> Path:
    """Write episodes ({"obs": (T, D), "action": (T, A), "task": str}) as a LeRobot v3 dataset.

    The directory is assembled next to `path` and renamed into place, so a crash never leaves a
    half-written dataset that a later `read_demos` would accept. `overwrite` replaces an existing
    LeRobot dataset (never an arbitrary directory).
    """
    pa, pq = _pa()
    path = Path(path)
    where = str(path)
    if not isinstance(fps, int) or isinstance(fps, bool) or fps <= 0:
        raise DemosError(f"{where}: fps must be a positive integer, got {fps!r}")
    obs_dim, act_dim = _check_episodes(episodes, where)
    state_names = _feature_names("s", obs_dim, state_names, where)
    action_names = _feature_names("a", act_dim, action_names, where)
    if path.exists():
        if not overwrite:
            raise DemosError(f"{where}: already exists (pass overwrite to replace a dataset)")
        if not (path / INFO_PATH).is_file():
            raise DemosError(f"{where}: exists and is not a LeRobot dataset; refusing to replace it")

    task_ids: dict[str, int] = {}
    for ep in episodes:
        task_ids.setdefault(ep["task"], len(task_ids))
    lengths = [int(np.asarray(ep["obs"]).shape[0]) for ep in episodes]
    n = int(sum(lengths))
    obs = np.concatenate([np.asarray(ep["obs"], dtype=np.float32) for ep in episodes])
    act = np.concatenate([np.asarray(ep["action"], dtype=np.float32) for ep in episodes])
    episode_index = np.repeat(np.arange(len(episodes), dtype=np.int64), lengths)
    frame_index = np.concatenate([np.arange(t, dtype=np.int64) for t in lengths])
    task_index = np.repeat(np.array([task_ids[ep["task"]] for ep in episodes], dtype=np.int64),
                           lengths)
    timestamp = (frame_index / fps).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    frames = pa.table({
        STATE_KEY: _fixed_list(pa, obs),
        ACTION_KEY: _fixed_list(pa, act),
        "timestamp": pa.array(timestamp, type=pa.float32()),
        "frame_index": pa.array(frame_index, type=pa.int64()),
        "episode_index": pa.array(episode_index, type=pa.int64()),
        "index": pa.array(np.arange(n, dtype=np.int64), type=pa.int64()),
        "task_index": pa.array(task_index, type=pa.int64()),
    })
    ep_rows = pa.table({
        "episode_index": pa.array(range(len(episodes)), type=pa.int64()),
        "tasks": pa.array([[ep["task"]] for ep in episodes], type=pa.list_(pa.string())),
        "length": pa.array(lengths, type=pa.int64()),
        "data/chunk_index": pa.array([0] * len(episodes), type=pa.int64()),
        "data/file_index": pa.array([0] * len(episodes), type=pa.int64()),
        "dataset_from_index": pa.array(starts, type=pa.int64()),
        "dataset_to_index": pa.array(starts + np.asarray(lengths, dtype=np.int64), type=pa.int64()),
        "meta/episodes/chunk_index": pa.array([0] * len(episodes), type=pa.int64()),
        "meta/episodes/file_index": pa.array([0] * len(episodes), type=pa.int64()),
    })
    features: dict[str, Any] = {
        STATE_KEY: {"dtype": "float32", "shape": [obs_dim], "names": state_names},
        ACTION_KEY: {"dtype": "float32", "shape": [act_dim], "names": action_names},
    }
    for key, dtype in INDEX_FEATURES.items():
        features[key] = {"dtype": dtype, "shape": [1], "names": None}
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": n,
        "total_tasks": len(task_ids),
        "chunks_size": DEFAULT_CHUNK_SIZE,
        "data_files_size_in_mb": DEFAULT_DATA_FILE_SIZE_IN_MB,
        "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": DATA_PATH,
        "video_path": None,
        "features": features,
    }
    stats = {STATE_KEY: _stats(obs), ACTION_KEY: _stats(act),
             "timestamp": _stats(timestamp[:, None]), "frame_index": _stats(frame_index[:, None]),
             "episode_index": _stats(episode_index[:, None]),
             "index": _stats(np.arange(n)[:, None]), "task_index": _stats(task_index[:, None])}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        data_file = tmp / DATA_PATH.format(chunk_index=0, file_index=0)
        ep_file = tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)
        data_file.parent.mkdir(parents=True)
        ep_file.parent.mkdir(parents=True)
        pq.write_table(frames, data_file)
        pq.write_table(ep_rows, ep_file)
        pq.write_table(_tasks_table(pa, list(task_ids)), tmp / TASKS_PATH)
        (tmp / INFO_PATH).write_text(json.dumps(info, indent=4) + "\n")
        (tmp / STATS_PATH).write_text(json.dumps(stats, indent=4) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DemosError(f"{where}: cannot write dataset: {e.strerror or e}") from None
    return path


# ----------------------------------------------------------------------------- reading

def _load_info(root: Path, where: str) -> dict:
    if not root.exists():
        raise DemosError(f"{where}: no such directory")
    if not root.is_dir():
        raise DemosError(f"{where}: not a directory (a LeRobot dataset is a directory)")
    info_file = root / INFO_PATH
    if not info_file.is_file():
        raise DemosError(f"{where}: not a LeRobot v3 dataset (meta/info.json missing)")
    try:
        info = json.loads(info_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DemosError(f"{where}: meta/info.json is not valid JSON ({e})".replace("\n", " ")) from None
    if not isinstance(info, dict):
        raise DemosError(f"{where}: meta/info.json is not a JSON object")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        hint = (" (convert it with lerobot's convert_dataset_v21_to_v30)"
                if version.startswith("v2") else "")
        raise DemosError(f"{where}: codebase_version {version or 'missing'}, expected v3.x{hint}")
    return info


def _feature(info: dict, key: str, where: str) -> tuple[int, str]:
    features = info.get("features")
    if not isinstance(features, dict):
        raise DemosError(f"{where}: meta/info.json has no 'features'")
    ft = features.get(key)
    if not isinstance(ft, dict):
        raise DemosError(f"{where}: meta/info.json lists no '{key}' feature")
    dtype, shape = ft.get("dtype"), ft.get("shape")
    if dtype not in _FLOAT_DTYPES:
        raise DemosError(f"{where}: feature '{key}' has dtype {dtype!r}, expected a float type")
    if (not isinstance(shape, (list, tuple)) or len(shape) != 1 or not isinstance(shape[0], int)
            or shape[0] <= 0):
        raise DemosError(f"{where}: feature '{key}' has shape {shape!r}, expected [D]")
    return int(shape[0]), dtype


def _read_parquet(pq, root: Path, file: Path, where: str):
    if not file.is_file():  # a pipe or a device named *.parquet would block or never end
        raise DemosError(f"{where}: {file.relative_to(root).as_posix()} is not a regular file")
    try:
        return pq.read_table(file)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, KeyError... for bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        rel = file.relative_to(root).as_posix()
        raise DemosError(f"{where}: {rel} is not a readable parquet file ({msg})") from None


def _column_2d(pa, table, key: str, width: int, where: str, rel: str) -> np.ndarray:
    """A list or fixed_size_list column as an (N, width) float32 array."""
    col = table.column(key).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size != width:
            raise DemosError(f"{where}: {rel}: '{key}' has width {col.type.list_size}, "
                             f"meta/info.json says {width}")
        if col.null_count:
            raise DemosError(f"{where}: {rel}: '{key}' has missing values")
        values = col.flatten()
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        if col.null_count:
            raise DemosError(f"{where}: {rel}: '{key}' has missing values")
        lens = np.asarray(col.value_lengths())
        if lens.size and (lens != width).any():
            bad = int(lens[lens != width][0])
            raise DemosError(f"{where}: {rel}: a frame's '{key}' has {bad} values, "
                             f"meta/info.json says {width}")
        values = col.flatten()
    else:
        raise DemosError(f"{where}: {rel}: '{key}' is {col.type}, expected a list of floats")
    if values.null_count:
        raise DemosError(f"{where}: {rel}: '{key}' has missing values")
    if not pa.types.is_floating(values.type):
        raise DemosError(f"{where}: {rel}: '{key}' holds {values.type}, expected floats")
    arr = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return arr.reshape(len(col), width)


def _int_column(table, key: str, where: str, rel: str) -> np.ndarray:
    if key not in table.column_names:
        raise DemosError(f"{where}: {rel}: column '{key}' missing")
    col = table.column(key)
    if col.null_count:
        raise DemosError(f"{where}: {rel}: column '{key}' has missing values")
    try:
        return col.to_numpy().astype(np.int64, copy=False)
    except Exception:
        raise DemosError(f"{where}: {rel}: column '{key}' is {col.type}, expected integers") from None


def _load_tasks(pq, root: Path, where: str) -> dict[int, str]:
    f = root / TASKS_PATH
    if not f.is_file():
        raise DemosError(f"{where}: meta/tasks.parquet missing")
    table = _read_parquet(pq, root, f, where)
    names = table.column_names
    # pandas stores the index (the task string) as a named column or as __index_level_0__.
    key = next((k for k in ("task", "__index_level_0__") if k in names), None)
    if key is None and table.schema.metadata and b"pandas" in table.schema.metadata:
        try:
            idx = json.loads(table.schema.metadata[b"pandas"]).get("index_columns", [])
            key = next((k for k in idx if isinstance(k, str) and k in names), None)
        except (ValueError, AttributeError):
            key = None
    if key is None or "task_index" not in names:
        raise DemosError(f"{where}: meta/tasks.parquet has no task strings and task_index column")
    tasks = _int_column(table, "task_index", where, TASKS_PATH).tolist()
    strings = table.column(key).to_pylist()
    out = {int(i): str(s) for i, s in zip(tasks, strings)}
    if len(out) != len(tasks):
        raise DemosError(f"{where}: meta/tasks.parquet repeats a task_index")
    return out


def _load_episodes(pa, pq, root: Path, where: str):
    files = sorted((root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))
    if not files:
        raise DemosError(f"{where}: no parquet files under meta/episodes/")
    tables = []
    for f in files:
        t = _read_parquet(pq, root, f, where)
        keep = [c for c in t.column_names if not c.startswith("stats/")]
        tables.append(t.select(keep))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except Exception as e:
        raise DemosError(f"{where}: meta/episodes files disagree: {str(e).splitlines()[0]}") from None
    rel = EPISODES_DIR
    out = {k: _int_column(table, k, where, rel) for k in
           ("episode_index", "length", "dataset_from_index", "dataset_to_index")}
    for k in ("data/chunk_index", "data/file_index"):
        out[k] = (_int_column(table, k, where, rel) if k in table.column_names
                  else np.zeros(table.num_rows, dtype=np.int64))
    order = np.argsort(out["episode_index"], kind="stable")
    return {k: v[order] for k, v in out.items()}


_FORMAT_SPEC = re.compile(r"^(?:0?\d{0,2}d?)?$")  # "", "03d": what LeRobot's templates use


def _data_template(info: dict, where: str) -> str:
    """meta/info.json's data_path: only {chunk_index} and {file_index} with a small width, and a
    relative path that stays inside the dataset (a hand-edited one could read any file)."""
    template = info.get("data_path") or DATA_PATH
    if not isinstance(template, str):
        raise DemosError(f"{where}: meta/info.json has a data_path that is not a string")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:
        fields = [("", "", None)]
    if any(f not in ("chunk_index", "file_index") or conv or not _FORMAT_SPEC.match(spec or "")
           for f, spec, conv in fields):
        raise DemosError(f"{where}: meta/info.json data_path {show(template)} is not a chunk/file template")
    rel = PurePosixPath(template.format(chunk_index=0, file_index=0))
    if rel.is_absolute() or ".." in rel.parts or "\\" in template:
        raise DemosError(f"{where}: meta/info.json data_path {show(template)} points outside the dataset")
    return template


def read_demos(path) -> DemoSet:
    """Read a LeRobot v3 dataset's observation.state, action, task and episode of every frame.

    Every inconsistency a hand-edited or half-copied dataset can have is reported in one line:
    a trainer fed misaligned frames would learn nonsense silently.
    """
    pa, pq = _pa()
    root = Path(path)
    where = str(path)
    info = _load_info(root, where)
    obs_dim, _ = _feature(info, STATE_KEY, where)
    act_dim, _ = _feature(info, ACTION_KEY, where)
    fps = info.get("fps")
    if isinstance(fps, float) and fps.is_integer():
        fps = int(fps)
    if not isinstance(fps, int) or isinstance(fps, bool) or fps <= 0:
        raise DemosError(f"{where}: meta/info.json has fps {fps!r}, expected a positive integer")
    data_template = _data_template(info, where)

    all_data = sorted((root / DATA_DIR).glob("chunk-*/*.parquet")) if (root / DATA_DIR).is_dir() else []
    if not all_data:
        raise DemosError(f"{where}: no parquet files under data/")
    tasks = _load_tasks(pq, root, where)
    eps = _load_episodes(pa, pq, root, where)
    if eps["episode_index"].size == 0:
        raise DemosError(f"{where}: the dataset has no episodes")

    # Read the data files the episodes point at, in order.
    refs = sorted(set(zip(eps["data/chunk_index"].tolist(), eps["data/file_index"].tolist())))
    obs_parts, act_parts, ep_parts, task_parts, idx_parts = [], [], [], [], []
    needed = [STATE_KEY, ACTION_KEY, "episode_index", "task_index", "index"]
    for chunk, file in refs:
        try:
            rel = data_template.format(chunk_index=chunk, file_index=file)
        except (KeyError, IndexError, ValueError):
            raise DemosError(f"{where}: meta/info.json data_path {data_template!r} is not a "
                             "chunk/file template") from None
        f = root / rel
        if not f.is_file():
            raise DemosError(f"{where}: {rel} missing (meta/episodes points at it)")
        table = _read_parquet(pq, root, f, where)
        missing = [k for k in needed if k not in table.column_names]
        if missing:
            raise DemosError(f"{where}: {rel}: column '{missing[0]}' missing")
        obs_parts.append(_column_2d(pa, table, STATE_KEY, obs_dim, where, rel))
        act_parts.append(_column_2d(pa, table, ACTION_KEY, act_dim, where, rel))
        ep_parts.append(_int_column(table, "episode_index", where, rel))
        task_parts.append(_int_column(table, "task_index", where, rel))
        idx_parts.append(_int_column(table, "index", where, rel))
    obs = np.concatenate(obs_parts)
    action = np.concatenate(act_parts)
    episode_index = np.concatenate(ep_parts)
    task_index = np.concatenate(task_parts)
    index = np.concatenate(idx_parts)

    # Frames in global order, then check them against the episode table.
    order = np.argsort(index, kind="stable")
    if not (order == np.arange(order.size)).all():
        obs, action, episode_index, task_index, index = (
            obs[order], action[order], episode_index[order], task_index[order], index[order])
    n = obs.shape[0]
    total = info.get("total_frames")
    if isinstance(total, int) and total != n:
        raise DemosError(f"{where}: meta/info.json says {total} frames, data/ holds {n}")
    lengths = eps["length"]
    if int(lengths.sum()) != n:
        raise DemosError(f"{where}: episode lengths add up to {int(lengths.sum())} frames, "
                         f"data/ holds {n}")
    if (eps["dataset_to_index"] - eps["dataset_from_index"] != lengths).any():
        bad = int(eps["episode_index"][eps["dataset_to_index"] - eps["dataset_from_index"] != lengths][0])
        raise DemosError(f"{where}: episode {bad}: dataset_to_index - dataset_from_index "
                         "differs from its length")
    counts = {int(e): int(c) for e, c in zip(*np.unique(episode_index, return_counts=True))}
    for e, length in zip(eps["episode_index"].tolist(), lengths.tolist()):
        if counts.get(e, 0) != length:
            raise DemosError(f"{where}: episode {e}: meta/episodes says {length} frames, "
                             f"data/ holds {counts.get(e, 0)}")
    if set(counts) != set(eps["episode_index"].tolist()):
        extra = sorted(set(counts) - set(eps["episode_index"].tolist()))[0]
        raise DemosError(f"{where}: data/ has frames of episode {extra}, which meta/episodes lacks")
    if episode_index.size and (np.diff(episode_index) != 0).sum() + 1 != len(counts):
        raise DemosError(f"{where}: an episode's frames are not contiguous in data/")
    unknown = set(np.unique(task_index).tolist()) - set(tasks)
    if unknown:
        raise DemosError(f"{where}: frames use task_index {sorted(unknown)[0]}, "
                         "which meta/tasks.parquet lacks")
    if not (np.isfinite(obs).all() and np.isfinite(action).all()):
        raise DemosError(f"{where}: observation.state or action contains NaN or Inf")
    return DemoSet(root=root, obs=obs, action=action, task_index=task_index,
                   episode_index=episode_index, tasks=tasks, fps=fps)


# ----------------------------------------------------------------------------- provenance

_BLOCK = 1 << 20


def demos_digest(path) -> str:
    """xxh3-128 of the dataset's files: each file's relative POSIX path, size and bytes, in path
    order. Any byte, rename, addition or removal changes it; where the directory lives does not.
    Streamed, so a large dataset never sits in memory."""
    root = Path(path)
    if not root.is_dir():
        raise DemosError(f"{path}: no such dataset directory")
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            files.append((p.relative_to(root).as_posix(), p))
    files.sort(key=lambda x: x[0].encode())
    h = xxhash.xxh3_128()
    try:
        for rel, p in files:
            info = p.stat()
            if not stat.S_ISREG(info.st_mode):  # a pipe or /dev/zero would never end
                raise DemosError(f"{path}: {rel} is not a regular file")
            raw = rel.encode()
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
            h.update(info.st_size.to_bytes(8, "little"))
            with open(p, "rb") as fh:
                while block := fh.read(_BLOCK):
                    h.update(block)
    except OSError as e:
        raise DemosError(f"{path}: cannot read {e.filename}: {e.strerror}") from None
    return h.hexdigest()


def _git(cwd: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _dvc_out_hash(out: dict) -> str | None:
    for key in ("md5", "etag", "checksum"):
        v = out.get(key)
        if isinstance(v, str) and v:
            return v
    return None


def _from_dvc_file(target: Path) -> str | None:
    """`<target>.dvc` (written by `dvc add target`) whose out is `target`."""
    import yaml

    f = target.parent / (target.name + ".dvc")
    if not f.is_file():
        return None
    doc = yaml.safe_load(f.read_text())
    for out in (doc or {}).get("outs") or []:
        if isinstance(out, dict) and (target.parent / str(out.get("path", ""))).resolve() == target:
            return _dvc_out_hash(out)
    return None


def _from_dvc_lock(lock: Path, target: Path) -> str | None:
    """An out of a pipeline stage in dvc.lock (paths relative to the stage's working directory)."""
    import yaml

    doc = yaml.safe_load(lock.read_text()) or {}
    for stage in (doc.get("stages") or {}).values():
        if not isinstance(stage, dict):
            continue
        wdir = lock.parent / str(stage.get("wdir", "."))
        for out in stage.get("outs") or []:
            if isinstance(out, dict) and (wdir / str(out.get("path", ""))).resolve() == target:
                return _dvc_out_hash(out)
    return None


def dvc_info(path) -> dict:
    """{"dvc_hash", "git_rev"} when the demos (or a directory holding them) are DVC-tracked, else {}.

    Looks for `<dir>.dvc` next to the dataset or any ancestor, then for dvc.lock pipeline outs,
    up to the enclosing git repository's top. Provenance is best effort: it never raises.
    """
    try:
        target = Path(path).resolve()
        if not target.exists():
            return {}
        start = target if target.is_dir() else target.parent
        top = _git(start, "rev-parse", "--show-toplevel")
        top_path = Path(top).resolve() if top else None
        # The dataset and its ancestors, up to the repository's top (or the filesystem's).
        chain = []
        for cand in (target, *target.parents):
            chain.append(cand)
            if cand == top_path:
                break
        dvc_hash = None
        for cand in chain:  # `dvc add` of the dataset, or of a directory holding it
            dvc_hash = _from_dvc_file(cand)
            if dvc_hash:
                break
        if dvc_hash is None:  # a pipeline stage's out in the nearest dvc.lock that names one
            for d in chain[1:] if target.is_dir() else chain:
                lock = d / "dvc.lock"
                if not lock.is_file():
                    continue
                for cand in chain:
                    if cand == d:
                        break
                    dvc_hash = _from_dvc_lock(lock, cand)
                    if dvc_hash:
                        break
                if dvc_hash:
                    break
        if not dvc_hash:
            return {}
        return {"dvc_hash": dvc_hash, "git_rev": _git(start, "rev-parse", "HEAD")}
    except Exception:  # provenance must never break add-skill
        return {}


__all__ = [
    "CODEBASE_VERSION", "DemoSet", "DemosError", "read_demos", "write_demos", "demos_digest",
    "dvc_info",
]
