"""The coordinator's last step: the accepted runs of a study restored in the user's workspace in one pass.

``dvc repro --pull`` here (what the coordinator ran before) restored the stages one at a time, and after each one
DVC re-read and rewrote the whole ``dvc.lock`` with its round-trip YAML parser and emitter (``Lockfile.dump_stages``
-> ``modify_yaml``): N rewrites of a file of up to N entries, 80% of the time of a 100-stage restore, growing with
the square of the study. The coordinator already holds every stage's accepted lock entry (the one the worker
pushed, and whose run-cache entry the remote holds), so this module does what that restore amounted to, once:

1. the workspace's stages (DVC's own index, built once) filled from the accepted entries (``StageLoader.
   fill_from_lock``, as DVC's run-cache restore fills a stage from an entry);
2. every object their outputs use fetched from the remote in one batched transfer (``DataCloud.pull``);
3. every output checked out (differing files replaced, as ``dvc repro`` removes a stage's outputs before it
   restores them) and git-ignored, stage after stage in ``dvc repro``'s order, as a serial run leaves them (DVC's
   ``.gitignore`` files inside a folder dependency count in its hash);
4. ``dvc.lock`` written once, last, and atomically: DVC's own serialisation of each stage (``to_lockfile``) merged
   into the existing file exactly as DVC merges one stage (its round-trip parser and emitter; entries already there
   keep their place, new ones follow in ``dvc repro``'s order), so it equals a serial ``dvc repro``'s byte for byte,
   and a kill before it leaves no entry naming an output that is not there yet.

The caller then checks the result independently: ``dvc status`` (a new DVC process) must find nothing changed, and
the lock's entries must equal the accepted ones.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.core.files import atomic_write_bytes

LOCK = "dvc.lock"


class RestoreError(RuntimeError):
    """The accepted outputs could not be restored in the workspace; the message says which and why."""


def load_lock(path: Path) -> dict[str, Any]:
    """The ``stages`` of a ``dvc.lock`` as DVC itself reads them (ruamel, YAML 1.2: a value such as ``yes`` or
    ``1:20`` stays a string, where PyYAML's YAML 1.1 would turn it into a bool or an int)."""
    from dvc.utils.serialize import load_yaml

    return (load_yaml(str(path)) or {}).get("stages", {}) if path.is_file() else {}


def lock_text(existing: str | None, entries: dict[str, dict[str, Any]]) -> str | None:
    """``dvc.lock``'s new text with ``entries`` (DVC's lockfile dicts, in order) merged as DVC's
    ``Lockfile.dump_stages`` merges them; ``None`` when no entry changes (DVC then leaves the file alone)."""
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

    data = parse_yaml_for_update(existing, LOCK) if existing else {}
    if not data:
        data.update({"schema": "2.0"})  # as DVC: the schema first
    data["stages"] = data.get("stages", {})
    changed = False
    for name, entry in entries.items():
        if data["stages"].get(name, {}) != entry:
            changed = True
            data["stages"][name] = entry
    return dumps_yaml(data) if changed or not existing else None


def restore_accepted(workspace: Path, names: list[str], accepted: dict[str, dict[str, Any]],
                     say: Callable[[str], None] = lambda line: None) -> dict[str, float]:
    """Restore the accepted runs of ``names`` (in ``dvc repro``'s order) in ``workspace``; the seconds of each
    phase. Raises :class:`RestoreError`."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage
    from dvc.stage.loader import StageLoader
    from dvc.stage.serialize import to_lockfile

    times: dict[str, float] = {}
    clock = time.perf_counter()
    # repo.lock as dvc repro holds it; scm_context as around dvc repro: core.autostage honoured (the .gitignore files
    # and dvc.lock staged), the .gitignore entries taken back if the restore fails
    with contextlib.chdir(workspace), Repo(str(workspace)) as repo, repo.lock, repo.scm_context(quiet=True):
        by_name = {stage.addressing: stage for stage in repo.index.stages if isinstance(stage, PipelineStage)}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise RestoreError(f"not stages of this workspace's dvc.yaml: {', '.join(missing[:5])}")
        stages = [by_name[name] for name in names]
        for stage in stages:
            StageLoader.fill_from_lock(stage, accepted[stage.addressing])
        times["index"] = time.perf_counter() - clock
        say(f"# {len(stages)} stages filled from their accepted lock entries in {times['index']:.2f} s")

        clock = time.perf_counter()
        used: dict[Any, set] = {}
        for stage in stages:
            for odb, objs in stage.get_used_objs().items():
                used.setdefault(odb, set()).update(objs)
        fetched, failed = 0, []
        for odb, objs in used.items():
            result = repo.cloud.pull(objs, odb=odb)
            fetched += len(result.transferred)
            failed += [str(obj) for obj in result.failed]
        times["fetch"] = time.perf_counter() - clock
        say(f"# {sum(map(len, used.values()))} objects used, {fetched} fetched from the remote in "
            f"{times['fetch']:.2f} s")
        if failed:
            raise RestoreError(f"{len(failed)} objects could not be fetched from the remote, e.g. {failed[0]}")
        absent = [f"{out} of {stage.addressing}" for stage in stages for out in stage.outs if out.changed_cache()]
        if absent:  # DVC only warns about objects that neither the cache nor the remote has
            raise RestoreError(f"{len(absent)} outputs are neither in the cache nor on the remote, e.g. {absent[0]}")

        clock = time.perf_counter()
        changed = 0
        for stage in stages:
            for out in stage.outs:
                result = out.checkout(force=True)  # what differs is replaced, what matches is left alone
                changed += bool(result and any(result))
                out.ignore()
        times["checkout"] = time.perf_counter() - clock
        say(f"# outputs checked out ({changed} added or changed) and git-ignored in {times['checkout']:.2f} s")

        clock = time.perf_counter()
        entries: dict[str, dict[str, Any]] = {}
        for stage in stages:
            entries.update(to_lockfile(stage))
        path = workspace / LOCK
        text = lock_text(path.read_text(encoding="utf-8") if path.is_file() else None, entries)
        if text is not None:
            atomic_write_bytes(path, text.encode("utf-8"))
            repo.scm_context.track_file(LOCK)
        times["lock"] = time.perf_counter() - clock
        say(f"# {LOCK} {'written' if text is not None else 'already up to date'} in {times['lock']:.2f} s")
        if repo.scm_context.files_to_track:
            staged = "staged in git (core.autostage)" if repo.scm_context.autostage else "to git add"
            say(f"# {staged}: {' '.join(sorted(repo.scm_context.files_to_track))}")
    return times
