"""OGBench dataset files: generation with OGBench's oracles, deterministic atomic writes, validation, and loading
with OGBench's own loader and relabelling, checked against the environments' own success functions."""

import zipfile
from pathlib import Path

import gymnasium
import numpy as np
import ogbench
import pytest

from stages.core.ogbench_data import (
    DatasetFileError,
    check_raw_arrays,
    dataset_files,
    episode_lengths,
    load_behaviour_data,
    load_training_data,
    make_task_env,
    read_npz,
    sparsify_rewards,
    validate_raw_file,
    write_npz,
)
from stages.core.ogbench_generate import (
    ExpertWeightsRequired,
    GenerationError,
    _scene_episode_is_healthy,
    generate_episode,
    generate_splits,
    make_collection_env,
    recipe_for_dataset,
)
from stages.core.ogbench_names import env_for_task, large_dataset_stem, parse_dataset, task_name

pytestmark = pytest.mark.filterwarnings("ignore:.*precision lowered by casting to float32")

STEPS = 40  # rows per generated test episode (OGBench: 1001)

# (task, dataset) generated once per module: one manipulation env without buttons, one with, and a maze.
CASES = {
    "cube": ("cube-single-play-singletask-task2-v0", "cube-single-play-v0"),
    "puzzle": ("puzzle-3x3-play-singletask-task4-v0", "puzzle-3x3-play-v0"),
    "pointmaze": ("pointmaze-medium-navigate-singletask-task1-v0", "pointmaze-medium-navigate-v0"),
}


def env_name(task: str) -> str:
    return env_for_task(task)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """Two train + one val episodes of each case, written as OGBench files."""
    folder = tmp_path_factory.mktemp("datasets")
    for _, dataset in CASES.values():
        splits = generate_splits(
            recipe_for_dataset(dataset, episode_steps=STEPS),
            episodes=2,
            val_episodes=1,
            seed=7,
            progress=False,
        )
        write_npz(folder / f"{dataset}.npz", splits["train"])
        write_npz(folder / f"{dataset}-val.npz", splits["val"])
    return folder


@pytest.fixture(scope="module")
def raw_cube(dataset_dir) -> dict[str, np.ndarray]:
    return read_npz(dataset_dir / "cube-single-play-v0.npz")


# ---------------------------------------------------------------------------------------------------------------------
# Generated files: OGBench's raw format
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, keys, buttons",
    [
        ("cube", {"observations", "actions", "terminals", "qpos", "qvel"}, False),
        ("puzzle", {"observations", "actions", "terminals", "qpos", "qvel", "button_states"}, True),
        ("pointmaze", {"observations", "actions", "terminals", "qpos", "qvel"}, False),
    ],
)
def test_generated_files_have_ogbench_keys_dtypes_and_episode_layout(dataset_dir, case, keys, buttons):
    _, dataset = CASES[case]
    arrays = read_npz(dataset_dir / f"{dataset}.npz")
    assert set(arrays) == keys
    assert arrays["observations"].dtype == np.float32 and arrays["actions"].dtype == np.float32
    assert arrays["terminals"].dtype == bool and arrays["qpos"].dtype == np.float32
    if buttons:
        assert arrays["button_states"].dtype == np.int64
    summary = validate_raw_file(dataset_dir / f"{dataset}.npz", button_states=buttons, episode_length=STEPS)
    assert (summary.rows, summary.episodes) == (2 * STEPS, 2)
    assert list(np.flatnonzero(arrays["terminals"])) == [STEPS - 1, 2 * STEPS - 1]
    assert validate_raw_file(dataset_dir / f"{dataset}-val.npz", episode_length=STEPS).episodes == 1
    assert np.abs(arrays["actions"]).max() <= 1.0


@pytest.mark.parametrize("case", CASES)
def test_stored_state_is_the_state_each_observation_was_taken_in(dataset_dir, case):
    """qpos/qvel are OGBench's `prev_*` values: rebuilding the observation from them reproduces the stored one."""
    task, dataset = CASES[case]
    arrays = read_npz(dataset_dir / f"{dataset}.npz")
    env = gymnasium.make(env_name(task))
    env.reset(seed=0)
    unwrapped = env.unwrapped
    for row in range(0, len(arrays["terminals"]), 5):
        qpos, qvel = arrays["qpos"][row].astype(np.float64), arrays["qvel"][row].astype(np.float64)
        if case == "pointmaze":
            unwrapped.set_state(qpos, qvel)
            np.testing.assert_allclose(unwrapped.get_ob(), arrays["observations"][row], atol=1e-6)
        else:
            if case == "puzzle":
                unwrapped.set_state(qpos, qvel, arrays["button_states"][row])
            else:
                unwrapped.set_state(qpos, qvel)
            # Arm joint positions and velocities come straight from qpos/qvel (other parts are derived quantities
            # that MuJoCo leaves one physics substep stale after mj_step).
            np.testing.assert_allclose(
                unwrapped.compute_observation()[:12], arrays["observations"][row, :12], atol=1e-5
            )


# ---------------------------------------------------------------------------------------------------------------------
# Loading with OGBench's own loader and relabelling
# ---------------------------------------------------------------------------------------------------------------------


def plant_successes(case: str, env, arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Put the task's goal into the stored state of `rows` (so the success branch of relabelling is exercised)."""
    planted = {key: value.copy() for key, value in arrays.items()}
    unwrapped = env.unwrapped
    if case == "cube":
        planted["qpos"][rows, 14:17] = unwrapped._data.mocap_pos[0]
    elif case == "puzzle":
        planted["button_states"][rows] = unwrapped._target_button_states
    else:
        planted["qpos"][rows, :2] = unwrapped.cur_goal_xy
    return planted


def env_success(case: str, env, arrays: dict[str, np.ndarray], row: int) -> tuple[int, int]:
    """(satisfied subgoals, all subgoals) of one stored state by the environment's own success check."""
    unwrapped = env.unwrapped
    qpos, qvel = arrays["qpos"][row].astype(np.float64), arrays["qvel"][row].astype(np.float64)
    if case == "pointmaze":
        unwrapped.set_state(qpos, qvel)
        return int(unwrapped.compute_success()), 1
    if case == "puzzle":
        unwrapped.set_state(qpos, qvel, arrays["button_states"][row])
    else:
        unwrapped.set_state(qpos, qvel)
    successes = unwrapped._compute_successes()
    return int(sum(successes)), len(successes)


@pytest.mark.parametrize("case", CASES)
def test_training_data_matches_ogbench_loader_and_env_success(dataset_dir, tmp_path, case):
    task, dataset = CASES[case]
    raw = read_npz(dataset_dir / f"{dataset}.npz")
    env = gymnasium.make(env_name(task))
    env.reset(seed=0)
    planted_rows = np.array([3, 17, STEPS + 5])
    write_npz(tmp_path / f"{dataset}.npz", plant_successes(case, env, raw, planted_rows))
    write_npz(tmp_path / f"{dataset}-val.npz", read_npz(dataset_dir / f"{dataset}-val.npz"))

    _, train, val = ogbench.make_env_and_datasets(task, dataset_dir=str(tmp_path), compact_dataset=False)
    data = load_training_data(tmp_path / f"{dataset}.npz", env_name(task), sparse=False, env=env)

    assert set(data) == {"observations", "actions", "rewards", "masks", "terminals", "next_observations"}
    assert all(value.dtype == np.float32 for value in data.values())
    for key in data:
        np.testing.assert_array_equal(data[key], train[key], err_msg=key)
    rows = 2 * (STEPS - 1)  # each episode's last raw row only serves as the previous row's next observation
    assert data["observations"].shape == (rows, raw["observations"].shape[1])
    assert data["actions"].shape == (rows, raw["actions"].shape[1])
    assert list(np.flatnonzero(data["terminals"])) == [STEPS - 2, rows - 1]
    np.testing.assert_array_equal(data["next_observations"][: STEPS - 2], data["observations"][1 : STEPS - 1])
    np.testing.assert_array_equal(data["next_observations"][STEPS - 2], raw["observations"][STEPS - 1])
    assert len(val["observations"]) == STEPS - 1

    # Rewards and masks against the env's own success check, on sampled and planted stored states.
    raw_rows = np.concatenate(
        [np.arange(STEPS - 1), np.arange(STEPS, 2 * STEPS - 1)]
    )  # raw row of each transition
    planted = read_npz(tmp_path / f"{dataset}.npz")
    for index in sorted({*range(0, rows, 4), *[int(np.flatnonzero(raw_rows == r)[0]) for r in planted_rows]}):
        satisfied, total = env_success(case, env, planted, raw_rows[index])
        assert data["rewards"][index] == satisfied - total, index
        assert data["masks"][index] == float(satisfied < total), index
    assert (data["masks"] == 0).sum() >= len(planted_rows)


def test_sparse_rewards_are_minus_one_unless_solved(dataset_dir):
    task, dataset = CASES["puzzle"]
    env = gymnasium.make(env_name(task))
    dense = load_training_data(dataset_dir / f"{dataset}.npz", env_name(task), sparse=False, env=env)
    sparse = load_training_data(dataset_dir / f"{dataset}.npz", env_name(task), sparse=True, env=env)
    np.testing.assert_array_equal(sparse["rewards"], np.where(dense["rewards"] != 0, -1.0, 0.0))
    assert dense["rewards"].min() < -1  # puzzle rewards count unsolved buttons; sparse ones do not
    np.testing.assert_array_equal(sparsify_rewards(np.array([0.0, -3.0, -1.0])), [0.0, -1.0, -1.0])


def test_behaviour_data_is_the_training_data_of_every_task_without_rewards(dataset_dir):
    """What the BC prior and the reversal cache read (observations, actions, episode ends) is the same whatever the
    task; without one, rewards are 0 and masks 1."""
    _, dataset = CASES["puzzle"]
    behaviour = load_behaviour_data(dataset_dir / f"{dataset}.npz", parse_dataset(dataset).default_env)
    for number in (1, 4):
        relabelled = load_training_data(dataset_dir / f"{dataset}.npz", env_name(task_name(dataset, number)),
                                        sparse=True)
        for key in ("observations", "actions", "terminals", "next_observations"):
            np.testing.assert_array_equal(behaviour[key], relabelled[key], err_msg=key)
    assert set(behaviour) == set(relabelled) and all(v.dtype == np.float32 for v in behaviour.values())
    assert not behaviour["rewards"].any() and (behaviour["masks"] == 1).all()


def test_large_datasets_stream_file_by_file(dataset_dir, tmp_path):
    task, dataset = CASES["pointmaze"]
    folder = tmp_path / "pointmaze-medium-navigate-100m-v0"
    folder.mkdir()
    stem = large_dataset_stem(folder.name)
    assert stem == "pointmaze-medium-navigate-v0" and large_dataset_stem(dataset) is None
    source = read_npz(dataset_dir / f"{dataset}.npz")
    for index in (1, 0):  # written out of order: listing sorts them
        shifted = {**source, "observations": source["observations"] + index}
        write_npz(folder / f"{stem}-{index:03d}.npz", shifted)
        write_npz(folder / f"{stem}-{index:03d}-val.npz", source)
    pairs = dataset_files(folder, folder.name)  # the dataset's own folder
    assert [p.name for p, _ in pairs] == [f"{stem}-000.npz", f"{stem}-001.npz"]
    assert [v.name for _, v in pairs] == [f"{stem}-000-val.npz", f"{stem}-001-val.npz"]
    env = make_task_env(env_name(task))
    first, second = (load_training_data(path, env_name(task), sparse=False, env=env) for path, _ in pairs)
    np.testing.assert_allclose(second["observations"], first["observations"] + 1)


def test_dataset_files_name_what_is_missing(dataset_dir, tmp_path):
    assert dataset_files(dataset_dir, "cube-single-play-v0") == [
        (dataset_dir / "cube-single-play-v0.npz", dataset_dir / "cube-single-play-v0-val.npz")
    ]
    with pytest.raises(DatasetFileError, match=r"scene-play-v0\.npz: file not found"):
        dataset_files(dataset_dir, "scene-play-v0")
    with pytest.raises(DatasetFileError, match="no files puzzle-4x4-play-v0-NNN.npz"):
        dataset_files(tmp_path, "puzzle-4x4-play-100m-v0")


# ---------------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays_and_bytes_and_another_seed_differs(tmp_path):
    recipe = recipe_for_dataset("pointmaze-medium-navigate-v0", episode_steps=STEPS)
    runs = [
        generate_splits(recipe, episodes=2, val_episodes=1, seed=seed, progress=False) for seed in (3, 3, 4)
    ]
    for key in runs[0]["train"]:
        np.testing.assert_array_equal(runs[0]["train"][key], runs[1]["train"][key])
    assert not np.array_equal(runs[0]["train"]["observations"], runs[2]["train"]["observations"])
    for index, run in enumerate(runs):
        write_npz(tmp_path / f"{index}.npz", run["train"])
    assert (tmp_path / "0.npz").read_bytes() == (tmp_path / "1.npz").read_bytes()
    assert (tmp_path / "0.npz").read_bytes() != (tmp_path / "2.npz").read_bytes()


def test_an_episode_depends_only_on_its_seed_not_on_what_ran_before():
    recipe = recipe_for_dataset("cube-single-play-v0", episode_steps=STEPS)
    env = make_collection_env(recipe)
    in_sequence = [generate_episode(env, recipe, seed=1, split="train", shard=0, episode=i) for i in range(2)]
    alone = generate_episode(make_collection_env(recipe), recipe, seed=1, split="train", shard=0, episode=1)
    for key in alone:
        np.testing.assert_array_equal(alone[key], in_sequence[1][key])
    assert not np.array_equal(in_sequence[0]["observations"], in_sequence[1]["observations"])
    other_shard = generate_episode(env, recipe, seed=1, split="train", shard=1, episode=1)
    assert not np.array_equal(other_shard["observations"], alone["observations"])


def test_worker_processes_do_not_change_the_result():
    recipe = recipe_for_dataset("pointmaze-medium-navigate-v0", episode_steps=20)
    serial = generate_splits(recipe, episodes=2, val_episodes=1, seed=5, workers=1, progress=False)
    parallel = generate_splits(recipe, episodes=2, val_episodes=1, seed=5, workers=2, progress=False)
    for split in serial:
        for key in serial[split]:
            np.testing.assert_array_equal(serial[split][key], parallel[split][key])


# ---------------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------------


def test_recipes_follow_ogbench():
    play = recipe_for_dataset("cube-double-play-v0")
    assert (play.env_id, play.episode_steps, play.noise, play.noise_smoothing, play.p_random_action) == (
        "cube-double-v0",
        1001,
        0.1,
        0.5,
        0.0,
    )
    assert recipe_for_dataset("puzzle-3x3-noisy-v0").p_random_action == 0.2
    assert recipe_for_dataset("cube-single-noisy-v0").p_random_action == 0.1
    assert recipe_for_dataset("puzzle-4x4-play-100m-v0").env_id == "puzzle-4x4-v0"
    maze = recipe_for_dataset("pointmaze-giant-navigate-v0")
    assert (maze.noise, maze.episode_steps, maze.ogbench_episodes) == (0.5, 2001, 500)
    assert recipe_for_dataset("pointmaze-large-stitch-v0").episode_steps == 201
    assert recipe_for_dataset("cube-triple-play-v0").ogbench_episodes == 3000


def test_noisy_datasets_generate_in_ogbench_format():
    recipe = recipe_for_dataset("puzzle-3x3-noisy-v0", episode_steps=25)
    splits = generate_splits(recipe, episodes=1, val_episodes=1, seed=0, progress=False)
    assert check_raw_arrays(splits["train"], button_states=True, episode_length=25).rows == 25


@pytest.mark.parametrize(
    "dataset", ["antmaze-large-navigate-v0", "humanoidmaze-medium-navigate-v0", "antsoccer-arena-navigate-v0"]
)
def test_expert_datasets_cannot_be_generated_and_say_why(dataset):
    with pytest.raises(ExpertWeightsRequired, match="expert policies .* only on the OGBench download server"):
        recipe_for_dataset(dataset)


def test_unsupported_datasets_are_refused():
    with pytest.raises(GenerationError, match="not an OGBench dataset name"):
        recipe_for_dataset("cube-single")
    with pytest.raises(GenerationError, match="no generation recipe"):
        recipe_for_dataset("powderworld-easy-play-v0")


def test_scene_health_check_matches_ogbench():
    qpos = np.zeros((3, 25))
    qpos[:, 14:17] = [0.4, 0.0, 0.02]
    assert _scene_episode_is_healthy(qpos)
    right = qpos.copy()
    right[1, 15] = 0.29
    assert not _scene_episode_is_healthy(right)
    in_drawer = qpos.copy()
    in_drawer[1, 15:17] = [-0.31, 0.07]
    assert _scene_episode_is_healthy(in_drawer)
    left = qpos.copy()
    left[1, 15:17] = [-0.31, 0.02]
    assert not _scene_episode_is_healthy(left)


# ---------------------------------------------------------------------------------------------------------------------
# Writing and validation
# ---------------------------------------------------------------------------------------------------------------------


def test_write_npz_is_deterministic_atomic_and_readable_by_numpy(raw_cube, tmp_path):
    write_npz(tmp_path / "a.npz", raw_cube)
    write_npz(tmp_path / "b.npz", raw_cube)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as loaded:
        assert list(loaded.files) == list(raw_cube)
        for key in raw_cube:
            np.testing.assert_array_equal(loaded[key], raw_cube[key])
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]  # no temporaries left


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="allow_pickle"):
        write_npz(tmp_path / "x.npz", {"observations": np.array([{"a": 1}], dtype=object)})
    assert list(tmp_path.iterdir()) == []


def test_truncated_corrupt_and_pickled_files_are_named(raw_cube, tmp_path):
    good = tmp_path / "good.npz"
    write_npz(good, raw_cube)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFileError, match=r"truncated\.npz: truncated or corrupt npz"):
        validate_raw_file(truncated)
    corrupt = tmp_path / "corrupt.npz"
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(DatasetFileError, match=r"corrupt\.npz: (truncated or corrupt|unreadable)"):
        validate_raw_file(corrupt)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, observations=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetFileError, match=r"pickled\.npz: unreadable array .*allow_pickle"):
        read_npz(pickled)
    with pytest.raises(DatasetFileError, match=r"absent\.npz: file not found"):
        read_npz(tmp_path / "absent.npz")


def broken(raw: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
    arrays = {key: value.copy() for key, value in raw.items()}
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


@pytest.mark.parametrize(
    "mutate, expectations, fragment",
    [
        (lambda r: broken(r, qvel=None), {}, "missing keys: qvel"),
        (lambda r: r, {"button_states": True}, "missing keys: button_states"),
        (
            lambda r: broken(r, button_states=np.zeros((len(r["terminals"]), 4), np.int64)),
            {"button_states": False},
            "unexpected key button_states",
        ),
        (
            lambda r: broken(r, rewards=np.zeros(len(r["terminals"]), np.float32)),
            {},
            "unexpected keys: rewards",
        ),
        (
            lambda r: broken(r, observations=r["observations"].astype(np.float64)),
            {},
            "observations: dtype float64",
        ),
        (lambda r: broken(r, terminals=r["terminals"].astype(np.float32)), {}, "terminals: dtype float32"),
        (lambda r: broken(r, actions=r["actions"][:-1]), {}, "actions: shape"),
        (lambda r: broken(r, qpos=r["qpos"][:, 0]), {}, "qpos: shape"),
        (
            lambda r: broken(
                r,
                qvel=np.where(np.arange(len(r["qvel"]))[:, None] == 7, np.nan, r["qvel"]).astype(np.float32),
            ),
            {},
            "qvel: 1 rows with non-finite values (first at row 7)",
        ),
        (lambda r: broken(r, actions=r["actions"] * 3), {}, "actions: values outside [-1, 1]"),
        (lambda r: broken(r, terminals=np.roll(r["terminals"], 1)), {}, "the last row is not an episode end"),
        (
            lambda r: broken(
                r, terminals=np.isin(np.arange(len(r["terminals"])), [STEPS - 2, STEPS - 1, 2 * STEPS - 1])
            ),
            {},
            f"a one-row episode ends at row {STEPS - 1}",
        ),
        (lambda r: r, {"episode_length": 1001}, f"episode 0 has {STEPS} rows, expected 1001"),
        (lambda r: r, {"obs_dim": 29}, "observations: dimension 28, expected 29"),
    ],
)
def test_malformed_files_are_named_with_their_problem(raw_cube, tmp_path, mutate, expectations, fragment):
    path = tmp_path / "bad.npz"
    write_npz(path, mutate(raw_cube))
    with pytest.raises(DatasetFileError) as info:
        validate_raw_file(path, **expectations)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)


def test_episode_lengths_from_terminals():
    np.testing.assert_array_equal(episode_lengths(np.array([0, 0, 1, 0, 1], bool)), [3, 2])
