"""A stage started by dvc dies with dvc, and its worker processes die with the stage: no orphan keeps writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``RQL_TEST_MARKER=marker`` (children inherit it)."""
    found = []
    needle = f"RQL_TEST_MARKER={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


# A stand-in for dvc: sets DVC_ROOT as dvc does, starts the stage command, then waits on it (until killed).
FAKE_DVC = """
import os, subprocess, sys
os.environ["DVC_ROOT"] = os.getcwd()
subprocess.Popen([sys.executable, "-m", "stages.download", "--dataset", "cube-single-play-v0"]).wait()
"""


def test_download_stage_and_its_generation_workers_die_with_dvc(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"source": "generate", "episodes": 40, "workers": 2})  # minutes of work
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    marker = uuid.uuid4().hex
    env = {**os.environ, "RQL_TEST_MARKER": marker, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    dvc = subprocess.Popen([sys.executable, "-c", FAKE_DVC], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the fake dvc, the stage and its 2 generation workers (+ multiprocessing's helper) are up
        assert wait_for(lambda: len(processes_with(marker)) >= 4, 120), processes_with(marker)
        time.sleep(2)
        dvc.kill()
        dvc.wait()
        assert wait_for(lambda: not processes_with(marker), 30), f"orphans left: {processes_with(marker)}"
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)
    out = tmp_path / "data" / "datasets" / "cube-single-play-v0"
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.npz")) if out.exists() else True  # nothing that looks finished


def test_without_dvc_a_stage_outlives_its_shell(tmp_path):
    """Run by hand (no DVC_ROOT), a stage is not tied to its parent: `nohup python -m stages.x &` keeps working."""
    marker = uuid.uuid4().hex
    code = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
            "'from stages import cli; cli.handle_sigterm(); import time; time.sleep(30)'])")
    env = {k: v for k, v in os.environ.items() if k != "DVC_ROOT"}
    env.update({"RQL_TEST_MARKER": marker, "PYTHONPATH": str(ROOT)})
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    try:
        assert wait_for(lambda: len(processes_with(marker)) == 1, 20)
        time.sleep(1)
        assert len(processes_with(marker)) == 1
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)
