"""The project's XLA flags: added when missing, a user's own setting of a flag always wins."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core import xla_setup


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def _names(flags: str) -> list[str]:
    return [_name(f) for f in flags.split()]


def test_flags_added_to_an_empty_environment():
    env: dict[str, str] = {}
    value = xla_setup.apply(env)
    assert value == env["XLA_FLAGS"]
    assert set(_names(value)) == {_name(f) for f in xla_setup.FLAGS}


def test_user_flags_kept_and_user_values_win():
    flag = _name(xla_setup.FLAGS[0])
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {flag}=false"}
    value = xla_setup.apply(env)
    assert "--xla_force_host_platform_device_count=2" in value.split()
    assert f"{flag}=false" in value.split()
    assert _names(value).count(flag) == 1


def test_apply_is_idempotent():
    env: dict[str, str] = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    first = xla_setup.apply(env)
    assert xla_setup.apply(env) == first
    assert first.split()[0] == "--xla_dump_to=/tmp/x"


def test_importing_any_core_module_sets_the_flags_in_a_fresh_process():
    code = "import os, stages.core.shards; print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert set(_names(out.stdout)) == {_name(f) for f in xla_setup.FLAGS}


RECORD_BACKEND_START = """
import os, runpy, sys
from jax._src import xla_bridge
seen = []
original = xla_bridge.backends
def recording():
    if not seen:
        seen.append(os.environ.get("XLA_FLAGS", ""))
    return original()
xla_bridge.backends = recording
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print("XLA_FLAGS when JAX's backend started:", seen[0] if seen else "never started")
"""


@pytest.mark.parametrize("stage,args", [
    ("stages.prior", ["--dataset", "cube-single-play-v0"]),
    ("stages.evaluate", ["--agent", "rql", "--dataset", "cube-single-play-v0", "--task", "2", "--seed", "0"]),
])
def test_a_real_stage_starts_jax_with_the_flags(tmp_path, stage, args):
    """The stage's own entry point, as DVC runs it: the flags are in XLA_FLAGS when its backend starts (the
    stage then fails on its missing input, which is fine here)."""
    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(root)
    env["JAX_PLATFORMS"] = "cpu"
    env["RQL_JAX_CACHE"] = "off"
    out = subprocess.run([sys.executable, "-c", RECORD_BACKEND_START, stage, *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("XLA_FLAGS when")]
    assert line, out.stdout + out.stderr
    started_with = line[0].split(":", 1)[1].split()
    assert set(_names(" ".join(started_with))) >= {_name(f) for f in xla_setup.FLAGS}, line[0]
    assert "not applied" not in out.stderr
    assert "error:" in out.stderr  # it went on to its (missing) input
