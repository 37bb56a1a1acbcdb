"""The validate stage: a bad params.yaml fails with one last `error:` line naming every bad key, and no output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def validate(tmp_path: Path, params: dict | str) -> subprocess.CompletedProcess:
    text = params if isinstance(params, str) else yaml.safe_dump(params)
    (tmp_path / "params.yaml").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "stages.validate"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_valid_params_give_the_resolved_settings(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    result = validate(tmp_path, params)
    assert result.returncode == 0, result.stderr
    resolved = json.loads((tmp_path / "data" / "params.json").read_text())
    assert resolved["datasets"]["cube-single-play-v0"]["agent"]["h"] == 5  # the preset filled in agent.h: null
    task = resolved["tasks"]["cube-single-play-singletask-task2-v0"]
    assert (task["dataset"], task["number"], task["env"]) == ("cube-single-play-v0", 2, "cube-single-singletask-task2-v0")
    assert resolved["params"]["train"]["steps"] == params["train"]["steps"]


def test_unknown_datasets_bad_task_numbers_and_duplicates_are_one_line_each_naming_key_and_value(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for datasets, fragment in (
        (["cube-single-play-v0", "cube-sextuple-play-v0"],
         "- datasets[1]: 'cube-sextuple-play-v0': unknown OGBench environment 'cube-sextuple'"),
        (["cube-single-play-v0", "cube-single-play-v0"], "- datasets: duplicate entries: cube-single-play-v0"),
    ):
        params["datasets"] = datasets
        result = validate(tmp_path, params)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and fragment in last, last
    params["datasets"], params["tasks"] = ["cube-single-play-v0", "scene-play-v0"], [2, 7]
    result = validate(tmp_path, params)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("error: ParamsError: params.yaml: 2 invalid settings:"), last
    for i, dataset in enumerate(params["datasets"]):
        assert f"tasks[1]: task 7 does not exist for datasets[{i}] ({dataset})" in last, last
    assert not (tmp_path / "data").exists()


def test_every_bad_key_is_named_on_the_last_line(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["stepz"] = 5
    params["foo"] = 1
    params["data"]["episodes"] = -3
    result = validate(tmp_path, params)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ParamsError: params.yaml: 3 invalid settings:")
    for fragment in ("train.stepz: unknown key", "foo: unknown key", "data.episodes: Input should be greater"):
        assert fragment in last, last
    assert not (tmp_path / "data").exists()


def test_broken_yaml_is_one_line(tmp_path):
    result = validate(tmp_path, "tasks: [a\ntrain: {steps: 1")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("error: ParamsError: params.yaml: not valid YAML")
    assert "line" in last
