"""File plumbing every stage shares: atomic writes, sha256 of a file, and the two JSON forms the artifacts use.

An atomic write goes to a temporary file beside the target (`.<name>.<random>.tmp`), which is fsynced and renamed
over the target, so an interrupted write never leaves a file that looks complete. The two JSON forms keep the bytes
each artifact has always had:

- `pretty_json`: sorted keys, indented, a final newline: files a person reads (manifests, summaries, eval records).
- `compact_json`: sorted keys, no whitespace, ASCII, NaN refused, numpy scalars as numbers: what is hashed or
  embedded (policy file metadata, checkpoint digests).

Light on purpose (standard library only): stages that read no arrays import it without starting JAX.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

_HASH_BLOCK = 8 << 20
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a scheme, then ://


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory (a directory: so that a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block ends without an error it is fsynced and
    renamed to ``path`` (permissions as a plain ``open`` would give), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary files an interrupted `atomic_path` of ``path`` may have left."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def is_url(location: str | os.PathLike[str]) -> bool:
    """``gs://bucket/x``, ``s3://...``: a location that a library reaches by itself, not a local path (which
    ``pathlib`` would also mangle: ``Path("gs://b/x")`` is ``gs:/b/x``)."""
    return bool(_URL.match(os.fspath(location)))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def stream_digest(handle: BinaryIO, algorithm: str = "sha256") -> str:
    """Hex digest of what an open binary file (a local file, or an ``etils.epath`` object) holds from its current
    position, read in blocks (bounded memory)."""
    digest = hashlib.new(algorithm)
    while block := handle.read(_HASH_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file with a hashlib ``algorithm``, read in blocks (bounded memory)."""
    with open(path, "rb") as f:
        return stream_digest(f, algorithm)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in blocks (bounded memory)."""
    return file_digest(path, "sha256")


def pretty_json(obj: Any, *, allow_nan: bool = True) -> str:
    """Sorted, indented JSON with a final newline."""
    return json.dumps(obj, sort_keys=True, indent=2, allow_nan=allow_nan, ensure_ascii=True) + "\n"


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as `pretty_json` atomically."""
    atomic_write_bytes(path, pretty_json(payload).encode())


def _numpy_scalar(obj: Any) -> Any:
    numpy = sys.modules.get("numpy")  # a numpy scalar can only exist once numpy is imported
    if numpy is not None and isinstance(obj, numpy.generic):
        return obj.item()
    raise TypeError(f"metadata value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def compact_json(obj: Any) -> str:
    """Canonical compact JSON: sorted keys, no whitespace, ASCII, NaN refused, numpy scalars as Python numbers."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True, default=_numpy_scalar
    )
