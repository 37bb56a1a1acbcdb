"""The policy file: a params pytree and a JSON-able metadata dict in one byte-stable file, for downstream stages.

Written by :func:`save_policy`, read by :func:`load_policy`; byte-identical for identical inputs (Orbax's own
files differ from run to run, so downstream DVC stages depend on this file instead). Layout::

    8 bytes   magic b"RQLPOLCY"
    4 bytes   format version, uint32 little-endian
    8 bytes   body length, uint64 little-endian
    32 bytes  sha256 of the body
    body      msgpack map {"arrays": [[path, dtype, shape, raw bytes], ...] sorted by path,
                           "format": "rql-policy", "metadata": canonical JSON text}

Arrays are stored as little-endian raw bytes with their dtype string and shape; nothing is pickled.

The leaf naming (:func:`leaf_paths`) and the shape/dtype comparison (:func:`describe_mismatch`) are shared with the
training checkpoints (:mod:`stages.core.checkpoints`), so both name a mismatching leaf the same way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import msgpack
import numpy as np

from stages.core.files import atomic_write_bytes, compact_json

POLICY_MAGIC = b"RQLPOLCY"
POLICY_FORMAT = "rql-policy"
POLICY_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
_ALLOWED_KINDS = "biuf"  # bool, signed, unsigned, float


class PolicyFileError(ValueError):
    """A policy export is unreadable, corrupt, or does not match what the caller expects."""


# --------------------------------------------------------------------------------------------------------------
# Pytree leaves: names, stored shapes and dtypes


def _key_name(entry: Any) -> str:
    """One key-path entry as a string, as Orbax names checkpoint leaves."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` pairs of a pytree, each path a tuple of strings (dict keys, indices, attribute names)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in flat]


def is_prng_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def is_key_leaf(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and is_prng_key(dtype)


def stored_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype a leaf has on disk: typed PRNG keys are stored as their uint32 key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and is_prng_key(dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    if dtype is None:
        leaf = np.asarray(leaf)
        dtype = leaf.dtype
    return tuple(np.shape(leaf)), np.dtype(dtype)


def canonical_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON round trip: tuples become lists, numpy scalars Python numbers; non-JSON-able values raise."""
    return json.loads(compact_json(dict(metadata or {})))


def describe_mismatch(
    stored: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    wanted: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    limit: int = 8,
) -> list[str]:
    """Human-readable differences between two ``{leaf name: (shape, dtype)}`` maps (at most ``limit`` lines)."""
    problems = [f"{name}: in the template, not in the file" for name in sorted(set(wanted) - set(stored))]
    problems += [f"{name}: in the file, not in the template" for name in sorted(set(stored) - set(wanted))]
    for name in sorted(set(stored) & set(wanted)):
        (s_shape, s_dtype), (w_shape, w_dtype) = stored[name], wanted[name]
        if s_shape != w_shape or s_dtype != w_dtype:
            problems.append(f"{name}: file {s_dtype}{list(s_shape)} != template {w_dtype}{list(w_shape)}")
    if len(problems) > limit:
        problems = problems[:limit] + [f"... and {len(problems) - limit} more"]
    return problems


# --------------------------------------------------------------------------------------------------------------
# The file


class LoadedPolicy(NamedTuple):
    """A policy file's contents: params (template structure, or nested dicts) and metadata."""

    params: Any
    metadata: dict[str, Any]


def _array_entry(path: tuple[str, ...], leaf: Any) -> list[Any]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and is_prng_key(dtype):
        raise TypeError(f"policy param {'/'.join(path)} is a PRNG key; export params only")
    arr = np.asarray(leaf)
    if arr.dtype.kind not in _ALLOWED_KINDS:
        raise TypeError(f"policy param {'/'.join(path)} has unsupported dtype {arr.dtype}")
    shape = list(arr.shape)  # before ascontiguousarray, which makes a 0-d array 1-d
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return [list(path), arr.dtype.str, shape, arr.tobytes()]


def encode_policy(params: Any, metadata: Mapping[str, Any]) -> bytes:
    """The policy file's bytes for ``params`` (any pytree of numeric arrays) and JSON-able ``metadata``."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    entries = sorted((_array_entry(path, leaf) for path, leaf in leaf_paths(params)), key=lambda e: e[0])
    for a, b in itertools.pairwise(entries):
        if a[0] == b[0]:
            raise ValueError(f"two policy params share the path {'/'.join(a[0])}")
    body = msgpack.packb(
        {"arrays": entries, "format": POLICY_FORMAT, "metadata": compact_json(dict(metadata))},
        use_bin_type=True,
    )
    digest = hashlib.sha256(body).digest()
    return _HEADER.pack(POLICY_MAGIC, POLICY_FORMAT_VERSION, len(body), digest) + body


def save_policy(path: str | os.PathLike[str], params: Any, metadata: Mapping[str, Any]) -> str:
    """Export ``params`` and ``metadata`` to ``path`` atomically; returns the file's sha256 (hex)."""
    data = encode_policy(params, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def decode_policy(
    data: bytes,
    *,
    source: str = "<bytes>",
    template: Any = None,
    expected_metadata: Mapping[str, Any] | None = None,
) -> LoadedPolicy:
    """Parse and validate policy bytes; ``source`` names the file in errors. See :func:`load_policy`."""
    arrays, metadata = _parse_policy(data, source)
    if expected_metadata is not None:
        _check_policy_metadata(metadata, expected_metadata, source)
    if template is None:
        return LoadedPolicy(_nest(arrays, source), metadata)
    return LoadedPolicy(_into_template(arrays, template, source), metadata)


def load_policy(
    path: str | os.PathLike[str],
    *,
    template: Any = None,
    expected_metadata: Mapping[str, Any] | None = None,
) -> LoadedPolicy:
    """Read a policy export, checking magic, format version, length, sha256, structure and metadata.

    With ``template`` (a pytree of arrays or ShapeDtypeStructs), the params come back in its structure and every
    leaf's path, shape and dtype must match; without, as nested dicts of numpy arrays. Every key of
    ``expected_metadata`` must be present in the file's metadata with an equal value. Errors raise
    :class:`PolicyFileError` naming the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyFileError(f"policy file {path}: cannot read ({exc})") from exc
    return decode_policy(data, source=str(path), template=template, expected_metadata=expected_metadata)


def _parse_policy(data: bytes, source: str) -> tuple[dict[tuple[str, ...], np.ndarray], dict[str, Any]]:
    def fail(problem: str) -> PolicyFileError:
        return PolicyFileError(f"policy file {source}: {problem}")

    if len(data) < _HEADER.size:
        raise fail(
            f"{len(data)} bytes, shorter than the {_HEADER.size}-byte header: truncated or not a policy"
        )
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != POLICY_MAGIC:
        raise fail(f"bad magic {magic!r} (expected {POLICY_MAGIC!r}): not a policy export")
    if version != POLICY_FORMAT_VERSION:
        raise fail(f"format version {version} != supported {POLICY_FORMAT_VERSION}: re-export the policy")
    body = data[_HEADER.size :]
    if len(body) != length:
        raise fail(f"body is {len(body)} bytes, header says {length}: truncated or padded")
    if hashlib.sha256(body).digest() != digest:
        raise fail("sha256 of the body does not match the header: corrupt")
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several types
        raise fail(f"undecodable body ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != POLICY_FORMAT:
        raise fail("body is not an rql-policy map")
    if not isinstance(payload.get("metadata"), str):
        raise fail("metadata missing")
    try:
        metadata = json.loads(payload["metadata"])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, too deep
        raise fail(f"metadata is not JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(metadata, dict):
        raise fail("metadata is not a JSON object")
    arrays: dict[tuple[str, ...], np.ndarray] = {}
    for entry in payload.get("arrays") or []:
        path, arr = _decode_entry(entry, fail)
        if path in arrays:
            raise fail(f"duplicate param {'/'.join(path)}")
        arrays[path] = arr
    return arrays, metadata


def _decode_entry(entry: Any, fail: Any) -> tuple[tuple[str, ...], np.ndarray]:
    if not (isinstance(entry, list) and len(entry) == 4):
        raise fail("malformed array entry")
    path, dtype_str, shape, raw = entry
    if not (isinstance(path, list) and path and all(isinstance(p, str) for p in path)):
        raise fail(f"malformed param path {path!r}")
    name = "/".join(path)
    if not isinstance(dtype_str, str):
        raise fail(f"param {name}: malformed dtype {dtype_str!r}")
    try:
        dtype = np.dtype(dtype_str)
    except (TypeError, ValueError, SyntaxError, RecursionError):
        raise fail(f"param {name}: unknown dtype {dtype_str[:40]!r}") from None
    if dtype.kind not in _ALLOWED_KINDS or dtype.str != dtype_str:
        raise fail(f"param {name}: unsupported dtype {dtype_str!r}")
    if not (isinstance(shape, list) and len(shape) <= 32
            and all(type(s) is int and 0 <= s < 2**62 for s in shape)):
        raise fail(f"param {name}: malformed shape {shape!r}")
    if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dtype.itemsize:
        raise fail(
            f"param {name}: {len(raw) if isinstance(raw, bytes) else 'no'} data bytes for {dtype}{shape}"
        )
    try:
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
    except (ValueError, OverflowError) as exc:  # an empty array with a dimension beyond numpy's limits
        raise fail(f"param {name}: shape {shape} not representable ({exc})") from None
    return tuple(path), arr


def _check_policy_metadata(metadata: dict[str, Any], expected: Mapping[str, Any], source: str) -> None:
    expected = canonical_metadata(expected)
    for key, want in expected.items():
        if key not in metadata:
            raise PolicyFileError(f"policy file {source}: metadata has no {key!r} (expected {want!r})")
        if metadata[key] != want:
            raise PolicyFileError(
                f"policy file {source}: metadata {key!r} is {metadata[key]!r}, expected {want!r}"
            )


def _nest(arrays: Mapping[tuple[str, ...], np.ndarray], source: str) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, arr in sorted(arrays.items()):
        node = root
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise PolicyFileError(f"policy file {source}: {'/'.join(path)} nests under an array")
            node = child
        if path[-1] in node:
            raise PolicyFileError(f"policy file {source}: {'/'.join(path)} is both an array and a subtree")
        node[path[-1]] = arr
    return root


def _into_template(arrays: Mapping[tuple[str, ...], np.ndarray], template: Any, source: str) -> Any:
    pairs = leaf_paths(template)
    stored = {"/".join(p): (tuple(a.shape), a.dtype) for p, a in arrays.items()}
    wanted = {"/".join(p): stored_shape_dtype(leaf) for p, leaf in pairs}
    problems = describe_mismatch(stored, wanted)
    if problems:
        raise PolicyFileError(
            f"policy file {source} does not match the template params: " + "; ".join(problems)
        )
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [arrays[p] for p, _ in pairs])
