"""One bound per setting: params.yaml and the agent configs accept and refuse the same values."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from stages.core import bounds
from stages.core.agents import bc_flow, fql, rql
from stages.core.schedule import Schedule, schedule_problems
from stages.params import ParamsError, validate_params

ROOT = Path(__file__).resolve().parent.parent
BASE = {"obs_dim": 3, "action_dim": 2, "actor_hidden": (8,), "batch_size": 8}
CRITIC = {"critic_hidden": (8,)}
# params.yaml key, config class, config field, values at and beyond the bound's ends
SHARED = [
    ("agent.expectile", rql.Config, "expectile", [0.0, 1e-3, 0.999, 1.0]),
    ("agent.discount", rql.Config, "discount", [0.0, 0.5, 1.0]),
    ("agent.tau", rql.Config, "tau", [0.0, 0.5, 1.0, 1.5]),
    ("agent.ema", rql.Config, "ema", [0.0, 0.999, 1.0]),
    ("agent.ema", bc_flow.Config, "ema", [0.0, 0.999, 1.0]),
    ("agent.alpha", rql.Config, "alpha", [0.0, 0.1]),
    ("agent.rho", rql.Config, "rho", [-0.1, 0.0, 2.0]),
    ("agent.h", rql.Config, "h", [0, 1]),
    ("agent.lr", rql.Config, "lr", [0.0, 1e-4]),
    ("agent.batch_size", rql.Config, "batch_size", [1, 2]),
    ("fql.alpha", fql.Config, "alpha", [0.0, 3.0]),
    ("networks.ensemble", rql.Config, "ensemble", [0, 1]),
    ("flow.steps", rql.Config, "flow_steps", [0, 1]),
    ("reverse.iterations", rql.Config, "reversal_iterations", [0, 1]),
    ("reverse.tolerance", rql.Config, "reversal_tolerance", [0.0, 1e-6]),
]


def params_accept(key: str, value) -> bool:
    raw = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    section, name = key.split(".")
    raw[section][name] = value
    try:
        validate_params(raw)
    except ParamsError as exc:
        assert key in str(exc)
        return False
    return True


def config_accepts(config, field: str, value) -> bool:
    extra = {} if config is bc_flow.Config else CRITIC
    try:
        config(**{**BASE, **extra, field: value})
    except ValueError as exc:
        assert field.split("_")[0] in str(exc)
        return False
    return True


@pytest.mark.parametrize("key, config, field, values", SHARED, ids=[f"{s[0]}-{s[1].__module__}" for s in SHARED])
def test_params_and_the_agent_config_draw_the_same_line(key, config, field, values):
    decisions = [(value, params_accept(key, value), config_accepts(config, field, value)) for value in values]
    assert all(by_params == by_config for _, by_params, by_config in decisions), decisions
    assert {by_params for _, by_params, _ in decisions} == {True, False}  # each list crosses the bound


def test_a_bound_describes_itself_and_refuses_what_is_not_a_number():
    assert bounds.EXPECTILE.describe() == "in (0, 1)" and bounds.EMA.describe() == "in [0, 1)"
    assert bounds.COUNT.describe() == "> 0" and bounds.BATCH_SIZE.describe() == ">= 2"
    with pytest.raises(ValueError, match=r"expectile must be in \(0, 1\), got 1.0"):
        bounds.EXPECTILE.check("expectile", 1.0)
    assert not any(bounds.PESSIMISM.contains(v) for v in (float("nan"), "1", True, None))


def test_the_schedule_rules_are_the_ones_params_reports():
    """The same rule refuses a Schedule and the params that would build it, naming its own names each time."""
    problems = schedule_problems({"total_steps": 1000, "updates_per_call": 100, "log_every": 150,
                                  "checkpoint_every": 300, "refresh_every": 200})
    assert [name for name, _ in problems] == ["log_every", "checkpoint_every"]
    with pytest.raises(ValueError, match="log_every=150 must be a non-negative multiple of updates_per_call=100"):
        Schedule(total_steps=1000, updates_per_call=100, log_every=150, checkpoint_every=300, refresh_every=200)
    assert not params_accept("train.log_every", 150)
