"""The download stage end to end (one dataset per stage): generation, OGBench's downloader (offline here), fallbacks,
manifest, failures."""

import dataclasses
import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import ogbench
import pytest
import yaml

from stages import download
from stages.core import datasets
from stages.core.files import sha256_file
from stages.core.ogbench_data import DatasetFileError, read_npz, write_npz
from stages.core.ogbench_generate import GenerationError, generate_splits, recipe_for_dataset
from stages.params import ParamsError, validate_params

ROOT = Path(__file__).resolve().parents[1]
MAZE = "pointmaze-medium-navigate-v0"
STEPS = 30


def tiny_params(tmp_path: Path, name: str = "params.yaml", datasets=(MAZE,), **data) -> Path:
    """The repository's params.yaml with tiny data settings (and `data` overrides), written to tmp_path."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["datasets"] = list(datasets)
    raw["data"].update(
        {
            "source": "generate",
            "episodes": 2,
            "val_episodes": 1,
            "workers": 1,
            "seed": 0,
            "episode_steps": STEPS,
        }
    )
    raw["data"].update(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def params_of(tmp_path: Path, **kwargs):
    return validate_params(yaml.safe_load(tiny_params(tmp_path, **kwargs).read_text()))


def run(params, out: Path, ogbench_dir: Path, **kwargs) -> dict:
    """What the stage does with validated params: their (first) dataset into its folder ``out``; the manifest."""
    return datasets.obtain_dataset_folder(params.datasets[0], params.data, out, ogbench_dir, **kwargs)


@pytest.fixture(scope="module")
def maze_splits() -> dict[str, dict[str, np.ndarray]]:
    recipe = recipe_for_dataset(MAZE, episode_steps=STEPS)
    return generate_splits(recipe, episodes=2, val_episodes=1, seed=11, progress=False)


def offline(stems, folder, base_url):
    raise urllib.error.URLError("Name or service not known")


class FakeServer:
    """A downloader that serves given arrays for every requested file and records the requests."""

    def __init__(self, splits: dict[str, dict[str, np.ndarray]], truncate: bool = False):
        self.splits, self.truncate, self.calls = splits, truncate, []

    def __call__(self, stems, folder, base_url):
        self.calls.append((list(stems), folder, base_url))
        folder.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            write_npz(folder / f"{stem}.npz", self.splits["train"])
            write_npz(folder / f"{stem}-val.npz", self.splits["val"])
            if self.truncate:
                data = (folder / f"{stem}.npz").read_bytes()
                (folder / f"{stem}.npz").write_bytes(data[: len(data) // 2])


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------


def test_stage_cli_generates_ogbench_files_byte_identically(tmp_path):
    params = tiny_params(tmp_path, datasets=[MAZE, "cube-single-play-v0"])
    first, second = tmp_path / "first", tmp_path / "second"
    command = [
        sys.executable,
        "-m",
        "stages.download",
        "--dataset",
        "cube-single-play-v0",
        "--params",
        str(params),
        "--ogbench-dir",
        str(tmp_path / "none"),
    ]
    result = subprocess.run(
        [*command, "--out", str(first)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "cube-single-play-v0.npz: valid, 60 rows in 2 episodes" in result.stderr
    download.main([*command[3:], "--out", str(second)])  # same params, in this process

    names = sorted(p.name for p in first.iterdir())
    assert names == ["cube-single-play-v0-val.npz", "cube-single-play-v0.npz", "manifest.json"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    manifest = manifest_of(first)
    entry = manifest["datasets"]["cube-single-play-v0"]
    assert (entry["source"], entry["seed"], entry["episodes"], entry["val_episodes"]) == ("generate", 0, 2, 1)
    assert entry["recipe"]["episode_steps"] == STEPS and entry["recipe"]["noise"] == 0.1
    for name, described in entry["files"].items():
        assert described["sha256"] == sha256_file(first / name)
    assert entry["files"]["cube-single-play-v0.npz"]["rows"] == 2 * STEPS
    assert manifest["versions"]["ogbench"] == "1.2.2" and manifest["versions"]["mujoco"] == "4.0.0"
    assert list(manifest) == ["datasets", "versions"] and list(manifest["datasets"]) == ["cube-single-play-v0"]

    _, train, val = ogbench.make_env_and_datasets(
        "cube-single-play-singletask-task2-v0", dataset_dir=str(first), compact_dataset=False
    )
    assert train["observations"].shape == (2 * (STEPS - 1), 28) and len(val["rewards"]) == STEPS - 1


def test_another_seed_gives_other_files(tmp_path):
    outs = []
    for seed in (0, 1):
        outs.append(tmp_path / f"seed{seed}")
        run(params_of(tmp_path, seed=seed), outs[-1], tmp_path / "none")
    assert (outs[0] / f"{MAZE}.npz").read_bytes() != (outs[1] / f"{MAZE}.npz").read_bytes()
    assert manifest_of(outs[1])["datasets"][MAZE]["seed"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_ogbench_size(monkeypatch):
    """OGBench's own episode count of every dataset made 2, so generating 'OGBench's size' stays fast."""
    real = datasets.recipe_for_dataset
    monkeypatch.setattr(datasets, "recipe_for_dataset",
                        lambda name, **kw: dataclasses.replace(real(name, **kw), ogbench_episodes=2))


def test_auto_falls_back_to_generation_when_offline_and_says_so(tmp_path, caplog, small_ogbench_size):
    caplog.set_level(logging.INFO, logger="stages.core.datasets")
    manifest = run(
        params_of(tmp_path, source="auto", episodes=None), tmp_path / "out", tmp_path / "none", download=offline
    )
    assert manifest["datasets"][MAZE]["source"] == "generate"
    assert (manifest["datasets"][MAZE]["episodes"], manifest["datasets"][MAZE]["val_episodes"]) == (2, 1)
    assert "offline, generating with OGBench's oracles instead" in caplog.text
    assert "Name or service not known" in caplog.text


def test_auto_with_an_episode_count_generates_without_looking_elsewhere(tmp_path, maze_splits):
    """A number of episodes asks for a generated dataset: no download, no copy from OGBench's folder."""
    ogbench_dir = tmp_path / "ogbench"
    FakeServer(maze_splits)([MAZE], ogbench_dir, "")
    server = FakeServer(maze_splits)
    manifest = run(params_of(tmp_path, source="auto", episodes=3), tmp_path / "out", ogbench_dir,
                            download=server)
    assert server.calls == []
    entry = manifest["datasets"][MAZE]
    assert (entry["source"], entry["episodes"]) == ("generate", 3) and "copied_from" not in entry


def test_download_with_an_episode_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.episodes: source download brings OGBench's published datasets"):
        params_of(tmp_path, source="download", episodes=3)


def test_the_default_downloader_is_ogbench_s_own(tmp_path, monkeypatch, caplog, small_ogbench_size):
    """With the network cut at urlopen, OGBench's download_datasets is what asks for the file, at OGBench's URL."""
    requested = []

    def no_network(url, *args, **kwargs):
        requested.append(url)
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    run(params_of(tmp_path, source="auto", episodes=None), tmp_path / "out", tmp_path / "none")
    assert requested == [f"{datasets.OGBENCH_URL}/{MAZE}.npz"]
    assert "offline, generating with OGBench's oracles instead" in caplog.text


def test_download_source_fetches_and_validates(tmp_path, maze_splits):
    server = FakeServer(maze_splits)
    manifest = run(
        params_of(tmp_path, source="download", episodes=None), tmp_path / "out", tmp_path / "none", download=server
    )
    assert server.calls == [([MAZE], tmp_path / "out", datasets.OGBENCH_URL)]
    entry = manifest["datasets"][MAZE]
    assert entry["source"] == "download" and "seed" not in entry
    assert entry["files"][f"{MAZE}.npz"]["episodes"] == 2


def test_large_datasets_download_each_file_from_its_folder(tmp_path, maze_splits):
    with_buttons = {
        split: {**arrays, "button_states": np.zeros((len(arrays["terminals"]), 16), np.int64)}
        for split, arrays in maze_splits.items()
    }
    server = FakeServer(with_buttons)
    folder = tmp_path / "puzzle-4x4-play-100m-v0"
    manifest = run(
        params_of(tmp_path, datasets=[folder.name], source="download", episodes=None, shards=2),
        folder,
        tmp_path / "none",
        download=server,
    )
    url = f"{datasets.OGBENCH_URL}/puzzle-4x4-play-100m-v0"
    assert server.calls == [
        (["puzzle-4x4-play-v0-000"], folder, url),
        (["puzzle-4x4-play-v0-001"], folder, url),
    ]
    assert sorted(manifest["datasets"]["puzzle-4x4-play-100m-v0"]["files"]) == [
        f"puzzle-4x4-play-v0-00{i}{suffix}.npz" for i in (0, 1) for suffix in ("-val", "")
    ]


def test_large_datasets_generate_one_file_pair_per_shard(tmp_path):
    folder = tmp_path / "puzzle-3x3-play-100m-v0"
    run(
        params_of(tmp_path, datasets=[folder.name], shards=2, episode_steps=10, episodes=1), folder,
        tmp_path / "none",
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "puzzle-3x3-play-v0-000-val.npz",
        "puzzle-3x3-play-v0-000.npz",
        "puzzle-3x3-play-v0-001-val.npz",
        "puzzle-3x3-play-v0-001.npz",
    ]
    first = read_npz(folder / "puzzle-3x3-play-v0-000.npz")
    second = read_npz(folder / "puzzle-3x3-play-v0-001.npz")
    assert first["button_states"].dtype == np.int64
    assert not np.array_equal(first["observations"], second["observations"])  # each file has its own episodes


def test_files_in_the_ogbench_folder_are_used_before_downloading(tmp_path, maze_splits):
    ogbench_dir = tmp_path / "ogbench"
    FakeServer(maze_splits)([MAZE], ogbench_dir, "")
    server = FakeServer(maze_splits)
    manifest = run(
        params_of(tmp_path, source="download", episodes=None), tmp_path / "out", ogbench_dir, download=server
    )
    assert server.calls == [] and manifest["datasets"][MAZE]["source"] == "ogbench-dir"
    assert manifest["datasets"][MAZE]["copied_from"] == str(ogbench_dir)
    assert (tmp_path / "out" / f"{MAZE}.npz").read_bytes() == (ogbench_dir / f"{MAZE}.npz").read_bytes()


def test_a_large_dataset_is_copied_from_its_folder_in_the_ogbench_folder(tmp_path, maze_splits):
    """OGBench keeps a 100m dataset's files in a folder of its own (`<ogbench dir>/<dataset>/<stem>-NNN.npz`)."""
    with_buttons = {
        split: {**arrays, "button_states": np.zeros((len(arrays["terminals"]), 16), np.int64)}
        for split, arrays in maze_splits.items()
    }
    dataset, ogbench_dir = "puzzle-4x4-play-100m-v0", tmp_path / "ogbench"
    FakeServer(with_buttons)(["puzzle-4x4-play-v0-000"], ogbench_dir / dataset, "")
    server = FakeServer(with_buttons)
    manifest = run(params_of(tmp_path, datasets=[dataset], source="download", episodes=None, shards=1),
                   tmp_path / "out", ogbench_dir, download=server)
    assert server.calls == [] and manifest["datasets"][dataset]["source"] == "ogbench-dir"
    assert (tmp_path / "out" / "puzzle-4x4-play-v0-000.npz").read_bytes() == (
        ogbench_dir / dataset / "puzzle-4x4-play-v0-000.npz").read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------------------------------


def test_expert_datasets_offline_fail_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("x"))
    )
    params = tiny_params(tmp_path, datasets=["antmaze-large-navigate-v0"], source="auto", episodes=None)
    out = tmp_path / "out"
    with pytest.raises(datasets.DatasetUnavailable) as info:
        download.main(["--dataset", "antmaze-large-navigate-v0", "--params", str(params), "--out", str(out),
                       "--ogbench-dir", str(tmp_path / "none")])
    assert "expert policies whose weights are only on the OGBench download server" in str(info.value)
    assert "machine with internet" in str(info.value) and "~/.ogbench/data" in str(info.value)
    assert list(out.iterdir()) == []


def test_download_source_offline_is_an_error(tmp_path):
    with pytest.raises(datasets.DatasetUnavailable, match=f"{MAZE}: download failed .*data.source: auto or generate"):
        run(
            params_of(tmp_path, source="download", episodes=None), tmp_path / "out", tmp_path / "none",
            download=offline,
        )


def test_a_corrupt_download_is_named_and_removed(tmp_path, maze_splits):
    out = tmp_path / "out"
    with pytest.raises(DatasetFileError, match=rf"{MAZE}\.npz: truncated or corrupt npz"):
        run(
            params_of(tmp_path, source="auto", episodes=None),
            out,
            tmp_path / "none",
            download=FakeServer(maze_splits, truncate=True),
        )
    assert list(out.iterdir()) == []


def test_invalid_params_fail_naming_the_key_before_any_work(tmp_path):
    params = tiny_params(tmp_path, episodes=0)
    out = tmp_path / "out"
    with pytest.raises(ParamsError, match="data.episodes: Input should be greater than 0"):
        download.main(["--dataset", MAZE, "--params", str(params), "--out", str(out)])
    assert not out.exists()


def test_a_dataset_the_params_do_not_list_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"dataset 'scene-play-v0' is not in params.yaml datasets \['pointmaze"):
        download.main(["--dataset", "scene-play-v0", "--params", str(tiny_params(tmp_path)), "--out", str(out)])
    assert not out.exists()


def test_the_stage_fails_like_every_stage_with_one_error_line_and_exit_1(tmp_path):
    """One exit-code policy (cli.run): exit 1 and a single `error:` line, printed once."""
    params = tiny_params(tmp_path, episodes=0)
    result = subprocess.run([sys.executable, "-m", "stages.download", "--dataset", MAZE, "--params", str(params),
                             "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ParamsError: ") and "data.episodes" in lines[-1]
    assert sum("data.episodes" in line for line in lines) == 1, result.stderr


def test_a_failed_run_leaves_no_manifest_and_no_stale_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("manifest.json", f"{MAZE}-val.npz", f".{MAZE}.npz.abc123.tmp"):
        (out / stale).write_text("from an earlier run")

    def broken(*args, **kwargs):
        raise GenerationError("simulated failure in the middle of generation")

    monkeypatch.setattr(datasets, "generate_splits", broken)
    params = tiny_params(tmp_path)
    with pytest.raises(GenerationError, match="simulated failure"):
        download.main(["--dataset", MAZE, "--params", str(params), "--out", str(out), "--ogbench-dir",
                       str(tmp_path / "none")])
    assert list(out.iterdir()) == []


def test_plan_names_the_files_in_the_datasets_folder_and_in_ogbenchs():
    maze = datasets.plan_dataset(MAZE, shards=3)
    assert maze.files == [f"{MAZE}.npz", f"{MAZE}-val.npz"] and maze.ogbench_path(maze.files[0]) == f"{MAZE}.npz"
    large = datasets.plan_dataset("cube-quadruple-play-100m-v0", shards=3)
    assert large.files[-2:] == ["cube-quadruple-play-v0-002.npz", "cube-quadruple-play-v0-002-val.npz"]
    assert large.ogbench_path(large.files[0]) == "cube-quadruple-play-100m-v0/cube-quadruple-play-v0-000.npz"


def test_a_datasets_files_do_not_depend_on_the_other_datasets_of_the_study(tmp_path):
    """Generation seeds come from data.seed, the split, the file and the episode, never from a dataset's place in
    params.yaml's list: adding a dataset before it leaves its bytes alone (so DVC need not rerun it)."""
    alone, second = tmp_path / "alone", tmp_path / "second"
    download.main(["--dataset", MAZE, "--params", str(tiny_params(tmp_path, "a.yaml")), "--out", str(alone)])
    both = tiny_params(tmp_path, "b.yaml", datasets=("cube-single-play-v0", MAZE))
    download.main(["--dataset", MAZE, "--params", str(both), "--out", str(second)])
    assert sorted(p.name for p in alone.iterdir()) == sorted(p.name for p in second.iterdir())
    for path in alone.iterdir():
        assert path.read_bytes() == (second / path.name).read_bytes(), path.name
