"""The project's XLA flags: added when missing, a user's own setting of a flag always wins."""

import os
import subprocess
import sys
from pathlib import Path

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
