"""OGBench dataset files: deterministic atomic writes, validation, and loading for training.

Raw files are OGBench's own format (`np.savez_compressed`-compatible zip of `.npy` arrays):
observations f32 (N, obs_dim), actions f32 (N, act_dim), terminals bool (N,), qpos f32, qvel f32 and, for
environments with buttons (puzzle, scene), button_states int64. Episodes are consecutive rows; `terminals` is True on
each episode's last row.

Training data (what the algorithm core consumes) is a dict of numpy arrays built with OGBench's own loader and
singletask relabelling (each episode's last raw row is dropped and becomes the previous row's next observation):
observations f32 (N, obs_dim), actions f32 (N, act_dim), rewards f32 (N,), masks f32 (N,) = 1 - task success,
terminals f32 (N,) = 1.0 on each episode's last transition, next_observations f32 (N, obs_dim).

Large datasets (`*-100m-v0`) are folders of 1M-transition files `<stem>-NNN.npz` / `<stem>-NNN-val.npz`;
`iter_training_files` streams them one file at a time.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RAW_DTYPES: dict[str, np.dtype] = {
    "observations": np.dtype(np.float32),
    "actions": np.dtype(np.float32),
    "terminals": np.dtype(bool),
    "qpos": np.dtype(np.float32),
    "qvel": np.dtype(np.float32),
    "button_states": np.dtype(np.int64),
}
RAW_KEYS = (
    "observations",
    "actions",
    "terminals",
    "qpos",
    "qvel",
)  # always present; button_states where buttons
TRAINING_KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same arrays -> same bytes
_SHARD_RE = re.compile(r"-(\d{3})\.npz$")
_LARGE_RE = re.compile(r"^(?P<stem>.+)-(?P<size>\d+[mb])-(?P<version>v\d+)$")


class DatasetFileError(ValueError):
    """A dataset file is missing, unreadable or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class RawSummary:
    """What a valid raw file holds."""

    rows: int
    episodes: int
    obs_dim: int
    act_dim: int
    has_button_states: bool


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def temp_path(path: Path) -> Path:
    """The temporary name a file is written under before its atomic rename."""
    return path.with_name(path.name + ".tmp")


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays as a compressed .npz like `np.savez_compressed` (zlib's default level), but atomically (temp file,
    fsync, rename) and deterministically (fixed member order, timestamps and attributes: identical arrays give
    identical bytes). Object arrays are refused."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
            for key, array in arrays.items():
                member = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                member.compress_type = zipfile.ZIP_DEFLATED
                member.external_attr = 0o644 << 16
                member.create_system = 3
                with archive.open(member, "w", force_zip64=True) as stream:
                    np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------------------------------


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, fully read (zip CRCs checked); never unpickles. DatasetFileError on a missing,
    truncated, corrupt or pickled file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise DatasetFileError(f"{path}: truncated or corrupt npz file ({exc})") from None
    except ValueError as exc:
        raise DatasetFileError(f"{path}: unreadable array ({exc})") from None


def episode_lengths(terminals: np.ndarray) -> np.ndarray:
    """Rows per episode, from the raw `terminals` flags (True on each episode's last row)."""
    ends = np.flatnonzero(terminals)
    return np.diff(np.concatenate([[-1], ends]))


def check_raw_arrays(
    arrays: Mapping[str, np.ndarray],
    *,
    button_states: bool | None = None,
    episode_length: int | None = None,
    obs_dim: int | None = None,
    act_dim: int | None = None,
) -> RawSummary:
    """Check arrays against OGBench's raw format; ValueError naming the first problem. `button_states` True/False
    requires/forbids that key; the other expectations are checked when given."""
    missing = [key for key in RAW_KEYS if key not in arrays]
    if button_states and "button_states" not in arrays:
        missing.append("button_states")
    if missing:
        raise ValueError(f"missing keys: {', '.join(missing)} (has: {', '.join(sorted(arrays))})")
    unknown = sorted(set(arrays) - set(RAW_DTYPES))
    if unknown:
        raise ValueError(f"unexpected keys: {', '.join(unknown)}")
    if button_states is False and "button_states" in arrays:
        raise ValueError("unexpected key button_states: this environment has no buttons")

    rows = len(arrays["terminals"])
    for key, array in arrays.items():
        if array.dtype != RAW_DTYPES[key]:
            raise ValueError(f"{key}: dtype {array.dtype}, expected {RAW_DTYPES[key]}")
        expected_ndim = 1 if key == "terminals" else 2
        if array.ndim != expected_ndim or len(array) != rows or (expected_ndim == 2 and array.shape[1] == 0):
            form = "(N,)" if expected_ndim == 1 else "(N, d) with d > 0"
            raise ValueError(
                f"{key}: shape {array.shape}, expected {form} with N = {rows} rows like terminals"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = np.flatnonzero(~np.isfinite(array).all(axis=-1))
            raise ValueError(f"{key}: {len(bad)} rows with non-finite values (first at row {bad[0]})")
    if rows < 2:
        raise ValueError(f"{rows} rows: a dataset needs at least one episode of two or more rows")
    if np.abs(arrays["actions"]).max() > 1.0:
        raise ValueError("actions: values outside [-1, 1] (OGBench actions are clipped to the action space)")

    terminals = arrays["terminals"]
    if not terminals[-1]:
        raise ValueError(
            "broken episode boundaries: the last row is not an episode end (terminals[-1] is False)"
        )
    lengths = episode_lengths(terminals)
    if lengths.min() < 2:
        first = int(np.flatnonzero(terminals)[np.argmin(lengths)])
        raise ValueError(
            f"broken episode boundaries: a one-row episode ends at row {first} (consecutive terminals)"
        )
    if episode_length is not None and (lengths != episode_length).any():
        index = int(np.flatnonzero(lengths != episode_length)[0])
        raise ValueError(
            f"broken episode boundaries: episode {index} has {lengths[index]} rows, expected {episode_length}"
        )

    summary = RawSummary(
        rows=rows,
        episodes=len(lengths),
        obs_dim=arrays["observations"].shape[1],
        act_dim=arrays["actions"].shape[1],
        has_button_states="button_states" in arrays,
    )
    if obs_dim is not None and summary.obs_dim != obs_dim:
        raise ValueError(
            f"observations: dimension {summary.obs_dim}, expected {obs_dim} for this environment"
        )
    if act_dim is not None and summary.act_dim != act_dim:
        raise ValueError(f"actions: dimension {summary.act_dim}, expected {act_dim} for this environment")
    return summary


def validate_raw_file(path: str | Path, **expectations: Any) -> RawSummary:
    """Read and check one raw OGBench file (see `check_raw_arrays`); DatasetFileError naming the file."""
    arrays = read_npz(path)
    try:
        return check_raw_arrays(arrays, **expectations)
    except ValueError as exc:
        raise DatasetFileError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------------
# File layout of OGBench datasets
# ---------------------------------------------------------------------------------------------------------------------


def large_dataset_stem(dataset: str) -> str | None:
    """`puzzle-4x4-play-100m-v0` -> `puzzle-4x4-play-v0` (the name stem of its files); None for a 1M dataset."""
    match = _LARGE_RE.match(dataset)
    return f"{match['stem']}-{match['version']}" if match else None


def shard_file_names(stem: str, index: int) -> tuple[str, str]:
    """(train, val) file names of one file of a large dataset, as OGBench's server names them."""
    return f"{stem}-{index:03d}.npz", f"{stem}-{index:03d}-val.npz"


def dataset_files(dataset_dir: str | Path, dataset: str) -> list[tuple[Path, Path]]:
    """(train, val) path pairs of a dataset: one pair for a 1M dataset (`<dir>/<dataset>.npz`), the sorted pairs in
    `<dir>/<dataset>/` for a large one. DatasetFileError when a file is missing."""
    dataset_dir = Path(dataset_dir)
    stem = large_dataset_stem(dataset)
    if stem is None:
        pairs = [(dataset_dir / f"{dataset}.npz", dataset_dir / f"{dataset}-val.npz")]
    else:
        folder = dataset_dir / dataset
        trains = sorted(p for p in folder.glob(f"{stem}-*.npz") if _SHARD_RE.search(p.name))
        if not trains:
            raise DatasetFileError(f"{folder}: no files {stem}-NNN.npz of the large dataset {dataset}")
        pairs = [(train, train.with_name(train.name.replace(".npz", "-val.npz"))) for train in trains]
    for pair in pairs:
        for path in pair:
            if not path.is_file():
                raise DatasetFileError(f"{path}: file not found (dataset {dataset})")
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# Loading for training
# ---------------------------------------------------------------------------------------------------------------------


def make_task_env(env_name: str) -> Any:
    """The singletask OGBench environment whose task defines rewards and masks."""
    import gymnasium
    import ogbench  # noqa: F401  (registers the environments)

    # OGBench's envs build float64-bounded Boxes; gymnasium warns about the float32 cast on every new Box.
    warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")
    return gymnasium.make(env_name)


def sparsify_rewards(rewards: np.ndarray) -> np.ndarray:
    """The reference's sparse reward: r <- -1 * [r != 0]."""
    return -(rewards != 0).astype(np.float32)


def load_training_data(
    path: str | Path, env_name: str, *, sparse: bool, env: Any = None
) -> dict[str, np.ndarray]:
    """One raw file as training data (module docstring), relabelled with OGBench's own loader and singletask
    relabelling for `env_name` (e.g. `cube-single-singletask-task2-v0`); `env` reuses an already made env."""
    from ogbench.relabel_utils import relabel_dataset
    from ogbench.utils import load_dataset

    path = Path(path)
    read_npz(path)  # clear error for a missing or corrupt file before OGBench's loader sees it
    raw = load_dataset(str(path), compact_dataset=False, add_info=True)
    relabel_dataset(env_name, env if env is not None else make_task_env(env_name), raw)
    rewards = raw["rewards"].astype(np.float32)
    data = {
        "observations": raw["observations"],
        "actions": raw["actions"],
        "rewards": sparsify_rewards(rewards) if sparse else rewards,
        "masks": raw["masks"],
        "terminals": raw["terminals"],
        "next_observations": raw["next_observations"],
    }
    return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in data.items()}


def iter_training_files(
    paths: Iterable[str | Path], env_name: str, *, sparse: bool, env: Any = None
) -> Iterator[dict[str, np.ndarray]]:
    """Training data file by file (for large datasets): only one file's arrays are alive at a time."""
    env = env if env is not None else make_task_env(env_name)
    for path in paths:
        yield load_training_data(path, env_name, sparse=sparse, env=env)
