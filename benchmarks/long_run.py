"""Run a study stage by stage and record what each stage cost: wall time, CPU time and peak memory.

For long runs (issue 10's puzzle-3x3 at OGBench's dataset size) that span sessions: every stage runs as
``dvc repro --single-item <stage>`` in the given workspace, in DVC's own order (``dvc stage list``), optionally with
the train stages of one task grouped together (``--by-task``: RQL, FQL and BC-flow of the first task finish before the
second task starts, so a partial run already compares the agents). A stage that is already up to date is skipped; a
train stage killed with the session resumes from its newest checkpoint on the next call. One JSON line per stage run
is appended to ``<workspace>/long_run_costs.jsonl``:

    {"stage": ..., "wall_s": ..., "cpu_s": ..., "max_rss_mib": ..., "exit": ..., "finished": ...}

``max_rss_mib`` is the largest resident set of any process of the stage (``wait4``'s rusage: the stage's python and
its workers, whichever peaked). Usage, from the workspace:

    cp stages/presets/puzzle_long.yaml params.yaml
    nice -n 19 .venv/bin/python benchmarks/long_run.py --by-task
    .venv/bin/python benchmarks/long_run.py --progress      # the learning curves so far, from the checkpoints

``--progress`` reads the metric history saved with each run's newest checkpoint (plain JSON inside the Orbax step
folder: no restore, safe while the run trains) and prints every evaluation's success per agent, task and step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def stage_names(workspace: Path) -> list[str]:
    out = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=workspace, check=True, capture_output=True,
                         text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def order_by_task(names: list[str]) -> list[str]:
    """Keep DVC's order, but run the train and evaluate stages task by task (all agents of a task together);
    stage items are ``<agent>-<dataset>-<task number>-<seed>``."""
    runs = [n for n in names if n.startswith(("train_", "evaluate_"))]
    if not runs:
        return names
    first = names.index(runs[0])
    rest = [n for n in names if n not in runs]

    groups = list(dict.fromkeys(n.split("@")[0].split("_", 1)[1] for n in runs))  # agent groups, DVC's order

    def key(name: str) -> tuple[str, int, int]:
        kind, item = name.split("@", 1)
        task = re.fullmatch(r"[^-]+-(.+)-\d+", item)
        return (task.group(1) if task else item, groups.index(kind.split("_", 1)[1]), kind.startswith("evaluate_"))

    return rest[:first] + sorted(runs, key=key) + rest[first:]


def is_up_to_date(workspace: Path, stage: str) -> bool:
    out = subprocess.run(["dvc", "status", "--json", stage], cwd=workspace, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        return False
    status = json.loads(out.stdout or "{}")
    return not any(name == stage for name in status)


def run_stage(workspace: Path, stage: str) -> dict:
    start, started = time.monotonic(), time.time()
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=workspace)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"stage": stage, "wall_s": round(time.monotonic() - start, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "max_rss_mib": round(usage.ru_maxrss / 1024),
            "exit": proc.returncode, "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}


def progress(workspace: Path) -> dict[str, dict[int, float]]:
    """Run (agent/dataset/task<k>/seed<s>) -> {step: eval success %} from the newest checkpoint of each run, and the
    newest step."""
    curves: dict[str, dict[int, float]] = {}
    for run in sorted((workspace / "data" / "checkpoints").glob("*/*/task*/seed*/*")):
        steps = sorted((int(p.name), p) for p in run.iterdir() if p.name.isdigit() and (p / "extras").is_dir())
        if not steps:
            continue
        newest, folder = steps[-1]
        try:
            history = json.loads((folder / "extras" / "metadata").read_text())["history"]
        except (OSError, ValueError, KeyError):
            continue
        name = "/".join(run.relative_to(workspace / "data" / "checkpoints").parts[:4])
        curve = {int(step): float(row["eval/success"]) for step, row in history if "eval/success" in row}
        curves[name] = {**curve, -1: float(newest)}  # -1: the newest saved step
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path.cwd())
    parser.add_argument("--by-task", action="store_true", help="train and evaluate all agents of a task together")
    parser.add_argument("--only", default=None, help="regex: run only the stages whose name matches")
    parser.add_argument("--progress", action="store_true", help="print the learning curves so far and exit")
    args = parser.parse_args(argv)
    workspace = args.workspace.resolve()
    if args.progress:
        for name, curve in progress(workspace).items():
            newest = int(curve.pop(-1))
            points = ", ".join(f"{step // 1000}k: {value:.0f}%" for step, value in sorted(curve.items()))
            print(f"{name} (checkpoint at step {newest}): {points or 'no evaluation yet'}")
        return 0
    env_bin = str(workspace / ".venv" / "bin")
    os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")  # the stages' python, as after activation
    names = stage_names(workspace)
    if args.by_task:
        names = order_by_task(names)
    if args.only:
        names = [n for n in names if re.search(args.only, n)]
    log = workspace / "long_run_costs.jsonl"
    for stage in names:
        if is_up_to_date(workspace, stage):
            print(f"[long_run] {stage}: up to date", flush=True)
            continue
        print(f"[long_run] {stage}: running", flush=True)
        record = run_stage(workspace, stage)
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[long_run] {json.dumps(record)}", flush=True)
        if record["exit"] != 0:
            print(f"[long_run] {stage} failed (exit {record['exit']}); stopping", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
