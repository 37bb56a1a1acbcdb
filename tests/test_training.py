"""Unit tests of stages/training.py: the run's outputs, its checkpoint identity and resume, the hooks' bookkeeping.
(tests/test_train_stage.py runs the whole stage; these pin the pieces one by one.)"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from dvclive.error import InvalidDataTypeError

from stages import layout, training
from stages.core import checkpoints, training_loop


def test_fingerprint_is_stable_and_ignores_key_order_but_not_values():
    a = training.fingerprint({"agent": "rql", "steps": 10, "nested": {"x": 1, "y": [1, 2]}})
    assert a == training.fingerprint({"nested": {"y": [1, 2], "x": 1}, "steps": 10, "agent": "rql"})
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != training.fingerprint({"agent": "rql", "steps": 11, "nested": {"x": 1, "y": [1, 2]}})
    assert a != training.fingerprint({"agent": "rql", "steps": 10, "nested": {"x": 1, "y": [2, 1]}})


def test_remove_outputs_deletes_declared_outputs_and_leftover_temporaries_only(tmp_path):
    out = tmp_path / "run"
    (out / "live" / "plots").mkdir(parents=True)
    (out / "live" / "plots" / "x.tsv").write_text("step\tx\n")
    (out / "policy.msgpack").write_bytes(b"p")
    (out / "summary.json").write_text("{}")
    (out / f"{training.LIVE_TMP_PREFIX}abc.tmp").mkdir()
    (out / "notes.txt").write_text("mine")  # not an output: kept
    (tmp_path / "elsewhere").mkdir()
    (out / "summary.json").unlink()
    (out / "summary.json").symlink_to(tmp_path / "elsewhere")  # a symlink is removed, not followed
    training.remove_outputs(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (tmp_path / "elsewhere").is_dir()
    training.remove_outputs(out)  # nothing left to remove: no error


def test_write_live_writes_every_row_and_replaces_the_old_folder(tmp_path):
    target = tmp_path / "run" / "live"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an earlier run")
    rows = [[100, {"train/loss": 2.0}], [200, {"train/loss": 1.5}], [200, {"eval/success": 40.0}]]
    training.write_live(target, rows)
    assert not (target / "stale.txt").exists()
    loss = (target / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and [line.split("\t") for line in loss[1:]] == [["100", "2.0"], ["200", "1.5"]]
    success = (target / "plots" / "metrics" / "eval" / "success.tsv").read_text().splitlines()
    assert [line.split("\t") for line in success[1:]] == [["200", "40.0"]]
    summary = json.loads((target / "metrics.json").read_text())
    assert summary["train"]["loss"] == 1.5 and summary["eval"]["success"] == 40.0
    assert not list(target.parent.glob(f"{training.LIVE_TMP_PREFIX}*"))


def test_write_live_that_fails_leaves_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "live"
    target.mkdir()
    (target / "old.txt").write_text("kept")
    with pytest.raises(InvalidDataTypeError):
        training.write_live(target, [[1, {"loss": 1.0}], [2, {"loss": object()}]])  # dvclive refuses a non-number
    assert (target / "old.txt").read_text() == "kept"
    assert not list(tmp_path.glob(f"{training.LIVE_TMP_PREFIX}*"))


RUN = ("rql", "cube-single-play-v0", 2, 0)  # agent, dataset, task number, seed


def test_checkpoint_dir_is_named_by_the_settings_and_drops_other_settings_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(layout.CHECKPOINTS_ENV, raising=False)
    first = training.checkpoint_dir(*RUN, {"lr": 1e-3})
    first.mkdir(parents=True)
    assert first.parent == layout.checkpoint_root(*RUN) and first.name == training.fingerprint({"lr": 1e-3})
    assert training.checkpoint_dir(*RUN, {"lr": 1e-3}) == first and first.is_dir()
    second = training.checkpoint_dir(*RUN, {"lr": 3e-4})
    assert second != first and not first.exists()  # another setting's checkpoints are removed


def test_checkpoint_dir_keeps_other_settings_in_a_shared_location(tmp_path, monkeypatch):
    monkeypatch.setenv(layout.CHECKPOINTS_ENV, str(tmp_path / "shared"))
    first = training.checkpoint_dir(*RUN, {"lr": 1e-3})
    first.mkdir(parents=True)
    training.checkpoint_dir(*RUN, {"lr": 3e-4})
    assert first.is_dir()  # may be another study's run in progress


class FakeCheckpointer:
    def __init__(self, step, extras, directory=Path("/ckpt/run")):
        self.step, self.extras, self.directory = step, extras, directory

    def resume(self, state):
        return checkpoints.Resumed(state={"restored": True}, step=self.step, extras=self.extras)


def test_resume_from_nothing_starts_at_step_0_with_an_empty_history():
    state, step, history = training.resume(FakeCheckpointer(None, None), {"fresh": True})
    assert state == {"restored": True} and step == 0 and history.rows == []


def test_resume_keeps_the_history_up_to_the_checkpoint_only():
    rows = [[100, {"a": 1.0}], [200, {"a": 2.0}], [300, {"a": 3.0}]]
    _, step, history = training.resume(FakeCheckpointer(200, {"history": rows}), {})
    assert step == 200 and history.rows == rows[:2]


@pytest.mark.parametrize("extras", [{}, {"history": "nope"}, {"history": [[1.5, {}]]}, None])
def test_resume_with_a_broken_history_says_what_to_delete(extras):
    with pytest.raises(checkpoints.CheckpointError, match=r"step 200 in /ckpt/run .*delete /ckpt/run"):
        training.resume(FakeCheckpointer(200, extras), {})


def hooks_for(files: int, swap_every: int) -> training.Hooks:
    """A Hooks object with only what file_of / trained_on read (no env, no evaluator)."""
    hooks = training.Hooks.__new__(training.Hooks)
    hooks.params = types.SimpleNamespace(train=types.SimpleNamespace(dataset_swap_every=swap_every))
    hooks.files = [Path(f"data/datasets/big/part-{i:03d}.npz") for i in range(files)]
    hooks.streaming = files > 1
    return hooks


def test_file_of_walks_the_files_in_swap_periods_and_wraps_around():
    hooks = hooks_for(3, 1000)
    assert [hooks.file_of(step) for step in (0, 999, 1000, 2500, 3000, 4999)] == [0, 0, 1, 2, 0, 1]


def test_trained_on_names_the_file_of_the_failing_steps():
    error = training_loop.NonFiniteLossError("x", metric="loss", first_step=2001, last_step=2100)
    assert hooks_for(3, 1000).trained_on(error, Path("unused")) == "data/datasets/big/part-002.npz (file 3 of 3)"
    assert hooks_for(1, 1000).trained_on(error, Path("data/datasets/small.npz")) == "data/datasets/small.npz"
