"""Published success rates (%) for OGBench singletask tasks, looked up by task name.

The tables live in ``stages/reference/*.csv`` (environment x task1..task5). Their environment names carry the
reward variant (``scene-play-sparse``) while task names do not (``scene-play-singletask-task2-v0``), so a task is
matched on its dataset stem and task number.
"""

from __future__ import annotations

import csv
import re
from functools import cache
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference"
TABLES = {"rql": "rql_paper_per_task.csv", "fql": "fql_per_task.csv"}
_TASK = re.compile(r"^(?P<stem>.+)-singletask-task(?P<number>[1-5])-v0$")


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
    match = _TASK.match(task)
    if match is None:
        return None
    return _table(agent).get((match["stem"], int(match["number"])))
