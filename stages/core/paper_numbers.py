"""Published success rates (%) for OGBench singletask tasks, looked up by task name, and per-environment means.

The per-task tables live in ``stages/reference/*.csv`` (environment x task1..task5). Their environment names carry
the reward variant (``scene-play-sparse``) while task names do not (``scene-play-singletask-task2-v0``), so a task
is matched on its dataset name without the version and its task number. The per-environment means
(``baselines_env_means.csv``: the mean over an environment's five tasks, one row per method) name environments the
short way the paper does (``stages.core.ogbench_names``, ``DatasetSpec.environment``): ``cube-double``, ``scene``,
``puzzle-4x4-100m``.
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

from stages.core.ogbench_names import split_task

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference"
TABLES = {"rql": "rql_paper_per_task.csv", "fql": "fql_per_task.csv"}
PAPER_AGENTS = tuple(TABLES)  # the agents (run names) with published numbers
ENV_MEANS = "baselines_env_means.csv"
ENV_MEAN_METHODS = {"rql": "RQL", "fql": "FQL"}  # agent -> its row in ENV_MEANS


@cache
def _table(agent: str) -> dict[tuple[str, int], float]:
    path = REFERENCE_DIR / TABLES[agent]
    table: dict[tuple[str, int], float] = {}
    with path.open(newline="") as handle:
        for record in csv.DictReader(handle):
            stem = record["environment"].removesuffix("-sparse")
            for number in range(1, 6):
                table[(stem, number)] = float(record[f"task{number}"])
    return table


def paper_success(agent: str, task: str) -> float | None:
    """Published success rate (%) of ``agent`` ('rql' or 'fql') on an OGBench singletask task, or None.

    >>> paper_success("rql", "scene-play-singletask-task2-v0")
    72.0
    >>> paper_success("rql", "cube-single-play-singletask-task2-v0") is None
    True
    """
    if agent not in TABLES:
        return None
    try:
        spec = split_task(task)
    except ValueError:
        return None
    return _table(agent).get((spec.dataset.removesuffix(f"-{spec.version}"), spec.task_id))


@cache
def _env_means() -> dict[tuple[str, str], float]:
    with (REFERENCE_DIR / ENV_MEANS).open(newline="") as handle:
        return {(record["method"], environment): float(value) for record in csv.DictReader(handle)
                for environment, value in record.items() if environment not in ("method", "mean_of_10")}


def paper_env_mean(agent: str, environment: str) -> float | None:
    """Published mean success (%) of ``agent`` ('rql' or 'fql') over the five tasks of ``environment``, or None.

    >>> paper_env_mean("rql", "puzzle-4x4-100m")
    37.0
    >>> paper_env_mean("fql", "cube-single") is None
    True
    """
    method = ENV_MEAN_METHODS.get(agent)
    return None if method is None else _env_means().get((method, environment))
