"""Where every stage reads and writes, relative to the repository root (the one place that knows ``data/``).

    data/params.json                                                    validate (the resolved params)
    data/datasets/<dataset>.npz, <dataset>-val.npz, manifest.json      download
    data/priors/<task>/policy.msgpack, prior.json                       prior
    data/reversed/<task>/part-*.parquet, manifest.json                  reverse
    data/runs/<agent>/<task>/seed<k>/policy.msgpack, summary.json, live/ train (live/: dvclive metrics and plots)
    data/checkpoints/<agent>/<task>/seed<k>/<fingerprint>/              train (Orbax, resumable, not a DVC output;
                                                                        $RQL_CHECKPOINTS instead of data/checkpoints)
    data/evals/<agent>/<task>/seed<k>.json, seed<k>/rollout.gif         evaluate (the folder is empty without video)
    reports/index.html, index.md, figures/                              report
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
DATASETS = DATA / "datasets"
RESOLVED_PARAMS = DATA / "params.json"
REPORTS = Path("reports")


def prior_dir(task: str) -> Path:
    return DATA / "priors" / task


def reversed_dir(task: str) -> Path:
    return DATA / "reversed" / task


def run_dir(agent: str, task: str, seed: int) -> Path:
    return DATA / "runs" / agent / task / f"seed{seed}"


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


def checkpoint_root(agent: str, task: str, seed: int) -> Any:
    return checkpoints_dir() / agent / task / f"seed{seed}"


def eval_json(agent: str, task: str, seed: int) -> Path:
    return DATA / "evals" / agent / task / f"seed{seed}.json"


def eval_video_dir(agent: str, task: str, seed: int) -> Path:
    return DATA / "evals" / agent / task / f"seed{seed}"


def eval_gif(agent: str, task: str, seed: int) -> Path:
    return eval_video_dir(agent, task, seed) / "rollout.gif"
