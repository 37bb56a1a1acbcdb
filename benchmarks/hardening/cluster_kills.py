"""kill -9 of the cluster entry point (``python -m stages.cluster_repro``, the coordinator) at random points.

Each trial starts from a fresh workspace (a git clone of the built tiny study at its commit before the results, with
a new empty DVC remote, so every stage has to run again, and the project's current cluster runner) and runs the entry point without ``--address`` (a local,
loopback-only Ray instance, clones under ``.dvc/tmp/cluster-clones``) for the targets ``validate`` and
``evaluate_bc_flow`` (with their upstream stages: download and train). The first run is uninterrupted:
its duration sets the kill window and its outputs must equal the reference study's. Each trial then SIGKILLs the
coordinator alone at a random time within that window and checks, before any rerun:

- no process outlives it (the Ray instance, its workers, their ``dvc`` and stage processes: nothing may keep
  running in the workspace or its clones);
- every declared output in the workspace is absent, or complete and valid (and equal to the reference where the
  stage is deterministic); ``dvc.lock``, if there, parses and every output it lists exists.

Then the entry point is rerun uninterrupted: it must exit 0, leave outputs byte-identical to the reference's where
deterministic, ``dvc status`` clean, one run-cache entry per stage on the remote, and restore (not rerun) every stage
whose run-cache entry was on the remote when the coordinator died: nothing that finished reruns.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from benchmarks.hardening.common import (
    ROOT,
    Result,
    environment,
    git,
    kill_leftovers,
    last_error_line,
    run,
    stage_pythons,
)
from benchmarks.hardening.kills import StageSpec, check_outputs, stage_specs

TARGETS = ("validate", "evaluate_bc_flow")


def specs() -> list[StageSpec]:
    """The declared outputs of the targeted stages and their upstream stages (validate, download, train and evaluate
    of bc_flow: the BC-flow run needs no prior and no reversal cache)."""
    validate = StageSpec("validate", [sys.executable, "-m", "stages.validate"], ("data/params.json",), True)
    return [validate, *(spec for spec in stage_specs() if spec.name.split("@")[0] in
                        ("download", "train_bc_flow", "evaluate_bc_flow"))]


# The cluster runner as the project has it now (not as the reference study copied it): it is no stage's dependency,
# so updating it in a trial's workspace changes no stage.
RUNNER = ("stages/cluster_repro.py", *(f"stages/cluster/{name}.py" for name in
                                      ("__init__", "dag", "loopback", "reaper", "scheduler", "worker")))


def fresh_workspace(reference: Path, target: Path) -> Path:
    """A clone of the study at its commit before the results (no dvc.lock), its DVC remote a new empty folder."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    workspace, remote = target / "workspace", target / "remote"
    run(["git", "clone", "-q", str(reference), str(workspace)], target)
    git(workspace, "checkout", "-q", "-B", "trial", "HEAD~1")  # the "tiny study" commit: params, no results
    for name in RUNNER:
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, workspace / name)
    for step in (run([sys.executable, "-m", "dvc", "remote", "modify", "local", "url", str(remote)], workspace),
                 git(workspace, "add", *RUNNER),
                 git(workspace, "commit", "-qam", "a remote of its own, the project's cluster runner")):
        if step.returncode != 0:
            raise RuntimeError(f"{' '.join(step.args)}: {last_error_line(step.stderr)}")
    return workspace


def remote_entries(remote: Path) -> set[str]:
    runs = remote / "runs"
    return {p.relative_to(runs).as_posix() for p in runs.glob("*/*/*")} if runs.is_dir() else set()


def coordinator(workspace: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "stages.cluster_repro", "--no-live", "--num-cpus", "2", *TARGETS]
    return subprocess.Popen(command, cwd=workspace, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def summary_of(workspace: Path) -> dict:
    path = workspace / ".dvc" / "tmp" / "cluster-logs" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def lock_problems(workspace: Path) -> list[str]:
    """``dvc.lock`` (if any) parses, and every output an entry lists is there."""
    lock = workspace / "dvc.lock"
    if not lock.exists():
        return []
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError as exc:
        return [f"dvc.lock does not parse: {' '.join(str(exc).split())[:120]}"]
    return [f"dvc.lock lists {out['path']} of {name}, which is missing" for name, entry in stages.items()
            for out in entry.get("outs", []) if not (workspace / out["path"]).exists()]


def after_rerun(workspace: Path, reference: Path, finished: set[str]) -> tuple[list[str], str]:
    """Problems after an uninterrupted rerun, and a note (stages ran / restored)."""
    result = run([sys.executable, "-m", "stages.cluster_repro", "--no-live", "--num-cpus", "2", *TARGETS],
                 workspace, timeout=3600)
    if result.returncode != 0:
        return [f"rerun exit {result.returncode}: {last_error_line(result.stderr)}"], ""
    problems = [problem for spec in specs() for problem in check_outputs(workspace, reference, spec, True)]
    stages = summary_of(workspace).get("stages", {})
    reran = sorted(name for name, stage in stages.items()
                   if stage["status"] == "ran" and stage.get("run_cache_entry") in finished)
    if reran:
        problems.append(f"finished before the kill, yet ran again: {', '.join(reran)}")
    keys: dict[str, int] = {}
    for entry in remote_entries(workspace.parent / "remote"):
        keys[entry.split("/")[1]] = keys.get(entry.split("/")[1], 0) + 1
    if any(count > 1 for count in keys.values()) or len(keys) != len(stages):
        problems.append(f"{len(keys)} run-cache keys for {len(stages)} stages, counts {sorted(keys.values())}")
    status = run([sys.executable, "-m", "dvc", "status", "--json", *TARGETS], workspace)
    if status.returncode != 0 or json.loads(status.stdout or "{}") != {}:
        problems.append(f"dvc status not clean: {status.stdout.strip()[:120]}")
    ran = sum(stage["status"] == "ran" for stage in stages.values())
    return problems, f"{ran} ran, {len(stages) - ran} restored"


def campaign(reference: Path, workdir: Path, trials: int, seed: int, log: Callable[[str], None]) -> list[Result]:
    category = "kill: cluster entry point"
    rng = random.Random(seed + 11)
    base = workdir / "cluster-kill"
    results: list[Result] = []
    workspace = fresh_workspace(reference, base / "uninterrupted")
    started = time.monotonic()
    first = run([sys.executable, "-m", "stages.cluster_repro", "--no-live", "--num-cpus", "2", *TARGETS],
                workspace, timeout=3600)
    duration = time.monotonic() - started
    if first.returncode != 0:
        return [Result(category, "uninterrupted", False, f"exit {first.returncode}: {last_error_line(first.stderr)}")]
    problems = [problem for spec in specs() for problem in check_outputs(workspace, reference, spec, True)]
    stages = summary_of(workspace).get("stages", {})
    results.append(Result(category, f"uninterrupted run of {len(stages)} stages reproduces the reference",
                          not problems, "; ".join(problems[:2])))
    log(f"cluster entry point: uninterrupted run {duration:.0f} s ({len(stages)} stages)")
    kill_leftovers(workspace)
    shutil.rmtree(base / "uninterrupted", ignore_errors=True)
    for trial in range(trials):
        workspace = fresh_workspace(reference, base / f"trial-{trial}")
        at = rng.uniform(0.02, 0.95) * duration
        process = coordinator(workspace)
        try:
            process.wait(timeout=at)
            finished_first = True
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)  # the coordinator alone, not its process group
            process.wait()
            finished_first = False
        time.sleep(5.0)  # what the coordinator started has had time to notice
        survivors = stage_pythons(workspace)
        finished = remote_entries(base / f"trial-{trial}" / "remote")
        problems = [f"{len(survivors)} processes outlived the coordinator, e.g. {survivors[0][1][:90]}"] if survivors \
            else []
        with_pgid = _group_members(process.pid)
        if with_pgid:
            problems.append(f"{len(with_pgid)} processes of its group outlived the coordinator")
        kill_leftovers(workspace)
        _kill_group(process.pid)
        problems += [problem for spec in specs() for problem in check_outputs(workspace, reference, spec, False)]
        problems += lock_problems(workspace)
        rerun_problems, note = after_rerun(workspace, reference, finished)
        problems += [f"after rerun: {p}" for p in rerun_problems]
        name = (f"coordinator killed at {at:.0f} s, {len(finished)} stages finished"
                + (" (it finished first)" if finished_first else "") + (f"; rerun: {note}" if note else ""))
        results.append(Result(category, name, not problems, "; ".join(problems[:3])))
        log(f"kill {name}: {'ok' if not problems else problems[0]}")
        kill_leftovers(workspace)
        shutil.rmtree(base / f"trial-{trial}", ignore_errors=True)
    return results


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
