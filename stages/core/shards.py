"""The reversal cache: flow-reversed virtual trajectories stored as Parquet shards plus a manifest.

One row per valid chunk start of a training dataset:

- ``row`` int64: the chunk start index in the dataset (strictly increasing over the whole cache);
- ``x`` fixed_size_list<float32>[(F+1)*h*d]: the flow grid x_0 ... x_F, each x_k a flattened chunk of h*d values;
- ``roundtrip_error`` float32: how far the sampler's forward flow from x_0 lands from the dataset chunk.

A cache is one directory: ``part-00000.parquet``, ``part-00001.parquet``, ... (zstd, a fixed number of rows per
shard, the last may be shorter) and ``manifest.json`` (schema version, F, h, d, method, the caller's input hashes, row
counts, each shard's size and sha256).

Writing streams: batches are copied into fixed-size row groups, so memory is bounded by one row group whatever the
number of rows, and the bytes do not depend on how the caller batched its input. The directory is built under a
temporary sibling name and renamed into place at the end, so an interrupted write never leaves a directory that looks
complete. Identical inputs give byte-identical files for a given pyarrow version (recorded in the manifest).

Reading checks the manifest against the files (missing, truncated, altered or extra shards, schema version, row
counts) and against what the caller expects (input hashes, F, h, d, method), and raises :class:`ShardCacheError`
naming the shard or field and the cause. Arrays come out of Arrow without copies where pyarrow allows.

Nothing here knows the project's folder layout: every function takes the cache directory as an argument.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.files import fsync_path, pretty_json, sha256_file

SCHEMA_VERSION = 1
FORMAT_NAME = "rql-reversal-cache"
MANIFEST_NAME = "manifest.json"
METHODS = ("exact", "euler")
DEFAULT_REBUILD_HINT = "rebuild the cache"

_SHARD_RE = re.compile(r"^part-\d{5,}\.parquet$")
_PARTIAL_TAG = ".partial-"


class ShardCacheError(ValueError):
    """A reversal cache is missing, corrupt, or does not match what the caller expects."""


class ShardInfo(NamedTuple):
    """One shard as listed in the manifest."""

    file: str
    rows: int
    first_row: int
    last_row: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a reversal cache."""

    schema_version: int
    F: int
    h: int
    d: int
    method: str
    inputs: dict[str, str]
    total_rows: int
    shard_rows: int
    row_group_rows: int
    shards: tuple[ShardInfo, ...]
    roundtrip_error: dict[str, Any]
    extra: dict[str, Any]
    writer: str

    @property
    def row_width(self) -> int:
        """Number of float32 values per row: (F+1)*h*d."""
        return (self.F + 1) * self.h * self.d


class CacheBatch(NamedTuple):
    """A contiguous block of cache rows, as read from one row group of one shard."""

    shard: str
    rows: np.ndarray  # (n,) int64
    x: np.ndarray  # (n, F+1, h*d) float32
    roundtrip_error: np.ndarray  # (n,) float32


class ReversalCache(NamedTuple):
    """A whole cache in memory."""

    rows: np.ndarray  # (N,) int64
    x: np.ndarray  # (N, F+1, h*d) float32
    roundtrip_error: np.ndarray  # (N,) float32
    manifest: Manifest


# --------------------------------------------------------------------------------------------------------------
# Schema


def row_width(F: int, h: int, d: int) -> int:
    """Number of float32 values in one row's ``x``: the F+1 grid points of an h*d chunk."""
    return (F + 1) * h * d


def cache_schema(F: int, h: int, d: int, method: str) -> pa.Schema:
    """The Arrow schema of a shard, with the schema version and geometry in its key-value metadata."""
    width = row_width(F, h, d)
    fields = [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("x", pa.list_(pa.field("element", pa.float32(), nullable=False), width), nullable=False),
        pa.field("roundtrip_error", pa.float32(), nullable=False),
    ]
    metadata = {
        "rql.format": FORMAT_NAME,
        "rql.schema_version": str(SCHEMA_VERSION),
        "rql.F": str(F),
        "rql.h": str(h),
        "rql.d": str(d),
        "rql.method": method,
    }
    return pa.schema(fields, metadata=metadata)


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``part-00000.parquet``."""
    return f"part-{index:05d}.parquet"


def _validate_geometry(F: int, h: int, d: int, method: str) -> None:
    for name, value in (("F", F), ("h", h), ("d", d)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# --------------------------------------------------------------------------------------------------------------
# Small file helpers


def _manifest_json(obj: Any) -> str:
    return pretty_json(obj, allow_nan=False)


def _one_line(exc: object) -> str:
    """An exception's (or schema's) message on one line (Arrow's messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(target: Path) -> None:
    """Delete temporary siblings of ``target`` (``.name.partial-*``, ``.name.old-*``) of writers no longer running."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(?:partial|old)-(\d+)-[0-9a-f]+$")
    if not target.parent.is_dir():
        return
    for sibling in target.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and sibling.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Writer


class _ShardWriter:
    """Streams rows into fixed-size row groups and shards inside one (temporary) directory."""

    def __init__(
        self,
        directory: Path,
        F: int,
        h: int,
        d: int,
        method: str,
        shard_rows: int,
        row_group_rows: int,
        compression_level: int,
    ) -> None:
        self.directory = directory
        self.width = row_width(F, h, d)
        self.schema = cache_schema(F, h, d, method)
        self.shard_rows = shard_rows
        self.row_group_rows = row_group_rows
        self.compression_level = compression_level
        self.shards: list[ShardInfo] = []
        self.last_row: int | None = None
        self.error_max = -math.inf
        self.error_sum = 0.0
        self.error_finite = 0
        self.error_nonfinite = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_filled = 0
        self._shard_first_row = 0
        self._last_flushed_row = 0
        self._new_buffer()

    # -- buffers ------------------------------------------------------------------------------------------------
    def _capacity(self) -> int:
        """Rows the current row group may hold: row groups never straddle a shard boundary."""
        return min(self.row_group_rows, self.shard_rows - self._shard_filled)

    def _new_buffer(self) -> None:
        cap = self._capacity()
        self._rows = np.empty(cap, np.int64)
        self._x = np.empty((cap, self.width), np.float32)
        self._err = np.empty(cap, np.float32)
        self._filled = 0

    # -- input --------------------------------------------------------------------------------------------------
    def add(self, rows: np.ndarray, x: np.ndarray, errors: np.ndarray) -> int:
        """Append one batch; returns its number of rows."""
        rows, x, errors = self._check_batch(rows, x, errors)
        n = rows.shape[0]
        start = 0
        while start < n:
            take = min(n - start, self._rows.shape[0] - self._filled)
            end = start + take
            sl = slice(self._filled, self._filled + take)
            self._rows[sl] = rows[start:end]
            self._x[sl] = x[start:end]
            self._err[sl] = errors[start:end]
            self._filled += take
            start = end
            if self._filled == self._rows.shape[0]:
                self._flush_row_group()
        return n

    def _check_batch(self, rows: Any, x: Any, errors: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = np.asarray(rows)
        errors = np.asarray(errors, dtype=np.float32)
        x = np.asarray(x, dtype=np.float32)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(
                f"row indices must be a 1-D integer array, got shape {rows.shape} dtype {rows.dtype}"
            )
        n = rows.shape[0]
        if errors.shape != (n,):
            raise ValueError(f"roundtrip errors must have shape ({n},), got {errors.shape}")
        if x.shape[:1] != (n,) or math.prod(x.shape[1:]) != self.width:
            raise ValueError(
                f"x must have shape ({n}, F+1, h*d) with (F+1)*h*d = {self.width} values per row, got {x.shape}"
            )
        x = x.reshape(n, self.width)
        rows = rows.astype(np.int64, copy=False)
        if n:
            previous = self.last_row
            if (previous is not None and rows[0] <= previous) or np.any(np.diff(rows) <= 0):
                raise ValueError(
                    f"row indices must be strictly increasing across all batches "
                    f"(previous last row {previous}, this batch starts at {int(rows[0])})"
                )
            self.last_row = int(rows[-1])
        return rows, x, errors

    # -- output -------------------------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        path = self.directory / shard_name(len(self.shards))
        self._writer = pq.ParquetWriter(
            path,
            self.schema,
            version="2.6",
            compression="zstd",
            compression_level=self.compression_level,
            use_dictionary=False,
            use_byte_stream_split=["x.list.element", "roundtrip_error"],
            write_statistics=["row"],
            data_page_version="1.0",
            write_page_checksum=True,
            store_schema=True,
        )
        self._shard_filled = 0
        self._shard_first_row = int(self._rows[0])

    def _flush_row_group(self) -> None:
        n = self._filled
        if n == 0:
            return
        if self._writer is None:
            self._open_shard()
        rows, x, err = self._rows[:n], self._x[:n], self._err[:n]
        table = pa.Table.from_arrays(
            [
                pa.array(rows),
                pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), self.width),
                pa.array(err),
            ],
            schema=self.schema,
        )
        assert self._writer is not None
        self._writer.write_table(table, row_group_size=n)
        self._accumulate_errors(err)
        self._shard_filled += n
        last_row = int(rows[-1])
        if self._shard_filled == self.shard_rows:
            self._close_shard(last_row)
        self._last_flushed_row = last_row
        self._new_buffer()

    def _accumulate_errors(self, err: np.ndarray) -> None:
        finite = np.isfinite(err)
        count = int(finite.sum())
        self.error_nonfinite += err.shape[0] - count
        if count:
            values = err[finite].astype(np.float64)
            self.error_sum += float(values.sum())
            self.error_max = max(self.error_max, float(values.max()))
            self.error_finite += count

    def _close_shard(self, last_row: int) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        path = self.directory / shard_name(len(self.shards))
        fsync_path(path)
        self.shards.append(
            ShardInfo(
                file=path.name,
                rows=self._shard_filled,
                first_row=self._shard_first_row,
                last_row=last_row,
                bytes=path.stat().st_size,
                sha256=sha256_file(path),
            )
        )
        self._shard_filled = 0

    def finish(self) -> None:
        """Flush the partial row group and close the last (possibly shorter) shard."""
        self._flush_row_group()
        if self._writer is not None:
            self._close_shard(self._last_flushed_row)

    def abort(self) -> None:
        """Close an open Parquet writer without caring about its output."""
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the directory is discarded anyway
                self._writer.close()
            self._writer = None


def write_cache(
    directory: str | os.PathLike[str],
    batches: Iterable[tuple[Any, Any, Any]],
    *,
    F: int,
    h: int,
    d: int,
    method: str,
    inputs: Mapping[str, str],
    shard_rows: int,
    row_group_rows: int = 16384,
    compression_level: int = 1,
    extra: Mapping[str, Any] | None = None,
    progress: bool | Callable[[int], None] = False,
    total_rows: int | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Stream ``batches`` of ``(row_indices (B,), x (B, F+1, h*d), roundtrip_errors (B,))`` into a cache directory.

    Rows must be strictly increasing over the whole stream. Shards hold exactly ``shard_rows`` rows (the last may
    be shorter) in row groups of at most ``row_group_rows``; memory stays bounded by one row group plus the
    caller's batch. ``inputs`` maps names to hashes of what the cache was computed from (for instance
    ``{"dataset": sha256, "prior": sha256}``); ``extra`` is any further JSON-able provenance (reversal iterations,
    tolerance...). ``progress`` is ``True`` for a tqdm bar (``total_rows`` sizes it) or a callable receiving the
    number of rows of each batch.

    The files are written into a temporary sibling directory, fsynced, and renamed to ``directory`` last, so an
    interrupted write never leaves a complete-looking cache. An existing ``directory`` raises
    ``FileExistsError`` unless ``overwrite`` is set. Returns the manifest.
    """
    _validate_geometry(F, h, d, method)
    if shard_rows < 1 or row_group_rows < 1:
        raise ValueError(f"shard_rows and row_group_rows must be >= 1, got {shard_rows} and {row_group_rows}")
    inputs = _check_inputs(inputs)
    extra_dict = json.loads(_manifest_json(dict(extra or {})))
    target = Path(directory).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"reversal cache {target} already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    partial = target.parent / f".{target.name}{_PARTIAL_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    partial.mkdir()

    callback, bar = _progress_callback(progress, total_rows)
    writer = _ShardWriter(
        partial, F, h, d, method, shard_rows, min(row_group_rows, shard_rows), compression_level
    )
    try:
        for rows, x, errors in batches:
            callback(writer.add(rows, x, errors))
        writer.finish()
        manifest = _build_manifest(writer, F, h, d, method, inputs, extra_dict)
        manifest_path = partial / MANIFEST_NAME
        manifest_path.write_text(_manifest_json(_manifest_to_json(manifest)), encoding="utf-8")
        fsync_path(manifest_path)
        fsync_path(partial)
        _replace_directory(partial, target)
    except BaseException:
        writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return manifest


def _check_inputs(inputs: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in inputs.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"inputs must map str names to str hashes, got {key!r}: {value!r}")
        out[key] = value
    return dict(sorted(out.items()))


def _progress_callback(
    progress: bool | Callable[[int], None], total_rows: int | None
) -> tuple[Callable[[int], None], Any]:
    if callable(progress):
        return progress, None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_rows, unit="rows", unit_scale=True, desc="reversal cache")
        return bar.update, bar
    return (lambda _n: None), None


def _build_manifest(
    writer: _ShardWriter,
    F: int,
    h: int,
    d: int,
    method: str,
    inputs: dict[str, str],
    extra: dict[str, Any],
) -> Manifest:
    finite = writer.error_finite
    error_stats = {
        "max": writer.error_max if finite else None,
        "mean": writer.error_sum / finite if finite else None,
        "nonfinite": writer.error_nonfinite,
    }
    return Manifest(
        schema_version=SCHEMA_VERSION,
        F=int(F),
        h=int(h),
        d=int(d),
        method=method,
        inputs=inputs,
        total_rows=sum(s.rows for s in writer.shards),
        shard_rows=writer.shard_rows,
        row_group_rows=writer.row_group_rows,
        shards=tuple(writer.shards),
        roundtrip_error=error_stats,
        extra=extra,
        writer=f"pyarrow {pa.__version__}",
    )


def _manifest_to_json(manifest: Manifest) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "schema_version": manifest.schema_version,
        "F": manifest.F,
        "h": manifest.h,
        "d": manifest.d,
        "method": manifest.method,
        "row_width": manifest.row_width,
        "inputs": manifest.inputs,
        "total_rows": manifest.total_rows,
        "shard_rows": manifest.shard_rows,
        "row_group_rows": manifest.row_group_rows,
        "compression": "zstd",
        "writer": manifest.writer,
        "roundtrip_error": manifest.roundtrip_error,
        "extra": manifest.extra,
        "shards": [s._asdict() for s in manifest.shards],
    }


def _replace_directory(partial: Path, target: Path) -> None:
    """Rename ``partial`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    old: Path | None = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
    os.rename(partial, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Manifest reading and verification


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Parse and structurally validate ``manifest.json`` of a cache directory (no shard is opened)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ShardCacheError(f"reversal cache {directory} does not exist (or is not a directory)")
    if not path.is_file():
        raise ShardCacheError(f"reversal cache {directory} has no {MANIFEST_NAME}: incomplete or not a cache")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, or an integer literal beyond Python's digit limit; RecursionError: nesting
        raise ShardCacheError(f"{path}: unreadable manifest ({_one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ShardCacheError(f"{path}: not a {FORMAT_NAME} manifest (a JSON {type(raw).__name__}, not an object)")
    if raw.get("format") != FORMAT_NAME:
        raise ShardCacheError(f"{path}: not a {FORMAT_NAME} manifest (format={raw.get('format')!r})")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardCacheError(
            f"{path}: schema version {version!r} != supported {SCHEMA_VERSION}: rebuild the cache with this code"
        )
    try:
        shards = tuple(
            ShardInfo(
                file=str(s["file"]),
                rows=int(s["rows"]),
                first_row=int(s["first_row"]),
                last_row=int(s["last_row"]),
                bytes=int(s["bytes"]),
                sha256=str(s["sha256"]),
            )
            for s in raw["shards"]
        )
        manifest = Manifest(
            schema_version=int(version),
            F=int(raw["F"]),
            h=int(raw["h"]),
            d=int(raw["d"]),
            method=str(raw["method"]),
            inputs={str(k): str(v) for k, v in dict(raw["inputs"]).items()},
            total_rows=int(raw["total_rows"]),
            shard_rows=int(raw["shard_rows"]),
            row_group_rows=int(raw["row_group_rows"]),
            shards=shards,
            roundtrip_error=dict(raw.get("roundtrip_error") or {}),
            extra=dict(raw.get("extra") or {}),
            writer=str(raw.get("writer", "")),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ShardCacheError(f"{path}: malformed manifest ({type(exc).__name__}: {_one_line(exc)})") from None
    _check_manifest_consistency(path, manifest)
    return manifest


def _check_manifest_consistency(path: Path, m: Manifest) -> None:
    for name in ("F", "h", "d", "shard_rows", "row_group_rows"):
        if getattr(m, name) < 1:
            raise ShardCacheError(f"{path}: {name} {getattr(m, name)} is not a positive count")
    if m.method not in METHODS:
        raise ShardCacheError(f"{path}: method {m.method!r} is not one of {METHODS}")
    if sum(s.rows for s in m.shards) != m.total_rows:
        raise ShardCacheError(
            f"{path}: total_rows {m.total_rows} != sum of shard rows {sum(s.rows for s in m.shards)}"
        )
    for i, s in enumerate(m.shards):
        if s.file != shard_name(i):
            raise ShardCacheError(f"{path}: shard {i} is named {s.file!r}, expected {shard_name(i)!r}")
        is_last = i == len(m.shards) - 1
        if s.rows < 1 or s.rows > m.shard_rows or (not is_last and s.rows != m.shard_rows):
            raise ShardCacheError(f"{path}: shard {s.file} lists {s.rows} rows, shard_rows is {m.shard_rows}")


def check_expected(
    manifest: Manifest,
    directory: str | os.PathLike[str],
    *,
    inputs: Mapping[str, str] | None = None,
    F: int | None = None,
    h: int | None = None,
    d: int | None = None,
    method: str | None = None,
    rebuild_hint: str = DEFAULT_REBUILD_HINT,
) -> None:
    """Raise :class:`ShardCacheError` if the manifest does not match what the caller is about to use.

    Every key of ``inputs`` must be in the manifest with the same hash; ``None`` skips a check.
    """
    where = Path(directory) / MANIFEST_NAME
    for name, want in (("F", F), ("h", h), ("d", d), ("method", method)):
        have = getattr(manifest, name)
        if want is not None and have != want:
            raise ShardCacheError(f"{where}: manifest {name} {have!r} != expected {want!r}: {rebuild_hint}")
    for key, want in (inputs or {}).items():
        have = manifest.inputs.get(key)
        if have is None:
            raise ShardCacheError(
                f"{where}: manifest has no input hash {key!r} (expected {want}): {rebuild_hint}"
            )
        if have != want:
            raise ShardCacheError(
                f"{where}: manifest input hash {key!r} {have} != expected {want}: {rebuild_hint}"
            )


def _check_shard_file(
    directory: Path, manifest: Manifest, info: ShardInfo, verify_sha256: bool
) -> pq.ParquetFile:
    """Check one shard against the manifest and open it (memory-mapped)."""
    path = directory / info.file
    if not path.is_file():
        raise ShardCacheError(
            f"shard {path} is missing (listed in {MANIFEST_NAME}): re-pull or rebuild the cache"
        )
    size = path.stat().st_size
    if size != info.bytes:
        raise ShardCacheError(
            f"shard {path} has {size} bytes, manifest says {info.bytes}: truncated or modified; "
            "re-pull or rebuild the cache"
        )
    if verify_sha256:
        digest = sha256_file(path)
        if digest != info.sha256:
            raise ShardCacheError(
                f"shard {path} sha256 {digest} != manifest {info.sha256}: corrupt or modified; "
                "re-pull or rebuild the cache"
            )
    try:
        # pre_buffer=False: pages are read as decoded, which keeps the read's memory small (measured). Page
        # checksums are verified even after a sha256 check: a shard damaged before the manifest hashed it (or a
        # resealed manifest) must not decode as other numbers.
        pf = pq.ParquetFile(path, pre_buffer=False, page_checksum_verification=True)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise ShardCacheError(f"shard {path} is not a readable Parquet file ({_one_line(exc)})") from None
    expected = cache_schema(manifest.F, manifest.h, manifest.d, manifest.method)
    try:
        schema = pf.schema_arrow
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        num_rows = pf.metadata.num_rows
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # a damaged footer
        pf.close()
        raise ShardCacheError(f"shard {path} has an unreadable Parquet footer ({_one_line(exc)})") from None
    if not schema.equals(expected, check_metadata=False):
        raise ShardCacheError(
            f"shard {path} schema {_one_line(schema)} != expected {_one_line(expected)}: "
            "re-pull or rebuild the cache"
        )
    version = meta.get("rql.schema_version")
    if version != str(SCHEMA_VERSION):
        raise ShardCacheError(f"shard {path} schema version {version!r} != supported {SCHEMA_VERSION}")
    for key in ("F", "h", "d", "method"):
        if meta.get(f"rql.{key}") != str(getattr(manifest, key)):
            raise ShardCacheError(
                f"shard {path} {key}={meta.get(f'rql.{key}')!r} != manifest {getattr(manifest, key)!r}"
            )
    if num_rows != info.rows:
        raise ShardCacheError(f"shard {path} has {num_rows} rows, manifest says {info.rows}")
    return pf


def verify_cache(directory: str | os.PathLike[str], *, verify_sha256: bool = True, **expected: Any) -> Manifest:
    """Check a whole cache without loading its data: manifest, ``expected`` (the keywords of
    :func:`check_expected`: inputs, F, h, d, method, rebuild_hint), every shard; returns the manifest."""
    directory = Path(directory)
    manifest = _open_manifest(directory, expected)
    for info in manifest.shards:
        _check_shard_file(directory, manifest, info, verify_sha256)
    return manifest


def _open_manifest(directory: Path, expected: Mapping[str, Any]) -> Manifest:
    """Read the manifest, check the caller's expectations (:func:`check_expected`), the shard list against the
    directory."""
    manifest = read_manifest(directory)
    check_expected(manifest, directory, **expected)
    listed = {s.file for s in manifest.shards}
    for entry in sorted(os.listdir(directory)):
        if _SHARD_RE.match(entry) and entry not in listed:
            raise ShardCacheError(f"shard {directory / entry} is not listed in {MANIFEST_NAME}: stale file")
    for info in manifest.shards:
        if not (directory / info.file).is_file():
            raise ShardCacheError(
                f"shard {directory / info.file} is missing (listed in {MANIFEST_NAME}): re-pull or rebuild the cache"
            )
    return manifest


# --------------------------------------------------------------------------------------------------------------
# Data reading


def _column_numpy(column: pa.Array | pa.ChunkedArray, fixed_list: bool) -> np.ndarray:
    """A column as one flat numpy array: zero-copy for a single chunk, one concatenation otherwise."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if fixed_list:
            chunk = chunk.flatten()  # respects slice offsets, unlike .values
        parts.append(chunk.to_numpy(zero_copy_only=True))
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.empty(0, np.float32 if fixed_list else np.int64)
    return np.concatenate(parts)


def _split_batch(batch: pa.RecordBatch, manifest: Manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = _column_numpy(batch.column("row"), fixed_list=False)
    x = _column_numpy(batch.column("x"), fixed_list=True).reshape(-1, manifest.F + 1, manifest.h * manifest.d)
    err = _column_numpy(batch.column("roundtrip_error"), fixed_list=False)
    return rows, x, err


def _iter_checked(
    directory: Path, manifest: Manifest, verify_sha256: bool, batch_rows: int
) -> Iterator[CacheBatch]:
    for info in manifest.shards:
        pf = _check_shard_file(directory, manifest, info, verify_sha256)
        path = directory / info.file
        seen = 0
        try:
            for record_batch in pf.iter_batches(batch_size=batch_rows, use_threads=True):
                rows, x, err = _split_batch(record_batch, manifest)
                if seen == 0 and rows.shape[0] and int(rows[0]) != info.first_row:
                    raise ShardCacheError(
                        f"shard {path} starts at row {int(rows[0])}, manifest {info.first_row}"
                    )
                seen += rows.shape[0]
                if seen == info.rows and int(rows[-1]) != info.last_row:
                    raise ShardCacheError(
                        f"shard {path} ends at row {int(rows[-1])}, manifest {info.last_row}"
                    )
                yield CacheBatch(info.file, rows, x, err)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
            raise ShardCacheError(
                f"shard {path}: read failed ({_one_line(exc)}): re-pull or rebuild the cache"
            ) from None
        finally:
            pf.close()
        if seen != info.rows:
            raise ShardCacheError(f"shard {path} yielded {seen} rows, manifest says {info.rows}")


def iter_cache(
    directory: str | os.PathLike[str], *, verify_sha256: bool = True, batch_rows: int = 8192, **expected: Any
) -> Iterator[CacheBatch]:
    """Stream a cache shard by shard in batches of at most ``batch_rows`` rows, in row order.

    Batches never span two shards; memory stays bounded by a few batches whatever the cache size.

    The manifest, the caller's expectations (``expected``: the keywords of :func:`check_expected`) and the
    presence of every shard are checked before the first batch;
    each shard's size, sha256 (if ``verify_sha256``; otherwise Parquet page checksums), schema and row count are
    checked just before it is read. Arrays are zero-copy views of Arrow buffers where possible (read-only).
    """
    directory = Path(directory)
    manifest = _open_manifest(directory, expected)
    return _iter_checked(directory, manifest, verify_sha256, batch_rows)


def read_cache(directory: str | os.PathLike[str], *, verify_sha256: bool = True, **expected: Any) -> ReversalCache:
    """Read a whole cache into preallocated arrays ``rows (N,)``, ``x (N, F+1, h*d)``, ``roundtrip_error (N,)``.

    Checks as :func:`iter_cache`. Peak memory is the result plus a few read batches.
    """
    directory = Path(directory)
    manifest = _open_manifest(directory, expected)
    for info in manifest.shards:  # sizes, schemas and row counts of the files before the result is allocated
        _check_shard_file(directory, manifest, info, verify_sha256=False).close()
    n = manifest.total_rows
    rows = np.empty(n, np.int64)
    x = np.empty((n, manifest.F + 1, manifest.h * manifest.d), np.float32)
    err = np.empty(n, np.float32)
    at = 0
    for batch in _iter_checked(directory, manifest, verify_sha256, batch_rows=8192):
        k = batch.rows.shape[0]
        if at + k > n:
            raise ShardCacheError(f"shard {directory / batch.shard} holds more rows than the manifest's {n}")
        rows[at : at + k] = batch.rows
        x[at : at + k] = batch.x
        err[at : at + k] = batch.roundtrip_error
        at += k
    if at != n:
        raise ShardCacheError(f"reversal cache {directory} holds {at} rows, manifest says {n}")
    return ReversalCache(rows, x, err, manifest)
