"""The training data of a task, as the prior, reverse and train stages read it from ``data/datasets``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages import layout
from stages.core import ogbench_data
from stages.params import Params, dataset_for_task, env_for_task, resolve_sparse

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


def load_task_data(params: Params, task: str, dataset_dir: Path = layout.DATASETS) -> TaskData:
    """Load ``task``'s training split with OGBench's singletask relabelling (and sparse rewards where configured)."""
    dataset = dataset_for_task(task)
    pairs = ogbench_data.dataset_files(dataset_dir, dataset)
    if len(pairs) != 1:
        raise ogbench_data.DatasetFileError(
            f"{dataset_dir / dataset}: {dataset} is a {len(pairs)}-file dataset; training streams only 1M datasets "
            "so far (use the first file by copying it to "
            f"{dataset_dir / (dataset + '.npz')} or pick a 1M dataset)"
        )
    train_path = pairs[0][0]
    log.info("loading %s for %s", train_path, task)
    arrays = ogbench_data.load_training_data(train_path, env_for_task(task), sparse=resolve_sparse(params, task))
    return TaskData(task=task, arrays=arrays, path=train_path, sha256=ogbench_data.sha256_file(train_path))
