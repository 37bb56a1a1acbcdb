"""What the campaign's attacks share: the tiny reference study, running commands, process-group clean-up, results.

The tiny study reuses tests/test_pipeline.py's helpers (copy_project, write_tiny_params, TINY): a copy of the
project with tiny params, built once with ``dvc repro``; attacks work on copies of it, never on the project.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.test_pipeline import AGENTS, DATASET, NUMBER, TASK, copy_project, write_tiny_params

__all__ = [
    "AGENTS",
    "DATASET",
    "NUMBER",
    "TASK",
    "Result",
    "build_reference",
    "clone_study",
    "environment",
    "kill_group",
    "last_error_line",
    "run",
    "stage_pythons",
]


@dataclass
class Result:
    """One attack case: category, name, whether it passed, and one line saying why not."""

    category: str
    name: str
    ok: bool
    detail: str = ""


def environment() -> dict[str, str]:
    """Stage commands (`python -m stages.x`) must find the venv's python first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("MUJOCO_GL", "egl")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("PYTHONPATH", None)  # stages are imported from the study copy (cwd), not from the project
    env.pop("RQL_TRACEBACK", None)
    return env


def run(args: list[str], cwd: Path, timeout: float = 1800, env: dict | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group is killed."""
    process = subprocess.Popen(args, cwd=cwd, env=env or environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        out, err = process.communicate()
        err += f"\n(timed out after {timeout:.0f} s)"
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def dvc(*args: str, cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, timeout=timeout)


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["git", "-c", "user.name=hardening", "-c", "user.email=hardening@example.com", *args], repo)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=30)


def stage_pythons(root: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every process running from inside ``root`` (its cwd is there)."""
    found = []
    root = root.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cwd == root or root in cwd.parents:
            found.append((int(entry.name), cmdline))
    return found


def kill_leftovers(root: Path) -> list[tuple[int, str]]:
    """SIGKILL every process still running inside ``root`` (ours: started by an attack there); returns them."""
    leftovers = stage_pythons(root)
    for pid, _ in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def build_reference(workdir: Path, log=print) -> Path:
    """The tiny study, built once under ``workdir/reference`` (reused when a finished build is there)."""
    repo = workdir / "reference"
    marker = repo / ".hardening-built"
    if marker.is_file():
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    copy_project(repo)
    write_tiny_params(repo)
    run(["git", "init", "-q"], repo)
    dvc("remote", "modify", "local", "url", str(workdir / "remote"), cwd=repo)  # keeps the project's remote settings
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny study")
    log("building the tiny reference study (dvc repro) ...")
    started = time.monotonic()
    result = dvc("repro", cwd=repo, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"the reference build failed: {last_error_line(result.stderr)}")
    durations = stage_durations(result.stdout + result.stderr)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "results")
    push = dvc("push", cwd=repo)
    if push.returncode != 0:
        raise RuntimeError(f"dvc push of the reference failed: {last_error_line(push.stderr)}")
    (repo / ".hardening-durations.json").write_text(json.dumps(durations))
    marker.write_text(f"{time.monotonic() - started:.0f} s\n")
    log(f"reference built in {time.monotonic() - started:.0f} s")
    return repo


def stage_durations(log: str) -> dict[str, float]:
    """Not measurable from dvc's log: filled in by the kill campaign's own timed runs."""
    return {}


def clone_study(reference: Path, target: Path, with_cache: bool = True) -> Path:
    """A full copy of the built study (workspace, git, DVC cache) that an attack may break."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(reference, target, symlinks=True,
                    ignore=None if with_cache else shutil.ignore_patterns("cache"))
    # the copy's DVC cache links point into its own .dvc/cache (copytree copied the files, not links)
    return target
