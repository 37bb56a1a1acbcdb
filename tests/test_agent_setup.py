"""From params to runs: each agent name gets its algorithm, reversal mode and the dataset's preset settings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from stages.agent_setup import AGENT_NAMES, config_from_metadata, run_spec
from stages.params import validate_params

CUBE = "cube-single-play-v0"
SCENE = "scene-play-v0"


@pytest.fixture(scope="module")
def params():
    with open("params.yaml") as handle:
        raw = yaml.safe_load(handle)
    raw = copy.deepcopy(raw)
    raw["datasets"] = [CUBE, SCENE]
    return validate_params(raw)


@pytest.mark.parametrize(
    "name, algorithm, reversal, refresh",
    [("rql", "rql", "online", 0), ("rql_cached", "rql", "cached", 0), ("rql_refresh", "rql", "cached", "period"),
     ("fql", "fql", "none", 0), ("bc_flow", "bc_flow", "none", 0)],
)
def test_each_agent_name_maps_to_its_algorithm_and_reversal(params, name, algorithm, reversal, refresh):
    spec = run_spec(params, name, CUBE, obs_dim=28, action_dim=5)
    refresh = params.train.refresh_every if refresh == "period" else refresh
    assert refresh != 0 or name != "rql_refresh"
    assert (spec.algorithm, spec.reversal, spec.refresh_every) == (algorithm, reversal, refresh)
    assert spec.uses_cache == (reversal == "cached") == spec.starts_from_prior
    assert spec.config.obs_dim == 28 and spec.config.chunk_dim == 5 * spec.config.h
    if algorithm == "rql":
        assert spec.config.reversal == ("cached" if reversal == "cached" else "online")
        assert spec.config.reversal_method == params.agent.reversal_method


def test_the_dataset_preset_fills_the_null_agent_settings(params):
    scene = run_spec(params, "rql", SCENE, obs_dim=40, action_dim=5).config
    assert (scene.alpha, scene.expectile, scene.rho, scene.h) == (3.0, 0.7, 0.5, 5)  # the reference's scene-play
    assert run_spec(params, "fql", SCENE, obs_dim=40, action_dim=5).config.alpha == params.fql.alpha


def test_an_unknown_agent_is_refused(params):
    assert "iql" not in AGENT_NAMES
    with pytest.raises(ValueError, match="unknown agent 'iql'"):
        run_spec(params, "iql", CUBE, obs_dim=28, action_dim=5)


def test_a_policy_export_metadata_rebuilds_the_config(params):
    import dataclasses

    spec = run_spec(params, "fql", CUBE, obs_dim=28, action_dim=5)
    metadata = {"algorithm": "fql", "config": dataclasses.asdict(spec.config)}
    assert config_from_metadata(metadata) == ("fql", spec.config)
    with pytest.raises(ValueError, match="unknown algorithm 'sac'"):
        config_from_metadata({"algorithm": "sac", "config": {}})


def test_every_group_of_the_agent_table_has_its_params_list_and_its_two_stages():
    """stages/agent_registry.py is the one table: params.yaml's agents and dvc.yaml's stages follow it."""
    from stages.agent_registry import AGENTS, groups

    root = Path(__file__).resolve().parent.parent
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    default = yaml.safe_load((root / "params.yaml").read_text())["agents"]
    assert set(default) == set(groups())
    for group, names in groups().items():
        for stage in (f"train_{group}", f"evaluate_{group}"):
            assert stages[stage]["matrix"]["agent"] == f"${{agents.{group}}}", stage
        assert set(default[group]) <= set(names)
    assert {name for names in groups().values() for name in names} == set(AGENTS) == set(AGENT_NAMES)


def test_a_run_name_outside_its_group_is_refused_naming_the_allowed_ones(params):
    from stages.params import ParamsError

    raw = params.model_dump(mode="json")
    raw["agents"]["fql"] = ["rql"]
    with pytest.raises(ParamsError, match=r"agents\.fql\[0\]: Input should be 'fql'"):
        validate_params(raw)
