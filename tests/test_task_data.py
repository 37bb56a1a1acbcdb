"""stages/task_data.py: a dataset's training files, loaded for a task (OGBench's relabelling) or for none, and their
fingerprint."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import yaml

from stages.core.files import sha256_file
from stages.core.ogbench_data import DatasetFileError, write_npz
from stages.core.ogbench_generate import generate_splits, recipe_for_dataset
from stages.params import validate_params
from stages.task_data import dataset_fingerprint, load_dataset_data, load_task_data, training_files
from tests.test_download import ROOT

TASK = "pointmaze-medium-navigate-singletask-task1-v0"
DATASET = "pointmaze-medium-navigate-v0"
LARGE_TASK, LARGE, STEM = ("puzzle-3x3-play-100m-singletask-task1-v0", "puzzle-3x3-play-100m-v0",
                           "puzzle-3x3-play-v0")  # fmt: skip
STEPS = 20


@pytest.fixture(scope="module")
def splits():
    recipe = recipe_for_dataset(DATASET, episode_steps=STEPS)
    return generate_splits(recipe, episodes=2, val_episodes=1, seed=3, progress=False)


def params(sparse):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["datasets"], raw["tasks"], raw["data"]["sparse"] = [DATASET], [1], sparse
    return validate_params(raw)


@pytest.fixture
def one_file(tmp_path, splits):
    write_npz(tmp_path / f"{DATASET}.npz", splits["train"])
    write_npz(tmp_path / f"{DATASET}-val.npz", splits["val"])
    return tmp_path


@pytest.fixture(scope="module")
def puzzle_splits():
    recipe = recipe_for_dataset(STEM, episode_steps=10)
    return generate_splits(recipe, episodes=1, val_episodes=1, seed=3, progress=False)


@pytest.fixture
def large(tmp_path, puzzle_splits):
    """A 100m dataset's folder of three files, written out of order, each shifted so that they differ."""
    folder = tmp_path / LARGE
    folder.mkdir()
    for index in (2, 0, 1):
        write_npz(folder / f"{STEM}-{index:03d}.npz",
                  {**puzzle_splits["train"], "observations": puzzle_splits["train"]["observations"] + index})
        write_npz(folder / f"{STEM}-{index:03d}-val.npz", puzzle_splits["val"])
    return folder


def test_a_task_trains_on_its_one_file_relabelled_with_its_sha256(one_file):
    assert training_files(DATASET, one_file) == [one_file / f"{DATASET}.npz"]
    data = load_task_data(params(False), TASK, folder=one_file)
    assert data.path == one_file / f"{DATASET}.npz" and data.sha256 == sha256_file(data.path)
    assert (data.dataset, data.task) == (DATASET, TASK)
    assert (data.size, data.obs_dim, data.action_dim) == (2 * (STEPS - 1), 2, 2)  # each episode's last row dropped
    assert data.arrays["rewards"].dtype == np.float32 and set(np.unique(data.arrays["terminals"])) == {0.0, 1.0}
    sparse = load_task_data(params(True), TASK, folder=one_file)
    np.testing.assert_array_equal(sparse.arrays["rewards"], np.where(data.arrays["rewards"] != 0, -1.0, 0.0))


def test_the_prior_and_the_cache_read_the_dataset_for_no_task(one_file):
    """One load for every task of the dataset: the same file, observations, actions and episode ends as a task's."""
    behaviour, task = load_dataset_data(DATASET, folder=one_file), load_task_data(params(False), TASK, folder=one_file)
    assert (behaviour.dataset, behaviour.task, behaviour.path, behaviour.sha256) == (DATASET, None, task.path,
                                                                                     task.sha256)
    for key in ("observations", "actions", "terminals", "next_observations"):
        np.testing.assert_array_equal(behaviour.arrays[key], task.arrays[key], err_msg=key)
    assert not behaviour.arrays["rewards"].any() and (behaviour.arrays["masks"] == 1).all()


def test_a_large_dataset_is_read_file_by_file_in_order_wrapping_around(large):
    files = training_files(LARGE, large)
    assert [f.name for f in files] == [f"{STEM}-000.npz", f"{STEM}-001.npz", f"{STEM}-002.npz"]
    raw = validate_params({**params(False).model_dump(mode="json"), "datasets": [LARGE]})
    first, fourth = (load_task_data(raw, LARGE_TASK, index, folder=large) for index in (0, 3))
    second = load_task_data(raw, LARGE_TASK, 1, folder=large)
    assert fourth.path == first.path  # swap k uses file k mod the number of files
    np.testing.assert_allclose(second.arrays["observations"], first.arrays["observations"] + 1)


def test_the_fingerprint_is_the_file_hash_or_a_hash_of_the_file_hashes_the_manifest_records(one_file, large):
    assert dataset_fingerprint(DATASET, one_file) == sha256_file(one_file / f"{DATASET}.npz")
    files = training_files(LARGE, large)
    combined = hashlib.sha256("\n".join(sha256_file(f) for f in files).encode()).hexdigest()
    assert dataset_fingerprint(LARGE, large) == combined
    # the download stage's manifest names files relative to the dataset's folder; its hashes spare re-hashing
    recorded = {f.relative_to(large).as_posix(): {"sha256": f"{i}" * 64} for i, f in enumerate(files)}
    (large / "manifest.json").write_text(json.dumps({"datasets": {LARGE: {"files": recorded}}}))
    expected = hashlib.sha256("\n".join(f"{i}" * 64 for i in range(3)).encode()).hexdigest()
    assert dataset_fingerprint(LARGE, large) == expected


def test_a_missing_dataset_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(DatasetFileError, match=rf"{DATASET}\.npz: file not found"):
        load_task_data(params(False), TASK, folder=tmp_path)
