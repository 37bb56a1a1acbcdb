"""The training data of a task, as the prior, reverse and train stages read it from ``data/datasets``.

A 1M dataset is one file. A 100M dataset (``*-100m-v0``) is a folder of 1M-transition files: training streams it
file by file (one file on the device at a time, the next one every ``train.dataset_swap_every`` steps, as the
reference does); the prior and the reversal cache use its first file.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages import layout
from stages.core import ogbench_data
from stages.core.files import sha256_file
from stages.core.ogbench_names import dataset_for_task, env_for_task
from stages.params import Params, resolve_sparse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskData:
    """A task's relabelled training arrays (see ``ogbench_data.load_training_data``) and the file they came from."""

    task: str
    arrays: dict[str, np.ndarray]
    path: Path
    sha256: str

    @property
    def obs_dim(self) -> int:
        return int(self.arrays["observations"].shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.arrays["actions"].shape[1])

    @property
    def size(self) -> int:
        return int(self.arrays["observations"].shape[0])


def training_files(task: str, dataset_dir: Path = layout.DATASETS) -> list[Path]:
    """The training files of ``task``'s dataset, in order (one for a 1M dataset)."""
    return [train for train, _ in ogbench_data.dataset_files(dataset_dir, dataset_for_task(task))]


def load_task_data(params: Params, task: str, file_index: int = 0, dataset_dir: Path = layout.DATASETS,
                   env=None) -> TaskData:
    """Load one training file of ``task`` with OGBench's singletask relabelling (and sparse rewards where configured)."""
    files = training_files(task, dataset_dir)
    path = files[file_index % len(files)]
    log.info("loading %s for %s", path, task)
    arrays = ogbench_data.load_training_data(path, env_for_task(task), sparse=resolve_sparse(params, task), env=env)
    return TaskData(task=task, arrays=arrays, path=path, sha256=sha256_file(path))


def dataset_fingerprint(task: str, dataset_dir: Path = layout.DATASETS) -> str:
    """sha256 over the sha256s of all of ``task``'s training files (hashing each file once; fine for 1M datasets,
    a few minutes for 100M ones, where the download manifest's recorded hashes are used instead)."""
    import json

    manifest = dataset_dir / "manifest.json"
    files = training_files(task, dataset_dir)
    recorded = {}
    if manifest.is_file():
        entry = json.loads(manifest.read_text()).get("datasets", {}).get(dataset_for_task(task), {})
        recorded = {name: info.get("sha256") for name, info in entry.get("files", {}).items()}
    digests = [recorded.get(path.relative_to(dataset_dir).as_posix()) or sha256_file(path) for path in files]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest() if len(files) > 1 else digests[0]
