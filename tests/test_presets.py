"""The shipped params files are valid and say what they promise."""

from __future__ import annotations

from pathlib import Path

from stages.core.presets import PRESETS, preset_for_dataset
from stages.params import load_params, resolve_agent

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.datasets == ["cube-single-play-v0"] and params.tasks == [2]
    assert set(params.agents.runs) == {"rql", "rql_cached", "rql_refresh", "fql", "bc_flow"}


def test_the_paper_preset_covers_the_papers_50_tasks_with_its_sizes_and_settings():
    params = load_params(ROOT / "stages" / "presets" / "paper.yaml")
    assert len(params.datasets) == 10 and params.tasks == [1, 2, 3, 4, 5] and len(params.study_tasks) == 50
    assert params.seeds == [0, 1, 2, 3]
    assert params.networks.actor == params.networks.critic == [512] * 4 and params.networks.ensemble == 10
    assert params.train.steps == 1_000_000 and params.train.eval_every == 100_000
    assert params.evaluate.episodes == params.train.eval_episodes == 50
    environments = {preset_for_dataset(dataset)[0] for dataset in params.datasets}
    assert environments == set(PRESETS)  # every per-environment setting of the reference is used
    scene = resolve_agent(params, "scene-play-v0")
    assert (scene.alpha, scene.expectile, scene.rho, scene.h, scene.sparse) == (3.0, 0.7, 0.5, 5, True)
    giant = resolve_agent(params, "antmaze-giant-navigate-v0")
    assert (giant.alpha, giant.h, giant.discount) == (0.1, 1, 0.995)


def test_the_long_puzzle_preset_is_ogbench_sized_with_the_papers_puzzle_settings():
    params = load_params(ROOT / "stages" / "presets" / "puzzle_long.yaml")
    assert params.datasets == ["puzzle-3x3-play-v0"] and len(params.tasks) >= 2
    assert params.data.episodes == 1000 and params.train.steps >= 200_000
    assert set(params.agents.runs) == {"rql", "fql", "bc_flow"}
    assert params.train.eval_episodes == params.evaluate.episodes == 50
    rql = resolve_agent(params, params.datasets[0])
    assert (rql.alpha, rql.expectile, rql.rho, rql.h, rql.sparse) == (1.0, 0.7, 0.5, 5, True)


def test_the_presets_are_the_reference_settings_file():
    """PRESETS is the reference's per-environment table (stages/reference/rql_hyperparameters.csv), entry for entry."""
    import csv
    import dataclasses

    with (ROOT / "stages" / "reference" / "rql_hyperparameters.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["environment"] for row in rows] == list(PRESETS)
    for row in rows:
        preset = dataclasses.asdict(PRESETS[row["environment"]])
        assert preset == {"alpha": float(row["alpha"]), "expectile": float(row["expectile"]),
                          "rho": float(row["rho"]), "h": int(row["h"]), "discount": float(row["discount"]),
                          "sparse": row["sparse_reward"] == "true"}, row["environment"]
