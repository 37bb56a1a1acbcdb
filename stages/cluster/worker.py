"""One stage on one node: the worker step of the cluster protocol.

A node shares no file system with the coordinator. Each task takes a clone of its own from the node's pool
(``<clones>/clone-<i>``, held with an exclusive ``flock`` for the task's lifetime, so concurrent tasks on one node
never share a clone and a killed task's clone is free again at once), then:

1. reset: ``git fetch``, ``git checkout --force <commit>``, ``git clean -ffdx`` (``.dvc/``, ``.venv/`` and
   ``.tools/`` kept: the clone's DVC cache, its ``config.local`` and its environment), the local run-cache emptied;
2. ``dvc.lock`` := the accepted lock entries of the stage's direct upstream stages (handed over by the coordinator),
   whose outputs are then pulled, never recomputed: a stage that ran twice upstream cannot make this one pick the
   other run's outputs;
3. the remote's run-cache entries of the stage's own key fetched (and the stage restored from one of them if it
   is there), then ``dvc repro --single-item <stage>``: the task fails if any stage other than its own ran.
   ``dvc repro --pull`` would fetch every entry of the remote in every task, and without ``--single-item`` DVC
   checks (and the task would have to pull) every ancestor, so a task's cost would grow with the DAG;
4. ``dvc push <stage>`` (the data first), then ``dvc push --run-cache`` with the local run-cache pruned to the
   stage's own entry, so each push uploads one entry instead of all the entries the pull brought.

The upstream outputs come through the coordinator's one-pass restore (``restore.py``: ``dvc.yaml`` read once, one
batched fetch, checkouts in dvc repro's order). The pushes go through DVC's Python API in the task's
process, which Ray keeps between tasks: the same operations as the commands without an interpreter start and
DVC's imports each time. ``dvc repro`` itself is a child process (it runs the stage's command).

Training checkpoints go to ``RQL_CHECKPOINTS`` (the node's own, else the coordinator's ``--checkpoints``): a folder
every node reaches, so a train task retried after its process or node died resumes from the newest checkpoint.

Stage failures are returned as results (they are not retried: the same commit fails the same way); the task's
process dying (killed, node lost) is what Ray retries. Needs the standard library, PyYAML and DVC.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

CLONES_ENV = "RQL_CLUSTER_CLONES"  # a node's clone pool, overriding the coordinator's --clones
CHECKPOINTS_ENV = "RQL_CHECKPOINTS"  # training checkpoints every node reaches (stages/layout.py), overriding the
# coordinator's --checkpoints
KEPT = ("/.dvc/", "/.venv/", "/.tools/")  # what `git clean` leaves in a clone
MAX_CLONES = 256
RAN_RE = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)


class StageError(RuntimeError):
    """A step of the protocol failed; the message says which and why."""


# Runs a command with PR_SET_PDEATHSIG = SIGKILL (kept across exec): dvc, and through it the stage (which watches
# its own parent), dies with a killed task process instead of writing on in a clone that the retry resets.
_LAUNCHER = (
    "import ctypes, ctypes.util, os, sys\n"
    "libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')\n"
    "libc.prctl(1, 9, 0, 0, 0)\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(137)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class Log:
    """The task's log: every command with its output and time, written through to a file on the node."""

    def __init__(self, path: Path):
        self.path, self.parts = path, []
        path.write_text("")

    def write(self, text: str) -> None:
        self.parts.append(text)
        with self.path.open("a") as handle:
            handle.write(text)

    def text(self) -> str:
        return "".join(self.parts)


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # stage cmds: this python
    env.pop("PYTHONPATH", None)  # stages import the clone's code (python -m from the clone's root)
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, log: Log, env: dict[str, str], what: str) -> str:
    log.write(f"$ {' '.join(args)}\n")
    started = time.perf_counter()
    launched = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *args] if sys.platform.startswith("linux") else args
    process = subprocess.Popen(launched, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        log.write(line)
    code = process.wait()
    log.write(f"# exit {code} after {time.perf_counter() - started:.2f} s\n")
    if code != 0:
        raise StageError(f"{what} failed (exit {code}): {' '.join(args)}")
    return "".join(lines)


def _in_process(clone: Path, log: Log, what: str, call) -> None:
    """A DVC command through its Python API in this (long-lived) process: no interpreter start, no re-import."""
    from dvc.repo import Repo

    log.write(f"$ {what}\n")
    started = time.perf_counter()
    try:
        with contextlib.chdir(clone), Repo(str(clone)) as repo:  # targets are relative to the working dir
            said = call(repo)
    except Exception as error:
        raise StageError(f"{what} failed: {type(error).__name__}: {error}") from error
    log.write(f"# {said} after {time.perf_counter() - started:.2f} s\n")


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


@contextlib.contextmanager
def take_clone(root: Path):
    """A free clone directory of this node's pool, held (flock) until the context ends."""
    root.mkdir(parents=True, exist_ok=True)
    for index in range(MAX_CLONES):
        handle = (root / f"clone-{index}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield root / f"clone-{index}"
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return
    raise StageError(f"all {MAX_CLONES} clones under {root} are in use")


def reset_clone(clone: Path, git_url: str, commit: str, log: Log, env: dict[str, str]) -> None:
    """The clone at exactly ``commit``: tracked files as committed, nothing untracked but the kept folders."""
    if not (clone / ".git").is_dir():
        shutil.rmtree(clone, ignore_errors=True)
        _run(["git", "clone", "--quiet", "--no-checkout", git_url, str(clone)], clone.parent, log, env, "git clone")
        template = clone.parent / "config.local"  # a node's DVC credentials, copied into each new clone
        if template.is_file():
            (clone / ".dvc").mkdir(exist_ok=True)
            shutil.copy2(template, clone / ".dvc" / "config.local")
    def missing() -> bool:
        return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=clone, capture_output=True,
                              check=False).returncode != 0

    if missing():
        _run(["git", "fetch", "--quiet", git_url, "+refs/heads/*:refs/remotes/origin/*"], clone, log, env, "git fetch")
    if missing():
        _run(["git", "fetch", "--quiet", git_url, commit], clone, log, env, "git fetch of the commit")
    _run(["git", "checkout", "--quiet", "--force", "--detach", commit], clone, log, env, "git checkout")
    _run(["git", "clean", "-ffdxq", *(x for kept in KEPT for x in ("-e", kept))], clone, log, env, "git clean")
    for stale in ("rwlock", "lock"):  # a killed dvc's locks (this task holds the clone, nobody else uses them)
        (clone / ".dvc" / "tmp" / stale).unlink(missing_ok=True)
    shutil.rmtree(clone / ".dvc" / "cache" / "runs", ignore_errors=True)


def write_lock(clone: Path, entries: dict[str, Any]) -> None:
    lock = clone / "dvc.lock"
    if entries:
        lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": entries}, sort_keys=False))
    else:
        lock.unlink(missing_ok=True)


def lock_entry(clone: Path, stage: str) -> dict[str, Any]:
    """The stage's entry as DVC reads it back (its YAML 1.2 loader): the coordinator writes it into the workspace's
    dvc.lock through DVC's serialiser, and PyYAML's YAML 1.1 would turn a param such as ``yes`` into a bool."""
    from dvc.utils.serialize import load_yaml

    stages = (load_yaml(str(clone / "dvc.lock")) or {}).get("stages", {})
    if stage not in stages:
        raise StageError(f"dvc.lock has no entry for {stage} after dvc repro")
    return stages[stage]


def keep_own_run_cache_entry(clone: Path, stage: str, entry: dict[str, Any]) -> str:
    """Delete every local run-cache entry but the stage's own (the pull brought all of the remote's); its path."""
    from dvc.utils.serialize import YAMLFileCorruptedError, load_yaml

    runs = clone / ".dvc" / "cache" / "runs"
    own = []
    for path in sorted(runs.glob("*/*/*")) if runs.is_dir() else []:
        try:
            same = load_yaml(str(path)) == entry  # read as lock_entry reads the entry
        except (OSError, YAMLFileCorruptedError):
            same = False
        if same:
            own.append(path)
        else:
            path.unlink()
    if not own:
        raise StageError(f"no run-cache entry for {stage}: DVC keeps none for a stage with `cache: false` or "
                         "`persist` outputs or `always_changed`, so the coordinator could not restore it")
    return str(own[0].relative_to(runs))


def pull_upstream(clone: Path, upstream: dict[str, Any], log: Log) -> None:
    """The upstream stages' outputs fetched and checked out, and git-ignored as a serial ``dvc repro`` does after
    each stage (DVC's ``.gitignore`` files inside a folder dependency, such as the report's ``data/runs``, are part of
    its hash), in ``upstream``'s order (dvc repro's): the coordinator's one-pass restore (``restore.py``), which reads
    ``dvc.yaml`` once. ``dvc pull <stage> ...`` parsed and validated the whole ``dvc.yaml`` again for every target
    (2 upstream stages of a 1,000-stage study: 7-17 s)."""
    from stages.cluster.restore import restore_accepted

    log.write("$ restore of the upstream stages' outputs (their accepted lock entries)\n")
    try:
        restore_accepted(clone, list(upstream), upstream, lambda line: log.write(line + "\n"))
    except Exception as error:
        raise StageError(f"pulling the upstream outputs failed: {type(error).__name__}: {error}") from error


def restore_own_run(repo: Any, name: str) -> str:
    """Fetch the remote's run-cache entries of this stage's key only and, when one is there, restore the stage from
    it (its outputs pulled and checked out). ``dvc repro --pull`` instead fetches every entry of the remote in every
    task (the run-cache traffic of a study grew with the square of its stages); without ``--pull``, ``dvc repro``
    then finds the entry locally ("is cached - skipping run") or runs the stage."""
    from dvc import fs
    from dvc.stage.cache import RunCacheNotFoundError, _can_hash, _get_stage_hash

    (stage,) = repo.stage.collect(name)
    if not _can_hash(stage):
        return "the stage has no run-cache key"
    stage.save_deps()  # the key is over the command, the deps' hashes and the params
    key = _get_stage_hash(stage)
    remote = repo.cloud.get_remote_odb(None, "fetch --run-cache", hash_name="md5-dos2unix")
    source = remote.fs.join(remote.path, "runs", key[:2], key)
    entries = list(remote.fs.find(source)) if remote.fs.exists(source) else []
    local = repo.stage_cache._get_cache_dir(key)
    for entry in entries:
        fs.generic.copy(remote.fs, entry, repo.cache.legacy.fs, os.path.join(local, remote.fs.name(entry)))
    if not entries:
        return f"no run-cache entry for key {key[:12]} on the remote"
    try:
        with repo.lock:  # as dvc repro holds it (the checkout asserts it)
            repo.stage_cache.restore(stage, pull=True)
    except RunCacheNotFoundError:
        return f"{len(entries)} run-cache entries for key {key[:12]}, none restorable (data missing on the remote?)"
    return f"restored from one of {len(entries)} run-cache entries for key {key[:12]}"


def run_stage(spec: dict[str, Any], board: Any = None) -> dict[str, Any]:
    """The worker step for ``spec['stage']``; a result dict (status ran | restored | failed, log, lock entry, times)."""
    stage = spec["stage"]
    root = Path(os.path.expanduser(os.environ.get(CLONES_ENV) or spec["clones"]))
    node = socket.gethostname()
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():  # in a Ray task (else asking would start a Ray instance)
            node = f"{ray.util.get_node_ip_address()} {ray.get_runtime_context().get_node_id()[:8]}"
    result: dict[str, Any] = {"stage": stage, "node": node, "pid": os.getpid(), "times": {}, "status": "failed"}
    started = time.time()
    with take_clone(root) as clone:
        log = Log(clone.with_suffix(".log"))
        result["clone"] = str(clone)
        log.write(f"# {stage} on {node} (pid {os.getpid()}) in {clone}, commit {spec['commit']}\n")
        if board is not None:
            board.started.remote(stage, node, os.getpid(), started)
        extra = dict(spec.get("env", {}))
        if spec.get("checkpoints") and not os.environ.get(CHECKPOINTS_ENV):
            extra[CHECKPOINTS_ENV] = os.path.expanduser(spec["checkpoints"])
        env = _environment(extra)
        where = env.get(CHECKPOINTS_ENV) or "data/checkpoints of the clone (a retry starts over)"
        log.write(f"# training checkpoints: {where}\n")
        times = result["times"]
        try:
            clock = time.perf_counter()
            reset_clone(clone, spec["git_url"], spec["commit"], log, env)
            write_lock(clone, spec["upstream"])
            times["reset"] = time.perf_counter() - clock

            clock = time.perf_counter()
            if spec["upstream"]:  # one batched pull instead of one per upstream stage inside dvc repro
                pull_upstream(clone, spec["upstream"], log)
            times["pull"] = time.perf_counter() - clock

            clock = time.perf_counter()
            _in_process(clone, log, f"dvc fetch --run-cache of {stage}'s key alone",
                        lambda repo: restore_own_run(repo, stage))
            times["restore"] = time.perf_counter() - clock

            clock = time.perf_counter()
            output = _run(_dvc("repro", "--single-item", stage), clone, log, env, "dvc repro --single-item")
            times["repro"] = time.perf_counter() - clock
            ran = RAN_RE.findall(output)
            others = sorted(set(ran) - {stage})
            if others:
                raise StageError(f"dvc repro ran {', '.join(others)} besides {stage}: their accepted outputs did not "
                                 "match (undeclared files in a folder dependency? data missing on the remote?)")
            result["ran"] = stage in ran
            entry = lock_entry(clone, stage)

            clock = time.perf_counter()  # the data first, then the run-cache entry that points at it
            _in_process(clone, log, f"dvc push {stage}", lambda repo: f"{repo.push(targets=[stage])} pushed")
            times["push"] = time.perf_counter() - clock
            clock = time.perf_counter()
            result["run_cache_entry"] = keep_own_run_cache_entry(clone, stage, entry)
            _in_process(clone, log, "dvc push --run-cache",
                        lambda repo: f"{len(repo.stage_cache.push(None))} run-cache entries pushed")
            times["push_run_cache"] = time.perf_counter() - clock
            result.update(status="ran" if result["ran"] else "restored", entry=entry)
        except StageError as error:
            log.write(f"# FAILED: {error}\n")
            result["error"] = str(error)
        except Exception as error:  # noqa: BLE001 - anything else is a failure of this stage, with its log
            log.write(f"# FAILED: {type(error).__name__}: {error}\n")
            result["error"] = f"{type(error).__name__}: {error}"
        result["seconds"] = time.time() - started
        result["log"] = log.text()
    return result
