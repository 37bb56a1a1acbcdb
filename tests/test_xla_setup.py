"""The project's XLA flags: added when missing, a user's own setting of a flag always wins."""

from stages.core import xla_setup


def _names(flags: str) -> list[str]:
    return [f.split("=", 1)[0] for f in flags.split()]


def test_flags_added_to_an_empty_environment():
    env: dict[str, str] = {}
    value = xla_setup.apply(env)
    assert value == env["XLA_FLAGS"]
    assert set(_names(value)) == {f.split("=", 1)[0] for f in xla_setup.FLAGS}


def test_user_flags_kept_and_user_values_win():
    flag = xla_setup.FLAGS[0].split("=", 1)[0]
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


def test_flags_are_active_in_this_process():
    import os

    present = _names(os.environ.get("XLA_FLAGS", ""))
    for flag in xla_setup.FLAGS:
        assert flag.split("=", 1)[0] in present
