"""Where every stage reads and writes, relative to the repository root (the one place that knows ``data/``).

A study is datasets x task numbers x seeds (params.yaml): what depends only on a dataset (its files, BC prior and
reversal cache) is kept once per dataset; runs and evaluations per dataset, task number and seed.

    data/params.json                                                     validate (the resolved params)
    data/datasets/<dataset>/<dataset>.npz, <dataset>-val.npz, manifest.json
                                                                         download (100m: <stem>-NNN[-val].npz)
    data/priors/<dataset>/policy.msgpack, prior.json                     prior
    data/reversed/<dataset>/part-*.parquet, manifest.json                reverse
    data/runs/<agent>/<dataset>/task<k>/seed<s>/policy.msgpack, summary.json, live/
                                                                         train (live/: dvclive metrics and plots)
    data/checkpoints/<agent>/<dataset>/task<k>/seed<s>/<fingerprint>/    train (Orbax, resumable, not a DVC output;
                                                                         $RQL_CHECKPOINTS instead of data/checkpoints)
    data/evals/<agent>/<dataset>/task<k>/seed<s>.json, seed<s>/rollout.gif
                                                                         evaluate (the folder is empty without video)
    reports/index.html, index.md, figures/                               report

dvc.yaml spells the same paths with its matrix items (`${item.dataset}`, `task${item.task}`, `seed${item.seed}`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stages.core.files import is_url

DATA = Path("data")
# A folder every node of a cluster reaches (a shared mount, or a gs:// URL), so that a train task retried on another node resumes
# from the newest checkpoint instead of step 0. Absolute: stages run in clones that are reset between tasks.
CHECKPOINTS_ENV = "RQL_CHECKPOINTS"
DATASETS = DATA / "datasets"  # one folder per dataset (dataset_dir)
RESOLVED_PARAMS = DATA / "params.json"
REPORTS = Path("reports")


def dataset_dir(dataset: str) -> Path:
    """The download stage's output for ``dataset``: its files in OGBench's names and format, and its manifest."""
    return DATASETS / dataset


def prior_dir(dataset: str) -> Path:
    return DATA / "priors" / dataset


def reversed_dir(dataset: str) -> Path:
    return DATA / "reversed" / dataset


def _task_run(agent: str, dataset: str, task: int) -> Path:
    """``<agent>/<dataset>/task<k>``: where the runs of task number ``task`` of ``dataset`` go, below each root."""
    return Path(agent) / dataset / f"task{task}"


def run_dir(agent: str, dataset: str, task: int, seed: int) -> Path:
    return DATA / "runs" / _task_run(agent, dataset, task) / f"seed{seed}"


def checkpoints_dir() -> Any:
    """``$RQL_CHECKPOINTS`` when set (an absolute local or mounted path, or a URL such as ``gs://bucket/ckpt``, kept
    as it is: an ``etils.epath.Path``, which Orbax reaches itself), else ``data/checkpoints``."""
    shared = os.environ.get(CHECKPOINTS_ENV, "")
    if not shared:
        return DATA / "checkpoints"
    if is_url(shared):
        from etils import epath

        return epath.Path(shared)
    if not Path(shared).is_absolute():
        raise ValueError(f"{CHECKPOINTS_ENV}={shared!r} is neither an absolute path nor a URL (a folder every node "
                         "reaches)")
    return Path(shared)


def shared_checkpoints() -> bool:
    return bool(os.environ.get(CHECKPOINTS_ENV))


def checkpoint_root(agent: str, dataset: str, task: int, seed: int) -> Any:
    return checkpoints_dir() / _task_run(agent, dataset, task) / f"seed{seed}"


def eval_json(agent: str, dataset: str, task: int, seed: int) -> Path:
    return DATA / "evals" / _task_run(agent, dataset, task) / f"seed{seed}.json"


def eval_video_dir(agent: str, dataset: str, task: int, seed: int) -> Path:
    return DATA / "evals" / _task_run(agent, dataset, task) / f"seed{seed}"


def eval_gif(agent: str, dataset: str, task: int, seed: int) -> Path:
    return eval_video_dir(agent, dataset, task, seed) / "rollout.gif"
