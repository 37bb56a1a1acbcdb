"""Training checkpoints: Orbax snapshots of a whole training state, resumable and checked on restore.

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

Where: a local directory (made absolute: Orbax needs absolute paths), or a URL such as ``gs://bucket/ckpt/run``,
handed to Orbax untouched (:func:`checkpoint_location`): Orbax writes ``gs://`` itself (TensorStore for the arrays,
``etils.epath`` for the rest), and this module's own files (the manifest, a step moved aside) go through
``etils.epath`` there too, with no temporary file (an object store writes an object whole or not at all).

What downstream stages read is the policy export (:mod:`stages.core.policy_file`), not these files.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Self, TypeVar

import jax
import numpy as np

from stages.core.files import atomic_write_bytes, compact_json, is_url, sha256_file, stream_digest
from stages.core.policy_file import (
    canonical_metadata,
    describe_mismatch,
    is_key_leaf,
    leaf_paths,
    stored_shape_dtype,
)

State = TypeVar("State")
log = logging.getLogger(__name__)

_STATE_ITEM = "state"
_META_ITEM = "meta"
_EXTRAS_ITEM = "extras"
_DIGEST_ITEM = "digest"
FILES_MANIFEST = "files.json"  # inside a step: size and sha256 of each of Orbax's files, written after the save
UNREADABLE_DIR = "unreadable"  # inside a checkpoint directory: steps that could not be restored, moved aside
_REASON_CHARS = 200  # an Orbax/TensorStore error is cut to its first line and this many characters



def checkpoint_location(directory: str | os.PathLike[str]) -> Any:
    """A URL (``gs://...``) as an ``etils.epath.Path`` of exactly that URL, for Orbax to reach itself; anything else a
    local path, made absolute (``pathlib.Path``)."""
    if is_url(directory):
        from etils import epath

        return epath.Path(os.fspath(directory))
    return Path(directory).absolute()


class CheckpointError(ValueError):
    """A training checkpoint cannot be used."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not match the template state or the run's metadata."""




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
    leaves = [jax.random.key_data(leaf) if is_key_leaf(leaf) else leaf for _, leaf in paths]
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

    Relative paths are resolved (Orbax needs absolute paths); URLs go to Orbax as they are
    (:func:`checkpoint_location`). Use as a context manager, or call :meth:`close`.
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
        self.directory = checkpoint_location(directory)
        self._remote = not isinstance(self.directory, Path)  # a URL: epath's file operations, no temporary files
        self.save_every = save_every
        self._async = async_save
        self.metadata = None if metadata is None else canonical_metadata(metadata)
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
        extras = canonical_metadata(extras)
        digest = {"state_sha256": state_digest(state), "extras_sha256": _json_digest(extras)}
        args = ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardSave(state), _META_ITEM: ocp.args.JsonSave(self.metadata or {}),
            _EXTRAS_ITEM: ocp.args.JsonSave(extras), _DIGEST_ITEM: ocp.args.JsonSave(digest),
        })
        saved = bool(self._manager.save(step, args=args, force=True))
        if saved and not self._async:
            self._write_files_manifest(step)
        return saved

    # -- this module's own file operations: local, or through etils.epath for a URL ---------------------------------
    def _size(self, path: Any) -> int:
        return int(path.stat().length) if self._remote else path.stat().st_size

    def _sha256(self, path: Any) -> str:
        if not self._remote:
            return sha256_file(path)
        with path.open("rb") as handle:
            return stream_digest(handle)

    def _write(self, path: Any, data: bytes) -> None:
        if self._remote:
            path.write_bytes(data)  # an object appears whole or not at all
        else:
            atomic_write_bytes(path, data)

    def _files_under(self, root: Any) -> list[Any]:
        if not self._remote:
            return [path for path in root.rglob("*") if path.is_file()]
        found = []  # epath refuses `**` (one request per object on GCS) and its fsspec walk drops the scheme
        for child in root.iterdir():
            found += self._files_under(child) if child.is_dir() else [child]
        return found

    def _step_files(self, step: int) -> dict[str, list[Any]]:
        root = self.directory / str(step)
        return {path.relative_to(root).as_posix(): [self._size(path), self._sha256(path)]
                for path in sorted(self._files_under(root), key=str)
                if path.name != FILES_MANIFEST and not path.name.startswith(".")}

    def _write_files_manifest(self, step: int) -> None:
        self._write(self.directory / str(step) / FILES_MANIFEST,
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
            actual = self._size(path)
            if actual != size:
                raise CheckpointError(f"{where}: file {name} is {actual} bytes, {size} when saved (truncated?)")
            if self._sha256(path) != sha:
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

    def _move_aside(self, step: int) -> Any:
        source = self.directory / str(step)
        target = self.directory / UNREADABLE_DIR / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = 1
        while target.exists():
            suffix += 1
            target = target.with_name(f"{step}-{suffix}")
        if self._remote:
            source.rename(target)
        else:
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
        wanted = {".".join(path): stored_shape_dtype(leaf) for path, leaf in leaf_paths(template)}
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
