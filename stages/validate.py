"""Stage ``validate``: params.yaml checked as a whole -> ``data/params.json``, the settings the study resolves to.

    python -m stages.validate

DVC reruns a stage only when the params it declares change, so a misspelt key (``train.stepz``) or an unknown
section would otherwise pass unnoticed whenever no other stage has to rerun. This stage depends on the whole
params.yaml file: any edit reruns it, and a bad file fails ``dvc repro`` with the key and the problem. Its output
(the validated params, each dataset's effective agent settings, which its prior and cache are built with, and each
task's dataset and environment) feeds the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from stages import cli, layout
from stages.core.ogbench_names import parse_dataset, parse_task
from stages.params import load_params, resolve_agent

log = logging.getLogger("stages.validate")


def resolved(params) -> dict:
    """The validated params and, per dataset and per task, what the stages will use (presets applied)."""
    datasets = {dataset: {"family": parse_dataset(dataset).family, "environment": parse_dataset(dataset).environment,
                          "agent": dataclasses.asdict(resolve_agent(params, dataset))}
                for dataset in params.datasets}  # fmt: skip
    tasks = {task.name: {"dataset": task.dataset, "number": task.number, "env": parse_task(task.name).env}
             for task in params.study_tasks}  # fmt: skip
    return {"params": params.model_dump(mode="json"), "datasets": datasets, "tasks": tasks,
            "runs": params.agents.runs}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__.strip().split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cli.write_json(layout.RESOLVED_PARAMS, resolved(params))
    log.info("%s is valid: %d datasets x %d tasks x %d seeds x %d runs -> %s", args.params, len(params.datasets),
             len(params.tasks), len(params.seeds), len(params.agents.runs), layout.RESOLVED_PARAMS)


if __name__ == "__main__":
    cli.run(main)
