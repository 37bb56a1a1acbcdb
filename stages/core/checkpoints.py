"""Checkpoints: Orbax snapshots of a whole training state, and a byte-stable export of an evaluation policy.

Training state (:class:`TrainCheckpointer`): any JAX pytree (params, optax states, target/EMA params, raw or typed
PRNG keys, the step as an int array, flax ``struct.dataclass`` containers) saved with an Orbax
``CheckpointManager``. Restoring goes into the structure of a template state; tree structure, shapes and dtypes are
compared with the checkpoint's metadata first, and any difference raises :class:`CheckpointMismatchError` naming the
directory, the step and the leaves. Orbax writes each step into a ``<step>.orbax-checkpoint-tmp`` directory and
renames it when complete, so an interrupted save is never listed as a step; leftovers are deleted when the next
checkpointer opens the directory. Orbax's bytes and file names differ from run to run.

Layout of one step, ``<directory>/<step>/``: the Orbax items ``state`` (the pytree), ``meta`` (the run's metadata,
JSON), ``extras`` (a JSON-able dict the caller saves with the step, e.g. the metric history) and ``digest`` (JSON:
sha256 of the state's leaves and of the extras). Restoring recomputes both digests, so a truncated or altered file
is detected even where TensorStore would read it without complaint. :meth:`TrainCheckpointer.resume` falls back to
the newest intact step and moves the unreadable newer ones to ``<directory>/unreadable/<step>`` (Orbax does not list
that folder), logging a warning; with no intact step it stops with one line saying which directory to delete.

Policy export (:func:`save_policy`, :func:`load_policy`): a params pytree and a JSON-able metadata dict in one file,
byte-identical for identical inputs, for downstream DVC stages. Layout::

    8 bytes   magic b"RQLPOLCY"
    4 bytes   format version, uint32 little-endian
    8 bytes   body length, uint64 little-endian
    32 bytes  sha256 of the body
    body      msgpack map {"arrays": [[path, dtype, shape, raw bytes], ...] sorted by path,
                           "format": "rql-policy", "metadata": canonical JSON text}

Arrays are stored as little-endian raw bytes with their dtype string and shape; nothing is pickled.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import math
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Self, TypeVar

import jax
import msgpack
import numpy as np

from stages.core.files import atomic_write_bytes, compact_json, sha256_file

State = TypeVar("State")
log = logging.getLogger(__name__)

_STATE_ITEM = "state"
_META_ITEM = "meta"
_EXTRAS_ITEM = "extras"
_DIGEST_ITEM = "digest"
FILES_MANIFEST = "files.json"  # inside a step: size and sha256 of each of Orbax's files, written after the save
UNREADABLE_DIR = "unreadable"  # inside a checkpoint directory: steps that could not be restored, moved aside
_REASON_CHARS = 200  # an Orbax/TensorStore error is cut to its first line and this many characters

POLICY_MAGIC = b"RQLPOLCY"
POLICY_FORMAT = "rql-policy"
POLICY_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
_ALLOWED_KINDS = "biuf"  # bool, signed, unsigned, float


class CheckpointError(ValueError):
    """A training checkpoint cannot be used."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not match the template state or the run's metadata."""


class PolicyFileError(ValueError):
    """A policy export is unreadable, corrupt, or does not match what the caller expects."""


# --------------------------------------------------------------------------------------------------------------
# Pytree helpers


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


def _is_prng_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_key_leaf(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and _is_prng_key(dtype)


def _stored_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype a leaf has on disk: typed PRNG keys are stored as their uint32 key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and _is_prng_key(dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    if dtype is None:
        leaf = np.asarray(leaf)
        dtype = leaf.dtype
    return tuple(np.shape(leaf)), np.dtype(dtype)


# --------------------------------------------------------------------------------------------------------------
# Training state


def _canonical_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON round trip: tuples become lists, numpy scalars Python numbers; non-JSON-able values raise."""
    return json.loads(compact_json(dict(metadata or {})))


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` cut to a readable length (TensorStore appends multi-line specs)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > _REASON_CHARS:
        first = first[:_REASON_CHARS] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def state_digest(tree: Any) -> str:
    """sha256 over a pytree's leaf paths, dtypes, shapes and little-endian bytes (typed PRNG keys as key data)."""
    paths = leaf_paths(tree)
    leaves = [jax.random.key_data(leaf) if _is_key_leaf(leaf) else leaf for _, leaf in paths]
    digest = hashlib.sha256()
    for (path, _), value in zip(paths, jax.device_get(leaves), strict=True):
        arr = np.asarray(value)
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        digest.update(compact_json([list(path), arr.dtype.str, list(arr.shape)]).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _json_digest(payload: Any) -> str:
    return hashlib.sha256(compact_json(payload).encode()).hexdigest()


def _is_orbax_leftover(unraisable: Any) -> bool:
    """An error of a read a failed Orbax restore abandoned: its coroutine, or its callback on the closed loop."""
    exc, text = unraisable.exc_value, repr(getattr(unraisable, "object", ""))
    return "_read_array_index_and_device_put" in text or (
        isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")


def _collect_quietly() -> None:
    """After a failed Orbax restore: collect its abandoned reads now, and from then on report their late errors
    (TensorStore specs of ~60 lines each) as one debug line instead of on stderr; any other error is reported."""
    previous = sys.unraisablehook
    if getattr(previous, "_rql_quiet", False):
        gc.collect()
        return

    def hook(unraisable: Any) -> None:
        if _is_orbax_leftover(unraisable):
            log.debug("ignored after a failed restore: %s", _one_line(unraisable.exc_value))
        else:
            previous(unraisable)

    hook._rql_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    gc.collect()


class Resumed(NamedTuple):
    """What :meth:`TrainCheckpointer.resume` found: the state, its step (``None``: nothing saved yet), the extras
    saved with it (``None`` without a checkpoint) and the unreadable newer steps it skipped."""

    state: Any
    step: int | None
    extras: dict[str, Any] | None
    skipped: tuple[int, ...] = ()


class TrainCheckpointer:
    """Saves and restores a whole training state in ``directory`` with Orbax.

    - ``save_every``: :meth:`save` writes when the step crosses a multiple of it (steps may advance by K updates
      per call), or always with ``force=True`` (for the final step);
    - ``max_to_keep``: older steps are deleted (``None`` keeps all);
    - ``metadata``: a JSON-able dict (for instance the run's config) stored with every step; :meth:`restore` refuses
      a checkpoint whose metadata differs, so a resumed run cannot silently continue under other settings;
    - ``extras`` (per :meth:`save`): a JSON-able dict saved with that step and returned by :meth:`resume`;
    - saving a step that already exists is skipped (returns ``False``): after a resume, the state at that step is
      the one on disk.

    Relative paths are resolved (Orbax needs absolute paths). Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int,
        max_to_keep: int | None = 2,
        metadata: Mapping[str, Any] | None = None,
        async_save: bool = False,
    ) -> None:
        import orbax.checkpoint as ocp  # here, not at import: loading a policy needs no Orbax

        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self._async = async_save
        self.metadata = None if metadata is None else _canonical_metadata(metadata)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        handlers = {_STATE_ITEM: ocp.StandardCheckpointHandler(), _META_ITEM: ocp.JsonCheckpointHandler(),
                    _EXTRAS_ITEM: ocp.JsonCheckpointHandler(), _DIGEST_ITEM: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        # Orbax deletes leftovers of interrupted saves in the background; wait, so none is seen after opening.
        wait_for_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_for_cleanup is not None:
            wait_for_cleanup()

    # -- queries ------------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Completed checkpoint steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest completed step, or ``None``."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``step`` crosses a multiple of ``save_every`` since the latest saved step."""
        latest = self.latest_step() or 0
        return step > latest and step // self.save_every > latest // self.save_every

    # -- save ---------------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, force: bool = False, extras: Mapping[str, Any] | None = None) -> bool:
        """Save ``state`` (and the JSON-able ``extras``) as ``step`` if :meth:`should_save` (or ``force``); returns
        whether it was written."""
        import orbax.checkpoint as ocp

        step = int(step)
        if step in self._manager.all_steps():
            return False
        if not force and not self.should_save(step):
            return False
        extras = _canonical_metadata(extras)
        digest = {"state_sha256": state_digest(state), "extras_sha256": _json_digest(extras)}
        args = ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardSave(state), _META_ITEM: ocp.args.JsonSave(self.metadata or {}),
            _EXTRAS_ITEM: ocp.args.JsonSave(extras), _DIGEST_ITEM: ocp.args.JsonSave(digest),
        })
        saved = bool(self._manager.save(step, args=args, force=True))
        if saved and not self._async:
            self._write_files_manifest(step)
        return saved

    def _step_files(self, step: int) -> dict[str, list[Any]]:
        root = self.directory / str(step)
        return {path.relative_to(root).as_posix(): [path.stat().st_size, sha256_file(path)]
                for path in sorted(root.rglob("*"))
                if path.is_file() and path.name != FILES_MANIFEST and not path.name.startswith(".")}

    def _write_files_manifest(self, step: int) -> None:
        atomic_write_bytes(self.directory / str(step) / FILES_MANIFEST,
                           compact_json({"files": self._step_files(step)}).encode())

    def _verify_files(self, step: int) -> None:
        """Compare the step's files with its manifest (a step saved asynchronously, or killed before the manifest
        was written, has none: then only the digests check it). Raises :class:`CheckpointError` naming the file."""
        manifest = self.directory / str(step) / FILES_MANIFEST
        if not manifest.is_file():
            return
        where = f"step {step} in {self.directory}"
        try:
            recorded = json.loads(manifest.read_bytes())["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: {FILES_MANIFEST} is unreadable ({_one_line(exc)})") from exc
        root = self.directory / str(step)
        for name, (size, sha) in sorted(recorded.items()):
            path = root / name
            if not path.is_file():
                raise CheckpointError(f"{where}: file {name} is missing")
            actual = path.stat().st_size
            if actual != size:
                raise CheckpointError(f"{where}: file {name} is {actual} bytes, {size} when saved (truncated?)")
            if sha256_file(path) != sha:
                raise CheckpointError(f"{where}: file {name} does not match its sha256 (altered)")

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save is on disk."""
        self._manager.wait_until_finished()

    # -- restore ------------------------------------------------------------------------------------------------
    def restore(self, template: State, step: int | None = None) -> State:
        """Restore ``step`` (default: latest) into the structure of ``template`` (arrays or ShapeDtypeStructs)."""
        return self.restore_with_extras(template, step)[0]

    def restore_with_extras(self, template: State, step: int | None = None) -> tuple[State, dict[str, Any]]:
        """``(state, extras)`` of ``step`` (default: latest), both checked against the digests saved with them."""
        import orbax.checkpoint as ocp

        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})"
            )
        self._verify_files(step)
        self._check_metadata(step)
        self._check_template(step, template)
        args = ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardRestore(template),
                                     _EXTRAS_ITEM: ocp.args.JsonRestore(), _DIGEST_ITEM: ocp.args.JsonRestore()})
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as exc:  # Orbax/TensorStore raise many types; name the place and keep the cause
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {_one_line(exc)}") from exc
        state, extras, digest = restored[_STATE_ITEM], restored[_EXTRAS_ITEM], restored[_DIGEST_ITEM]
        if not isinstance(digest, dict) or not isinstance(extras, dict):
            raise CheckpointError(f"step {step} in {self.directory} has no '{_DIGEST_ITEM}' or '{_EXTRAS_ITEM}' "
                                  "record (saved by an older version?)")
        if digest.get("state_sha256") != state_digest(state):
            raise CheckpointError(f"step {step} in {self.directory}: the restored state does not match its sha256 "
                                  "(a file of the step is truncated or altered)")
        if digest.get("extras_sha256") != _json_digest(extras):
            raise CheckpointError(f"step {step} in {self.directory}: '{_EXTRAS_ITEM}' does not match its sha256 "
                                  "(altered)")
        return state, extras

    def resume(self, init_state: State) -> Resumed:
        """The newest intact checkpoint restored into ``init_state``'s structure, or ``init_state`` without one.

        Newer steps that cannot be restored (truncated, corrupt or missing files) are skipped: each is moved to
        ``<directory>/unreadable/<step>`` with a warning. If no step is intact, raises :class:`CheckpointError`
        naming them and the directory to delete. A :class:`CheckpointMismatchError` (other settings or structure)
        is raised at once: that is not damage but a different run.
        """
        steps = self.all_steps()
        if not steps:
            return Resumed(init_state, None, None)
        failures: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                state, extras = self.restore_with_extras(init_state, step)
            except CheckpointMismatchError:
                raise
            except CheckpointError as exc:
                failures.append((step, str(exc)))
                del exc
                _collect_quietly()  # Orbax's abandoned reads would print TensorStore specs at exit
                continue
            for bad, exc in failures:
                moved = self._move_aside(bad)
                log.warning("checkpoint step %d is unreadable and skipped, moved to %s (%s); resuming from step %d",
                            bad, moved, exc, step)
            if failures:
                self._manager.reload()
            return Resumed(state, step, extras, tuple(bad for bad, _ in failures))
        reasons = "; ".join(reason for _, reason in failures)
        raise CheckpointError(f"no intact checkpoint in {self.directory} ({reasons}); delete {self.directory} to "
                              "start this run over")

    def _move_aside(self, step: int) -> Path:
        source = self.directory / str(step)
        target = self.directory / UNREADABLE_DIR / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = 1
        while target.exists():
            suffix += 1
            target = target.with_name(f"{step}-{suffix}")
        os.replace(source, target)
        return target

    def stored_metadata(self, step: int) -> dict[str, Any]:
        """The metadata dict saved with ``step``."""
        import orbax.checkpoint as ocp

        args = ocp.args.Composite(**{_META_ITEM: ocp.args.JsonRestore()})
        try:
            return dict(self._manager.restore(step, args=args)[_META_ITEM] or {})
        except Exception as exc:
            raise CheckpointError(
                f"cannot read metadata of step {step} in {self.directory}: {_one_line(exc)}"
            ) from exc

    def _check_metadata(self, step: int) -> None:
        if self.metadata is None:
            return
        stored = self.stored_metadata(step)
        if stored != self.metadata:
            keys = sorted(
                k for k in set(stored) | set(self.metadata) if stored.get(k) != self.metadata.get(k)
            )
            diffs = "; ".join(
                f"{k}: checkpoint {stored.get(k)!r} != run {self.metadata.get(k)!r}" for k in keys
            )
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} was saved with other metadata ({diffs}): "
                "delete the directory to start over, or run with the checkpoint's settings"
            )

    def _check_template(self, step: int, template: Any) -> None:
        try:
            tree_metadata = self._manager.item_metadata(step)[_STATE_ITEM]
        except Exception as exc:
            raise CheckpointError(
                f"cannot read metadata of step {step} in {self.directory}: {_one_line(exc)}"
            ) from exc
        if tree_metadata is None:
            raise CheckpointError(f"step {step} in {self.directory} has no '{_STATE_ITEM}' item")
        stored = {
            leaf.name: (tuple(leaf.shape), np.dtype(leaf.dtype))
            for leaf in jax.tree_util.tree_leaves(getattr(tree_metadata, "tree", tree_metadata))
        }
        wanted = {".".join(path): _stored_shape_dtype(leaf) for path, leaf in leaf_paths(template)}
        problems = describe_mismatch(stored, wanted)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not match the template state: "
                + "; ".join(problems)
            )

    # -- lifetime -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish pending saves and release Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
# Policy export


class LoadedPolicy(NamedTuple):
    """A policy file's contents: params (template structure, or nested dicts) and metadata."""

    params: Any
    metadata: dict[str, Any]


def _array_entry(path: tuple[str, ...], leaf: Any) -> list[Any]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and _is_prng_key(dtype):
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


def read_policy_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata dict of a policy file (the whole file is validated)."""
    return load_policy(path).metadata


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
    expected = _canonical_metadata(expected)
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
    wanted = {"/".join(p): _stored_shape_dtype(leaf) for p, leaf in pairs}
    problems = describe_mismatch(stored, wanted)
    if problems:
        raise PolicyFileError(
            f"policy file {source} does not match the template params: " + "; ".join(problems)
        )
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [arrays[p] for p, _ in pairs])
