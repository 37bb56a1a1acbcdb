"""params.yaml validation (datasets x task numbers), task naming and preset resolution."""

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from stages.core.ogbench_names import (
    dataset_for_task,
    env_for_task,
    large_dataset_stem,
    parse_dataset,
    parse_task,
    task_name,
    task_numbers,
)
from stages.core.presets import PRESETS
from stages.params import (
    ParamsError,
    load_params,
    resolve_agent,
    resolve_sparse,
    validate_params,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_changes(raw: dict, **sections) -> dict:
    """A copy of raw params with `section={key: value}` updates; a top-level value replaces the key."""
    new = copy.deepcopy(raw)
    for key, value in sections.items():
        if isinstance(value, dict) and key in new:
            new[key].update(value)
        else:
            new[key] = value
    return new


def error_of(raw: dict) -> str:
    with pytest.raises(ParamsError) as info:
        validate_params(raw)
    return str(info.value)


def test_default_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.datasets == ["cube-single-play-v0"] and params.tasks == [2]
    assert [task.name for task in params.study_tasks] == ["cube-single-play-singletask-task2-v0"]
    assert params.data.source == "auto"
    assert params.data.episode_counts(1000) == (params.data.episodes, params.data.episodes // 10)


@pytest.mark.parametrize(
    "task, dataset, env",
    [
        ("cube-single-play-singletask-task2-v0", "cube-single-play-v0", "cube-single-singletask-task2-v0"),
        ("puzzle-3x3-noisy-singletask-v0", "puzzle-3x3-noisy-v0", "puzzle-3x3-singletask-v0"),
        (
            "puzzle-4x4-play-100m-singletask-task1-v0",
            "puzzle-4x4-play-100m-v0",
            "puzzle-4x4-singletask-task1-v0",
        ),
        (
            "cube-quadruple-play-100m-singletask-task1-v0",
            "cube-quadruple-play-100m-v0",
            "cube-quadruple-singletask-task1-v0",
        ),
        (
            "pointmaze-medium-navigate-singletask-task3-v0",
            "pointmaze-medium-navigate-v0",
            "pointmaze-medium-singletask-task3-v0",
        ),
        (
            "antmaze-large-navigate-singletask-task5-v0",
            "antmaze-large-navigate-v0",
            "antmaze-large-singletask-task5-v0",
        ),
    ],
)
def test_task_names_map_to_ogbench_dataset_and_env(task, dataset, env):
    assert dataset_for_task(task) == dataset
    assert env_for_task(task) == env


def test_large_dataset_files_are_named_after_the_one_million_dataset():
    spec = parse_task("puzzle-4x4-play-100m-singletask-task1-v0")
    assert spec.is_large and spec.shard_stem == "puzzle-4x4-play-v0"
    assert not parse_task("cube-single-play-singletask-task2-v0").is_large


@pytest.mark.parametrize(
    "dataset, number, task",
    [
        ("cube-single-play-v0", 2, "cube-single-play-singletask-task2-v0"),
        ("cube-double-noisy-v0", 5, "cube-double-noisy-singletask-task5-v0"),
        ("puzzle-4x4-play-100m-v0", 1, "puzzle-4x4-play-100m-singletask-task1-v0"),
        ("antmaze-large-navigate-v0", 3, "antmaze-large-navigate-singletask-task3-v0"),
    ],
)
def test_a_dataset_and_a_task_number_make_the_ogbench_singletask_name(dataset, number, task):
    assert task_name(dataset, number) == task
    spec = parse_task(task)  # a registered task of that dataset
    assert (spec.dataset, spec.task_id) == (dataset, number)
    assert task_numbers(dataset) == (1, 2, 3, 4, 5)


def test_the_study_is_every_task_number_on_every_dataset_dataset_by_dataset(raw):
    params = validate_params(with_changes(raw, datasets=["scene-play-v0", "cube-single-play-v0"], tasks=[4, 1]))
    assert [(t.dataset, t.number) for t in params.study_tasks] == [
        ("scene-play-v0", 4), ("scene-play-v0", 1), ("cube-single-play-v0", 4), ("cube-single-play-v0", 1)]
    assert params.study_tasks[0].name == "scene-play-singletask-task4-v0"


@pytest.mark.parametrize(
    "dataset, fragment",
    [
        ("blah", "not an OGBench dataset name"),
        ("cube-single-play-singletask-task2-v0", "not an OGBench dataset name"),
        ("cube-sextuple-play-v0", "unknown OGBench environment 'cube-sextuple'"),
        ("cube-single-navigate-v0", "no 'navigate' dataset for cube-single"),
        ("antmaze-giant-explore-v0", "no 'explore' dataset for antmaze-giant"),
        ("puzzle-4x4-play-10m-v0", "unknown dataset size '10m'"),
        ("antmaze-large-navigate-100m-v0", "100m datasets only for manipulation"),
        ("visual-cube-single-play-v0", "pixel-based"),
        ("cube-single-play-v1", "registers no singletask environment"),
    ],
)
def test_unknown_datasets_are_rejected_at_their_list_index(raw, dataset, fragment):
    message = error_of(with_changes(raw, datasets=["cube-single-play-v0", dataset]))
    assert "- datasets[1]: " in message and fragment in message and dataset in message
    assert len(message.splitlines()) == 2  # the head line and one line for the one bad value


@pytest.mark.parametrize(
    "tasks, key, fragment",
    [
        ([2, 6], "tasks[1]",
         "task 6 does not exist for datasets[0] (cube-single-play-v0): OGBench registers tasks 1, 2, 3, 4, 5 for it"),
        ([0], "tasks[0]", "greater than or equal to 1"),
        (["2"], "tasks[0]", "valid integer"),
        ([2, 2], "tasks", "duplicate entries: 2"),
        ([], "tasks", "at least 1 item"),
    ],
)
def test_bad_task_numbers_name_their_key_and_value(raw, tasks, key, fragment):
    message = error_of(with_changes(raw, tasks=tasks))
    assert f"- {key}: " in message and fragment in message, message


@pytest.mark.parametrize(
    "changes, key, fragment",
    [
        ({"data": {"episodes": 0}}, "data.episodes", "greater than 0"),
        ({"data": {"workers": -2}}, "data.workers", "greater than 0"),
        ({"data": {"val_episodes": 0}}, "data.val_episodes", "greater than 0"),
        ({"data": {"episode_steps": 1}}, "data.episode_steps", "greater than or equal to 2"),
        ({"data": {"shards": 101}}, "data.shards", "less than or equal to 100"),
        ({"data": {"source": "http"}}, "data.source", "'auto', 'download' or 'generate'"),
        ({"data": {"sparse": "maybe"}}, "data.sparse", "must be auto, true or false"),
        ({"data": {"episodes": True}}, "data.episodes", "valid integer"),
        ({"data": {"episodes": 2.5}}, "data.episodes", "valid integer"),
        ({"networks": {"actor": [256, 0]}}, "networks.actor[1]", "greater than 0"),
        ({"networks": {"critic": []}}, "networks.critic", "at least 1 item"),
        ({"agent": {"expectile": 1.0}}, "agent.expectile", "less than 1"),
        ({"agent": {"lr": -1e-3}}, "agent.lr", "greater than 0"),
        ({"agent": {"preset": "paper"}}, "agent.preset", "unknown preset 'paper'"),
        ({"reverse": {"method": "rk4"}}, "reverse.method", "'exact' or 'euler'"),
        ({"train": {"device": "tpu"}}, "train.device", "'auto', 'cpu' or 'gpu'"),
        ({"evaluate": {"video": "yes"}}, "evaluate.video", "valid boolean"),
        ({"agents": {"fql": ["fql", "iql"]}}, "agents.fql[1]", "Input should be 'fql'"),
        ({"agents": {"rql_cached": ["rql"]}}, "agents.rql_cached[0]", "'rql_cached' or 'rql_refresh'"),
        ({"agents": {"rql": ["rql", "rql"]}}, "agents.rql", "duplicate entries: rql"),
        ({"agents": ["rql", "fql"]}, "agents", "valid dictionary"),
        ({"agents": {"rql": [], "rql_cached": [], "fql": [], "bc_flow": []}}, "agents", "every group is empty"),
        ({"seeds": [0, 1, 0]}, "seeds", "duplicate entries: 0"),
        ({"seeds": []}, "seeds", "at least 1 item"),
        ({"datasets": ["cube-single-play-v0"] * 2}, "datasets", "duplicate entries: cube-single-play-v0"),
        ({"datasets": []}, "datasets", "at least 1 item"),
    ],
)
def test_bad_values_name_their_key(raw, changes, key, fragment):
    message = error_of(with_changes(raw, **changes))
    assert f"- {key}: " in message and fragment in message


def test_unknown_keys_are_named_with_their_path_and_the_allowed_keys(raw):
    message = error_of(with_changes(raw, data={"episode": 5}, extra_section={"x": 1}))
    assert "- data.episode: unknown key (allowed here: source, episodes," in message
    assert "- extra_section: unknown key" in message
    assert message.startswith("params: 2 invalid settings")


def test_missing_keys_are_named(raw):
    broken = copy.deepcopy(raw)
    del broken["train"]["steps"]
    del broken["flow"]
    message = error_of(broken)
    assert "- train.steps: missing" in message and "- flow: missing" in message


@pytest.mark.parametrize(
    "changes, key, fragment",
    [
        ({"train": {"refresh_every": 0}}, "train.refresh_every", "rql_refresh agent needs refresh_every > 0"),
        ({"train": {"checkpoint_every": 7500}}, "train.checkpoint_every", "multiple of train.refresh_every=5000"),
        ({"prior": {"steps": 150}}, "prior.steps", "multiple of train.updates_per_call=100"),
        ({"train": {"log_every": 150}}, "train.log_every", "multiple of train.updates_per_call=100"),
        ({"evaluate": {"workers": 30, "envs": 25}}, "evaluate.workers", "workers=30 > envs=25"),
        (
            {"datasets": ["antmaze-large-navigate-v0"], "data": {"source": "generate"}},
            "data",
            "expert policies whose weights are only on the OGBench server",
        ),
        (
            {"datasets": ["antmaze-large-navigate-v0"], "data": {"source": "auto", "episodes": 10}},
            "data",
            "download it (data.episodes: null",
        ),
        ({"data": {"source": "download", "episodes": 10}}, "data.episodes", "set episodes: null to download"),
        ({"data": {"episode_steps": 5}}, "data.episode_steps", "fewer than the action chunk h=5"),
    ],
)
def test_inconsistent_settings_name_their_key(raw, changes, key, fragment):
    message = error_of(with_changes(raw, **changes))
    assert f"- {key}: " in message and fragment in message


def test_switching_a_group_off_takes_one_change_and_warns_about_the_unused_period(raw, caplog):
    """agents.rql_cached=[] alone is valid: train.refresh_every, which only rql_refresh reads, gets a warning."""
    params = validate_params(with_changes(raw, agents={"rql_cached": []}))
    assert params.agents.rql_cached == [] and params.train.refresh_every == 5000
    assert "train.refresh_every=5000 is not used: no configured agent refreshes its cache" in caplog.text
    caplog.clear()
    validate_params(raw)
    assert "is not used" not in caplog.text


def test_consistent_variants_are_accepted(raw):
    validate_params(with_changes(raw, train={"refresh_every": 500, "checkpoint_every": 2500}))
    validate_params(with_changes(raw, agents={"rql_cached": ["rql_cached"]}, train={"refresh_every": 0}))
    validate_params(with_changes(raw, evaluate={"episodes": 10, "envs": 25, "workers": 25}))
    validate_params(with_changes(raw, agent={"lr": "1e-4"}))  # PyYAML reads 1e-4 as a string


def test_load_params_reports_file_and_yaml_problems(tmp_path):
    with pytest.raises(ParamsError, match="cannot read the params file"):
        load_params(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [a, b\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(scalar)


def test_auto_preset_follows_each_datasets_environment(raw):
    datasets = ["cube-double-play-v0", "puzzle-4x4-play-100m-v0"]
    params = validate_params(with_changes(raw, datasets=datasets))
    double = resolve_agent(params, datasets[0])
    assert (double.preset, double.alpha, double.expectile, double.h, double.sparse) == (
        "cube-double-play",
        10.0,
        0.9,
        5,
        False,
    )
    puzzle = resolve_agent(params, datasets[1])
    assert (puzzle.preset, puzzle.alpha, puzzle.expectile, puzzle.sparse) == (
        "puzzle-4x4-play",
        1.0,
        0.9,
        True,
    )


def test_datasets_without_preset_get_the_documented_default(raw):
    params = validate_params(raw)
    agent = resolve_agent(params, "cube-single-play-v0")
    assert (agent.preset, agent.alpha, agent.expectile, agent.rho, agent.h, agent.discount, agent.sparse) == (
        "default",
        3.0,
        0.9,
        0.5,
        5,
        0.99,
        False,
    )
    # The reference's sparse rule is per family: an unlisted puzzle still gets sparse rewards.
    puzzle = "puzzle-4x5-play-v0"
    assert resolve_sparse(validate_params(with_changes(raw, datasets=[puzzle])), puzzle) is True


def test_explicit_values_override_the_preset_and_named_presets_apply_to_all(raw):
    dataset = "humanoidmaze-medium-navigate-v0"
    params = validate_params(with_changes(raw, datasets=[dataset], agent={"alpha": 0.7, "preset": "auto"},
                                          data={"episodes": None}))
    agent = resolve_agent(params, dataset)
    assert agent.alpha == 0.7 and agent.discount == 0.995 and agent.rho == 0.0 and agent.h == 1
    named = validate_params(with_changes(raw, agent={"preset": "scene-play"}))
    agent = resolve_agent(named, "cube-single-play-v0")
    assert (agent.preset, agent.alpha, agent.expectile) == ("scene-play", PRESETS["scene-play"].alpha, 0.7)
    assert agent.sparse is False  # sparse follows the dataset's environment, not the borrowed preset


def test_explicit_sparse_overrides_auto(raw):
    params = validate_params(with_changes(raw, data={"sparse": True}))
    assert resolve_sparse(params, "cube-single-play-v0") is True


def test_params_are_immutable(raw):
    params = validate_params(raw)
    with pytest.raises(ValidationError, match="frozen"):
        params.data.episodes = 5


def test_environment_names_follow_the_papers_tables():
    environment = {task: parse_task(task).environment for task in (
        "cube-single-play-singletask-task2-v0", "cube-single-noisy-singletask-task1-v0",
        "puzzle-4x4-play-100m-singletask-task3-v0", "scene-play-singletask-task2-v0",
        "antmaze-large-stitch-singletask-task1-v0")}
    assert list(environment.values()) == ["cube-single", "cube-single-noisy", "puzzle-4x4-100m", "scene",
                                          "antmaze-large-stitch"]
    assert parse_task("cube-single-play-singletask-task2-v0").key == "cube-single-play-task2"


def test_dataset_names_parse_to_the_same_facts_as_their_tasks():
    task = parse_task("puzzle-4x4-play-100m-singletask-task1-v0")
    dataset = parse_dataset(task.dataset)
    assert (dataset.family, dataset.dataset_type, dataset.size, dataset.shard_stem) == (
        "puzzle-4x4", "play", "100m", "puzzle-4x4-play-v0")
    assert dataset.has_buttons and dataset.sparse_family and dataset.is_manipulation
    assert large_dataset_stem(task.dataset) == "puzzle-4x4-play-v0" and large_dataset_stem("scene-play-v0") is None
    assert parse_dataset("antmaze-large-navigate-v0").needs_expert_weights
    with pytest.raises(ValueError, match="not an OGBench dataset name"):
        parse_dataset("cube-single")


def test_paper_numbers_are_found_by_task_name():
    from stages.core.paper_numbers import paper_success

    assert paper_success("rql", "scene-play-singletask-task2-v0") == 72.0
    assert paper_success("rql", "puzzle-4x4-play-100m-singletask-task1-v0") is not None
    assert paper_success("rql", "cube-single-play-singletask-task2-v0") is None
    assert paper_success("rql", "not-a-task") is None
