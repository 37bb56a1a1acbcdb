"""OGBench dataset files: deterministic atomic writes, validation, and loading for training.

Raw files are OGBench's own format (`np.savez_compressed`-compatible zip of `.npy` arrays):
observations f32 (N, obs_dim), actions f32 (N, act_dim), terminals bool (N,), qpos f32, qvel f32 and, for
environments with buttons (puzzle, scene), button_states int64. Episodes are consecutive rows; `terminals` is True on
each episode's last row.

Training data (what the algorithm core consumes) is a dict of numpy arrays built with OGBench's own loader and
singletask relabelling (each episode's last raw row is dropped and becomes the previous row's next observation):
observations f32 (N, obs_dim), actions f32 (N, act_dim), rewards f32 (N,), masks f32 (N,) = 1 - task success,
terminals f32 (N,) = 1.0 on each episode's last transition, next_observations f32 (N, obs_dim).

`load_behaviour_data` is the same without a task (rewards 0, masks 1), for what reads no reward: the BC prior and
the reversal cache, built once per dataset for all of its tasks.

Large datasets (`*-100m-v0`) are folders of 1M-transition files `<stem>-NNN.npz` / `<stem>-NNN-val.npz`; training loads them one file at a time
(`load_training_data` per file).
"""

from __future__ import annotations

import math
import re
import struct
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.files import atomic_path
from stages.core.ogbench_names import large_dataset_stem

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


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays as a compressed .npz like `np.savez_compressed` (zlib's default level), but atomically (temp file,
    fsync, rename) and deterministically (fixed member order, timestamps and attributes: identical arrays give
    identical bytes). Object arrays are refused."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for key, array in arrays.items():
            member = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            member.create_system = 3
            with archive.open(member, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)


# ---------------------------------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------------------------------


_NPZ_KINDS = "biufc"  # bool, integers, floats, complex: plain arrays only (no objects, strings, records)
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this: a member claiming more lies about its size
_READ_CHUNK = 1 << 24
_DESCRIPTOR_SIZES = (0, 12, 16, 20, 24)  # optional data descriptor after a member's data (zip / zip64, signed)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_zip_layout(path: Path, archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The members of an npz, checked before any is read: names, compression, and sizes that the file can hold.
    Members must tile the file up to the central directory, so a damaged directory cannot hide one."""
    size = path.stat().st_size
    infos = sorted(archive.infolist(), key=lambda info: info.header_offset)
    names: set[str] = set()
    end = 0
    with open(path, "rb") as raw:
        for info in infos:
            name = info.filename
            if not name.endswith(".npy") or "/" in name or name in names:
                problem = "duplicate" if name in names else "not an .npy array"
                raise DatasetFileError(f"{path}: corrupt npz file (member {name!r}: {problem})")
            names.add(name)
            if info.flag_bits & 0x1:
                raise DatasetFileError(f"{path}: corrupt npz file (member {name}: marked encrypted)")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise DatasetFileError(
                    f"{path}: corrupt npz file (member {name}: compression method {info.compress_type})"
                )
            limit = info.compress_size * (_DEFLATE_MAX_RATIO if info.compress_type else 1) + 1024
            if info.file_size > limit:
                raise DatasetFileError(
                    f"{path}: corrupt npz file (member {name} claims {info.file_size} bytes from "
                    f"{info.compress_size} stored bytes)"
                )
            if info.header_offset not in [end + extra for extra in _DESCRIPTOR_SIZES]:
                raise DatasetFileError(
                    f"{path}: corrupt npz file (member {name} at byte {info.header_offset}, expected {end})"
                )
            raw.seek(info.header_offset)
            header = raw.read(zipfile.sizeFileHeader)
            if len(header) != zipfile.sizeFileHeader:
                raise DatasetFileError(f"{path}: truncated or corrupt npz file (member {name} header)")
            fields = struct.unpack(zipfile.structFileHeader, header)
            end = (info.header_offset + zipfile.sizeFileHeader + fields[zipfile._FH_FILENAME_LENGTH]
                   + fields[zipfile._FH_EXTRA_FIELD_LENGTH] + info.compress_size)
            if end > size:
                raise DatasetFileError(f"{path}: truncated or corrupt npz file (member {name} ends past the file)")
    if archive.start_dir not in [end + extra for extra in _DESCRIPTOR_SIZES]:
        raise DatasetFileError(
            f"{path}: corrupt npz file (the zip directory starts at byte {archive.start_dir}, the members end at "
            f"{end})"
        )
    return infos


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy member: header checked against the member's size before anything is allocated; CRC checked."""
    name = info.filename
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"{name}: npy format version {version} not supported")
        if dtype.hasobject:
            raise ValueError(f"{name}: object arrays need allow_pickle, which is never used")
        if dtype.kind not in _NPZ_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise ValueError(f"{name}: dtype {dtype} not supported (plain numeric arrays only)")
        header_bytes = stream.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        if header_bytes + nbytes != info.file_size:
            raise ValueError(
                f"{name}: header says {dtype}{list(shape)} ({nbytes} bytes) but the member holds "
                f"{info.file_size - header_bytes} data bytes"
            )
        array = np.empty(math.prod(shape), dtype=dtype)
        view = memoryview(array).cast("B") if nbytes else memoryview(b"")
        at = 0
        while at < nbytes:
            chunk = stream.read(min(_READ_CHUNK, nbytes - at))
            if not chunk:
                raise EOFError(f"{name}: data ends after {at} of {nbytes} bytes")
            view[at:at + len(chunk)] = chunk
            at += len(chunk)
        if stream.read(1):
            raise ValueError(f"{name}: data continues past the {nbytes} bytes its header gives")
    if fortran_order:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, fully read (zip CRCs checked); never unpickles. DatasetFileError on a missing,
    truncated, corrupt or pickled file. Every size a header gives is checked against what the file can hold before
    memory is allocated for it, so a damaged header cannot ask for more memory than the file could expand to."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(f"{path}: file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = _check_zip_layout(path, archive)
            arrays = {}
            for info in infos:
                try:
                    arrays[info.filename[: -len(".npy")]] = _read_member(path, archive, info)
                except (ValueError, tokenize.TokenError, SyntaxError, RecursionError) as exc:
                    raise DatasetFileError(f"{path}: unreadable array ({_one_line(exc)})") from None
            return arrays
    except DatasetFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError, NotImplementedError,
            RuntimeError, UnicodeDecodeError, struct.error, OverflowError, ValueError) as exc:
        # zipfile reports damage as any of these (bad CRC, unsupported method/version/flags, bad names, sizes)
        raise DatasetFileError(f"{path}: truncated or corrupt npz file ({_one_line(exc)})") from None


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

    if np.ndim(arrays["terminals"]) != 1:
        raise ValueError(f"terminals: shape {np.shape(arrays['terminals'])}, expected (N,)")
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


def dataset_files(folder: str | Path, dataset: str) -> list[tuple[Path, Path]]:
    """(train, val) path pairs of a dataset in its own folder: one pair for a 1M dataset (`<folder>/<dataset>.npz`),
    the sorted pairs `<folder>/<stem>-NNN.npz` for a large one. DatasetFileError when a file is missing."""
    folder = Path(folder)
    stem = large_dataset_stem(dataset)
    if stem is None:
        pairs = [(folder / f"{dataset}.npz", folder / f"{dataset}-val.npz")]
    else:
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


def _space_dim(space: Any) -> int | None:
    shape = getattr(space, "shape", None)
    return int(shape[0]) if shape and len(shape) == 1 else None


def _model_size(env: Any, attribute: str) -> int | None:
    """The env's MuJoCo model nq / nv (what OGBench's relabelling indexes qpos with), when it has one."""
    model = getattr(getattr(env, "unwrapped", env), "_model", None)
    value = getattr(model, attribute, None)
    return int(value) if isinstance(value, (int, np.integer)) else None


def sparsify_rewards(rewards: np.ndarray) -> np.ndarray:
    """The reference's sparse reward: r <- -1 * [r != 0]."""
    return -(rewards != 0).astype(np.float32)


def _checked_raw(path: Path, env_name: str, env: Any) -> dict[str, np.ndarray]:
    """OGBench's non-compact loading of one raw file (next_observations added, each episode's last row dropped),
    after a clear error for a missing, corrupt or malformed file (before OGBench's loader sees it)."""
    from ogbench.utils import load_dataset

    arrays = read_npz(path)
    try:
        check_raw_arrays(arrays, obs_dim=_space_dim(env.observation_space),
                         act_dim=_space_dim(env.action_space))
        for key, need in (("qpos", _model_size(env, "nq")), ("qvel", _model_size(env, "nv"))):
            if need is not None and arrays[key].shape[1] < need:
                raise ValueError(f"{key}: dimension {arrays[key].shape[1]}, expected {need} for {env_name}")
    except ValueError as exc:
        raise DatasetFileError(f"{path}: {exc}") from None
    del arrays
    return load_dataset(str(path), compact_dataset=False, add_info=True)


def _training_arrays(raw: Mapping[str, np.ndarray], rewards: np.ndarray,
                     masks: np.ndarray) -> dict[str, np.ndarray]:
    data = {"observations": raw["observations"], "actions": raw["actions"], "rewards": rewards, "masks": masks,
            "terminals": raw["terminals"], "next_observations": raw["next_observations"]}  # fmt: skip
    return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in data.items()}


def load_training_data(
    path: str | Path, env_name: str, *, sparse: bool, env: Any = None
) -> dict[str, np.ndarray]:
    """One raw file as training data (module docstring), relabelled with OGBench's own loader and singletask
    relabelling for `env_name` (e.g. `cube-single-singletask-task2-v0`); `env` reuses an already made env."""
    from ogbench.relabel_utils import relabel_dataset

    env = env if env is not None else make_task_env(env_name)
    raw = _checked_raw(Path(path), env_name, env)
    relabel_dataset(env_name, env, raw)
    rewards = raw["rewards"].astype(np.float32)
    return _training_arrays(raw, sparsify_rewards(rewards) if sparse else rewards, raw["masks"])


def load_behaviour_data(path: str | Path, env_name: str) -> dict[str, np.ndarray]:
    """One raw file as the training data of no task, for what reads only the behaviour (the BC prior and the
    reversal cache: observations, actions and episode ends): OGBench's loader without relabelling, rewards 0 and
    masks 1. ``env_name`` (any singletask env of the dataset, e.g. its default one) checks the file's shapes."""
    raw = _checked_raw(Path(path), env_name, make_task_env(env_name))
    n = raw["observations"].shape[0]
    return _training_arrays(raw, np.zeros(n, np.float32), np.ones(n, np.float32))
