"""The train stage in-process on tiny data: outputs, exact resume of policy and learning curves, a damaged newest
checkpoint, a non-finite loss, stale outputs."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import jax.numpy as jnp
import pytest
import yaml

from stages import download, layout, train, training
from stages.core import checkpoints, policy_file, training_loop
from stages.core.agents import bc_flow

ROOT = Path(__file__).resolve().parents[1]
DATASET, NUMBER = "cube-single-play-v0", 2
TASK = "cube-single-play-singletask-task2-v0"
AGENT = "bc_flow"
TINY = {
    "data": {"source": "generate", "episodes": 3, "val_episodes": 1, "episode_steps": 201, "workers": 1, "seed": 0},
    "networks": {"actor": [32, 32], "critic": [32, 32], "ensemble": 2},
    "train": {"steps": 200, "updates_per_call": 50, "log_every": 50, "checkpoint_every": 100, "eval_every": 100,
              "eval_episodes": 2, "device": "cpu"},
    "evaluate": {"episodes": 2, "envs": 2, "workers": 1},
}
TIMING = "steps_per_second"  # wall-clock metrics: the only values allowed to differ between runs

pytestmark = pytest.mark.timeout(600)


class Interrupt(Exception):
    """Stands in for a kill: raised inside the stage after a checkpoint was saved."""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A working directory with a tiny params.yaml and a generated dataset in data/datasets."""
    repo = tmp_path_factory.mktemp("train_stage")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"], params["tasks"], params["seeds"] = [DATASET], [NUMBER], [0, 1]
    params["agents"] = {"rql": [], "rql_cached": [], "fql": [], "bc_flow": [AGENT]}
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    download.main(["--dataset", DATASET, "--params", str(repo / "params.yaml"), "--out",
                   str(repo / layout.dataset_dir(DATASET)), "--ogbench-dir", str(repo / "no-ogbench")])  # raises
    return repo


@pytest.fixture
def workdir(repo, monkeypatch, tmp_path_factory) -> Path:
    """The stage runs from ``repo`` (layout paths are relative) with a clean data/runs and data/checkpoints."""
    monkeypatch.chdir(repo)
    monkeypatch.setenv("RQL_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "jax-cache"))
    for sub in ("runs", "checkpoints"):
        shutil.rmtree(repo / "data" / sub, ignore_errors=True)
    return repo


def run_stage(seed: int = 0) -> None:
    train.main(["--agent", AGENT, "--dataset", DATASET, "--task", str(NUMBER), "--seed", str(seed), "--no-progress"])


def run_dir(seed: int = 0) -> Path:
    return layout.run_dir(AGENT, DATASET, NUMBER, seed)


def curves(seed: int = 0) -> dict[str, str]:
    """Every dvclive series file's text, timing series left out (they are wall-clock measurements)."""
    root = run_dir(seed) / "live" / "plots" / "metrics"
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.tsv")) if TIMING not in p.name}


def summary_metrics(seed: int = 0) -> dict:
    metrics = json.loads((run_dir(seed) / "live" / "metrics.json").read_text())
    metrics["train"].pop(TIMING)
    return metrics


def outputs_left(seed: int = 0) -> list[str]:
    return sorted(p.name for p in run_dir(seed).iterdir()) if run_dir(seed).exists() else []


def checkpoint_dir(seed: int = 0) -> Path:
    (directory,) = layout.checkpoint_root(AGENT, DATASET, NUMBER, seed).iterdir()
    return directory


def interrupted_at(step: int) -> None:
    """Run the stage and let it fail right after it logged ``step``'s metrics (like a kill between checkpoints)."""
    real_run = training_loop.run

    def run(*args, on_metrics, **kwargs):
        def failing(at, *rest):
            on_metrics(at, *rest)
            if at == step:
                raise Interrupt(f"interrupted at step {at}")

        return real_run(*args, on_metrics=failing, **kwargs)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Interrupt):
        mp.setattr(training_loop, "run", run)
        run_stage()


@pytest.fixture(scope="module")
def reference(repo, tmp_path_factory) -> dict:
    """One uninterrupted run: its policy bytes, curves and summary metrics."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        mp.setenv("RQL_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "jax-cache"))
        for sub in ("runs", "checkpoints"):
            shutil.rmtree(repo / "data" / sub, ignore_errors=True)
        run_stage()
        return {"policy": (run_dir() / "policy.msgpack").read_bytes(), "curves": curves(),
                "metrics": summary_metrics(), "summary": json.loads((run_dir() / "summary.json").read_text()),
                "names": outputs_left(), "checkpoint_steps": sorted(p.name for p in checkpoint_dir().iterdir())}


def test_an_uninterrupted_run_writes_valid_outputs_and_nothing_else(repo, reference):
    assert reference["names"] == ["live", "policy.msgpack", "summary.json"]  # no temporary folder or file left
    loaded = policy_file.decode_policy(reference["policy"], source="policy.msgpack")
    assert loaded.metadata["agent"] == AGENT and loaded.metadata["steps"] == 200
    summary = reference["summary"]
    assert summary["steps"] == 200 and summary["resumed_from"] == 0
    assert summary["policy_sha256"] == hashlib.sha256(reference["policy"]).hexdigest()
    series = reference["curves"]
    assert series["train/bc_loss.tsv"].splitlines()[0] == "step\tbc_loss"
    assert [line.split("\t")[0] for line in series["train/bc_loss.tsv"].splitlines()[1:]] == ["50", "100", "150",
                                                                                              "200"]
    assert [line.split("\t")[0] for line in series["eval/success.tsv"].splitlines()] == ["step", "100"]
    assert reference["metrics"]["step"] == 200 and set(reference["metrics"]["eval"]) == {"success", "return"}
    assert "100" in reference["checkpoint_steps"] and "200" in reference["checkpoint_steps"]


def test_an_interrupted_run_resumes_to_the_same_policy_and_the_same_curves(reference, workdir, caplog):
    interrupted_at(150)  # after the step-100 checkpoint and a logged row the checkpoint does not hold
    assert outputs_left() == []  # no live/ folder, no policy, no summary
    assert [p.name for p in checkpoint_dir().iterdir() if p.name.isdigit()] == ["100"]
    with caplog.at_level(logging.INFO):
        run_stage()
    assert "resuming from the checkpoint at step 100" in caplog.text
    assert (run_dir() / "policy.msgpack").read_bytes() == reference["policy"]
    assert curves() == reference["curves"]  # rows 50 and 100 from the checkpoint, 150 logged once, not twice
    assert summary_metrics() == reference["metrics"]
    assert json.loads((run_dir() / "summary.json").read_text())["resumed_from"] == 100
    assert outputs_left() == reference["names"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(reference, workdir, caplog):
    def killed_before_the_outputs(*args, **kwargs):
        raise Interrupt("killed after the last checkpoint")

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Interrupt):
        mp.setattr(training, "write_live", killed_before_the_outputs)
        run_stage()
    assert outputs_left() == []
    directory = checkpoint_dir()
    assert sorted(p.name for p in directory.iterdir()) == ["100", "200"]
    largest = max((p for p in (directory / "200").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    with caplog.at_level(logging.INFO):
        run_stage()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("step 200 is unreadable and skipped" in w and "truncated" in w for w in warnings), warnings
    assert "resuming from the checkpoint at step 100" in caplog.text
    assert (directory / checkpoints.UNREADABLE_DIR / "200").is_dir()
    assert (run_dir() / "policy.msgpack").read_bytes() == reference["policy"]
    assert curves() == reference["curves"]


def test_no_intact_checkpoint_stops_with_one_line_saying_what_to_delete(workdir):
    interrupted_at(150)
    directory = checkpoint_dir()
    (directory / "100" / "state" / "_METADATA").write_bytes(b"{")
    with pytest.raises(checkpoints.CheckpointError) as info:
        run_stage()
    message = str(info.value)
    assert "\n" not in message and f"delete {directory.absolute()}" in message and "step 100" in message


def test_a_non_finite_loss_names_the_run_and_its_data_and_leaves_no_outputs(workdir, monkeypatch):
    real = bc_flow.make_update

    def poisoned(config, per_call):
        update = real(config, per_call)

        def run(state, data):
            state, metrics = update(state, data)
            return state, {**metrics, "bc_loss": metrics["bc_loss"] * jnp.nan}

        return run

    out = run_dir(1)
    out.mkdir(parents=True)
    (out / "summary.json").write_text('{"stale": true}')  # an earlier run's outputs, run by hand
    (out / "live").mkdir()
    monkeypatch.setattr(bc_flow, "make_update", poisoned)
    with pytest.raises(training_loop.NonFiniteLossError) as info:
        run_stage(seed=1)
    message = str(info.value)
    assert f"run {AGENT}/{TASK}/seed1" in message and str(out) in message
    assert str(layout.dataset_dir(DATASET) / "cube-single-play-v0.npz") in message
    assert "bc_loss became non-finite" in message and "between update steps 1 and 50" in message
    assert outputs_left(1) == []  # the stale summary and live/ are gone, no new policy
