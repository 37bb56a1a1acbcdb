"""The training data of a dataset, as the prior, reverse and train stages read it from its folder in ``data/datasets``.

The train stage loads it for its task (OGBench's singletask relabelling: ``load_task_data``); the prior and reverse
stages, which read no reward, load it once for all of the dataset's tasks (``load_dataset_data``). A 1M dataset is
one file. A 100M dataset (``*-100m-v0``) is a folder of 1M-transition files: training streams it file by file (one
file on the device at a time, the next one every ``train.dataset_swap_every`` steps, as the reference does); the
prior and the reversal cache use its first file.
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
from stages.core.ogbench_names import parse_dataset, parse_task
from stages.params import Params, resolve_sparse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskData:
    """A dataset file's training arrays (see ``ogbench_data.load_training_data``), the file they came from, and the
    task they are relabelled for (None: no task, rewards 0 and masks 1)."""

    dataset: str
    task: str | None
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


def training_files(dataset: str, folder: Path | None = None) -> list[Path]:
    """The training files of ``dataset`` in ``folder`` (default: its folder in data/datasets), in order (one for a
    1M dataset)."""
    folder = layout.dataset_dir(dataset) if folder is None else folder
    return [train for train, _ in ogbench_data.dataset_files(folder, dataset)]


def _file(dataset: str, file_index: int, folder: Path | None) -> Path:
    files = training_files(dataset, folder)
    return files[file_index % len(files)]


def load_task_data(params: Params, task: str, file_index: int = 0, folder: Path | None = None,
                   env=None) -> TaskData:
    """Load one training file of ``task``'s dataset with OGBench's singletask relabelling (and sparse rewards where
    configured)."""
    spec = parse_task(task)
    path = _file(spec.dataset, file_index, folder)
    log.info("loading %s for %s", path, task)
    arrays = ogbench_data.load_training_data(path, spec.env, sparse=resolve_sparse(params, spec.dataset), env=env)
    return TaskData(dataset=spec.dataset, task=task, arrays=arrays, path=path, sha256=sha256_file(path))


def load_dataset_data(dataset: str, file_index: int = 0, folder: Path | None = None) -> TaskData:
    """Load one training file of ``dataset`` for no task (``ogbench_data.load_behaviour_data``): what the BC prior and
    the reversal cache read, the same for every task of the dataset."""
    path = _file(dataset, file_index, folder)
    log.info("loading %s (no task: the behaviour only)", path)
    arrays = ogbench_data.load_behaviour_data(path, parse_dataset(dataset).default_env)
    return TaskData(dataset=dataset, task=None, arrays=arrays, path=path, sha256=sha256_file(path))


def dataset_fingerprint(dataset: str, folder: Path | None = None) -> str:
    """sha256 over the sha256s of all of ``dataset``'s training files (hashing each file once; fine for 1M datasets,
    a few minutes for 100M ones, where the download manifest's recorded hashes are used instead)."""
    import json

    folder = layout.dataset_dir(dataset) if folder is None else folder
    manifest = folder / "manifest.json"
    files = training_files(dataset, folder)
    recorded = {}
    if manifest.is_file():
        entry = json.loads(manifest.read_text()).get("datasets", {}).get(dataset, {})
        recorded = {name: info.get("sha256") for name, info in entry.get("files", {}).items()}
    digests = [recorded.get(path.relative_to(folder).as_posix()) or sha256_file(path) for path in files]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest() if len(files) > 1 else digests[0]
