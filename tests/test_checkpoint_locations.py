"""Where training checkpoints go: a local path (made absolute) or a URL such as ``gs://bucket/ckpt``, which must reach
Orbax exactly as given (``pathlib.Path`` would turn it into ``gs:/bucket/ckpt``).

What is tested here: the path handling of every layer (``RQL_CHECKPOINTS`` in stages/layout.py, the run's folder in
stages/training.py, the coordinator's ``--checkpoints``, the checkpointer's hand-over to Orbax's
``CheckpointManager``), without touching any file system for a URL; and the checkpointer's own file operations on
the URL branch (manifest, verification, a damaged step moved aside: ``etils.epath`` calls) run against epath's local
backend. What is not: a real ``gs://`` bucket (no network here): Orbax's and TensorStore's GCS drivers themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from etils import epath
from test_checkpoints import _damage, _largest_state_file, assert_states_equal, init_state, saved_steps

from stages import layout, training
from stages.cluster_repro import checkpoints_location
from stages.core import checkpoints as C
from stages.core.files import is_url

URL = "gs://rql-bucket/shared/ckpt"


@pytest.mark.parametrize("location, url", [
    ("gs://b/x", True), ("s3://b", True), ("hf://org/repo", True), ("file:///tmp/x", True),
    ("/shared/ckpt", False), ("data/checkpoints", False), ("~/ckpt", False), ("gs:/b/x", False), ("", False),
    (Path("/abs"), False), (epath.Path("gs://b/x"), True),
])
def test_is_url(location, url):
    assert is_url(location) is url


def test_a_url_reaches_orbax_untouched_and_a_local_path_absolute(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    given = []

    class Recorder:  # stands in for Orbax's CheckpointManager: records what it is handed, touches nothing
        def __init__(self, directory, **kwargs):
            given.append(directory)

        def wait_until_finished(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(ocp, "CheckpointManager", Recorder)
    with C.TrainCheckpointer(URL + "/rql/task/seed0/abc", save_every=1) as ckpt:
        assert os.fspath(ckpt.directory) == URL + "/rql/task/seed0/abc" and ckpt._remote
        assert str(ckpt.directory / "3") == URL + "/rql/task/seed0/abc/3"
    monkeypatch.chdir(tmp_path)
    with C.TrainCheckpointer("relative/ckpt", save_every=1) as ckpt:
        assert ckpt.directory == tmp_path / "relative" / "ckpt" and not ckpt._remote
    assert [os.fspath(directory) for directory in given] == [URL + "/rql/task/seed0/abc",
                                                             str(tmp_path / "relative" / "ckpt")]
    assert isinstance(given[1], Path) and not isinstance(given[0], Path)


def test_rql_checkpoints_in_the_layout_and_the_run_folder(monkeypatch):
    monkeypatch.delenv(layout.CHECKPOINTS_ENV, raising=False)
    assert layout.checkpoints_dir() == Path("data/checkpoints") and not layout.shared_checkpoints()
    monkeypatch.setenv(layout.CHECKPOINTS_ENV, "/shared/ckpt")
    assert layout.checkpoint_root("rql", "cube-single-play-v0", 2, 0) == Path("/shared/ckpt/rql/cube-single-play-v0/task2/seed0")
    monkeypatch.setenv(layout.CHECKPOINTS_ENV, "shared/ckpt")
    with pytest.raises(ValueError, match="neither an absolute path nor a URL"):
        layout.checkpoints_dir()
    monkeypatch.setenv(layout.CHECKPOINTS_ENV, URL)
    assert os.fspath(layout.checkpoints_dir()) == URL and layout.shared_checkpoints()
    root = layout.checkpoint_root("rql", "cube-single-play-v0", 2, 2)
    assert os.fspath(root) == f"{URL}/rql/cube-single-play-v0/task2/seed2"

    def no_file_system(*args, **kwargs):
        raise AssertionError("the run's folder was looked up on the URL's file system")

    for name in ("exists", "glob", "iterdir", "rmtree"):  # a shared location: other fingerprints are left alone
        monkeypatch.setattr(type(root), name, no_file_system)
    identity = {"agent": "rql", "dataset": "cube-single-play-v0", "task": 2, "seed": 2}
    folder = training.checkpoint_dir("rql", "cube-single-play-v0", 2, 2, identity)
    assert os.fspath(folder) == f"{URL}/rql/cube-single-play-v0/task2/seed2/{training.fingerprint(identity)}"
    assert folder.name == training.fingerprint(identity)  # the checkpointer's metadata


def test_the_coordinator_s_checkpoints_option(tmp_path):
    assert checkpoints_location(URL, tmp_path, local=False) == URL
    assert checkpoints_location("/shared/ckpt", tmp_path, local=False) == "/shared/ckpt"
    assert checkpoints_location("~/ckpt", tmp_path, local=False) == "~/ckpt"  # expanded on each node
    assert checkpoints_location(None, tmp_path, local=True) == str(tmp_path / "data" / "checkpoints")
    assert checkpoints_location(None, tmp_path, local=False) is None
    with pytest.raises(SystemExit, match="neither an absolute path nor a URL"):
        checkpoints_location("ckpt", tmp_path, local=False)


def test_the_url_branch_of_the_checkpointer_s_own_file_operations(tmp_path, monkeypatch, caplog):
    """The checkpointer as it runs on a URL (epath for the manifest, its check and moving a damaged step aside),
    with epath's local backend underneath: save, damage the newest step, resume from the one before."""
    monkeypatch.setattr(C, "is_url", lambda location: True)
    directory = tmp_path / "ck"
    states = saved_steps(directory)
    with C.TrainCheckpointer(directory, save_every=1, metadata={"run": "x"}) as ckpt:
        assert ckpt._remote and not isinstance(ckpt.directory, Path)
        assert set(ckpt._step_files(3)) and ckpt._size(ckpt.directory / "3" / C.FILES_MANIFEST) > 0
    _damage(_largest_state_file(directory / "3"), "truncate")
    with C.TrainCheckpointer(directory, save_every=1, metadata={"run": "x"}) as ckpt:
        state, step, _, skipped = ckpt.resume(init_state(5))
    assert (step, skipped) == (2, (3,))
    assert_states_equal(state, states[2])
    assert (directory / C.UNREADABLE_DIR / "3").is_dir() and not (directory / "3").exists()
    assert any("(truncated?)" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
