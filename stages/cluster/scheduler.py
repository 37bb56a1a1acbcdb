"""The coordinator's side: every stage a Ray task as soon as its upstream stages are done, progress, logs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from stages.cluster.dag import GPU_KINDS, Dag, kind
from stages.cluster.worker import run_stage


@ray.remote(num_cpus=0)
class Board:
    """Where tasks say that they started (node, pid, attempt), for the coordinator's display and the tests."""

    def __init__(self):
        self.attempts: dict[str, list[dict[str, Any]]] = {}

    def started(self, stage: str, node: str, pid: int, when: float) -> None:
        self.attempts.setdefault(stage, []).append({"node": node, "pid": pid, "started": when})

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        return self.attempts


@dataclass
class Resources:
    cpus: float
    gpus: float
    env: dict[str, str] = field(default_factory=dict)


def stage_resources(stage: str, params: Any, has_gpus: bool, max_cpus: float) -> Resources:
    """What the stage's task asks for, from params.yaml's ``cluster`` section (``auto``: the stage's own workers)."""
    cluster, stage_kind = params.cluster, kind(stage)
    cpus = cluster.cpus
    if stage_kind == "download":
        cpus = params.data.workers if cluster.download_cpus == "auto" else cluster.download_cpus
    elif stage_kind == "evaluate":
        cpus = params.evaluate.workers if cluster.evaluate_cpus == "auto" else cluster.evaluate_cpus
    cpus = max(min(cpus, max_cpus), 1) if max_cpus >= 1 else cpus  # never more than the largest node has
    gpus = cluster.gpus if has_gpus and stage_kind in GPU_KINDS else 0.0
    env: dict[str, str] = {}
    if gpus and gpus < 1:  # several runs share a GPU: no process may preallocate most of its memory
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 * gpus:.3f}")
    elif has_gpus and not gpus:
        env["JAX_PLATFORMS"] = "cpu"  # a task without a GPU share must not take a GPU's memory
    return Resources(cpus=cpus, gpus=gpus, env=env)


@dataclass
class StageState:
    status: str = "pending"  # pending | queued (submitted) | running | ran | restored | failed | skipped
    node: str = ""
    started: float = 0.0
    finished: float = 0.0
    attempts: int = 0
    error: str = ""
    log: str = ""
    result: dict[str, Any] = field(default_factory=dict)


class Scheduler:
    """Runs ``dag`` on the connected Ray cluster; ``display`` gets every transition and a periodic refresh."""

    def __init__(self, dag: Dag, base_spec: dict[str, Any], resources: dict[str, Resources], retries: int,
                 logs: Path, display: Any):
        self.dag, self.base_spec, self.resources, self.retries = dag, base_spec, resources, retries
        self.logs, self.display = logs, display
        self.states = {name: StageState() for name in dag.order}
        self.accepted: dict[str, dict[str, Any]] = {}
        # On the coordinator's node: it lives as long as the coordinator, whichever worker nodes are lost.
        here = ray.get_runtime_context().get_node_id()
        self.board = Board.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()

    def _submit(self, name: str) -> ray.ObjectRef:
        need = self.resources[name]
        # The direct upstream stages only: the task runs `dvc repro --single-item`, which checks nothing further up,
        # so a task's pull and dvc.lock stay as small as the stage's own deps however deep the DAG.
        spec = dict(self.base_spec, stage=name, upstream={up: self.accepted[up] for up in self.dag.upstream[name]},
                    env={**self.base_spec.get("env", {}), **need.env})
        task = ray.remote(run_stage).options(num_cpus=need.cpus, num_gpus=need.gpus, max_retries=self.retries,
                                             retry_exceptions=False, name=f"stage:{name}")
        return task.remote(spec, self.board)

    def _write_log(self, name: str, text: str) -> str:
        path = self.logs / f"{name.replace('/', '_')}.log"
        path.write_text(text)
        return str(path)

    def _finish(self, name: str, result: dict[str, Any] | None, error: str = "") -> None:
        state = self.states[name]
        state.finished = time.time()
        if result is None:
            state.status, state.error = "failed", error
            state.log = self._write_log(name, f"# the task of {name} died: {error}\n")
        else:
            state.result = {k: v for k, v in result.items() if k not in ("log", "entry")}
            state.node = result.get("node", state.node)
            state.log = self._write_log(name, result.get("log", ""))
            state.status = result["status"]
            state.error = result.get("error", "")
            if result["status"] in ("ran", "restored"):
                self.accepted[name] = result["entry"]
        if state.status == "failed":
            for down in self.dag.descendants(name):
                if self.states[down].status == "pending":
                    self.states[down].status, self.states[down].error = "skipped", f"upstream {name} failed"
                    self.display.transition(down, self.states[down])
        self.display.transition(name, state)

    def _poll_board(self) -> None:
        for name, attempts in ray.get(self.board.snapshot.remote()).items():
            state = self.states.get(name)
            if state is None or state.status not in ("queued", "running") or len(attempts) == state.attempts:
                continue
            state.attempts, state.node, state.started = len(attempts), attempts[-1]["node"], attempts[-1]["started"]
            state.status = "running"
            self.display.transition(name, state)

    def attempts(self) -> dict[str, list[dict[str, Any]]]:
        return ray.get(self.board.snapshot.remote())

    def run(self) -> dict[str, StageState]:
        running: dict[ray.ObjectRef, str] = {}
        while True:
            for name in self.dag.order:
                state = self.states[name]
                if state.status == "pending" and all(up in self.accepted for up in self.dag.upstream[name]):
                    state.status, state.started = "queued", time.time()
                    running[self._submit(name)] = name
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in done:
                name = running.pop(ref)
                try:
                    self._finish(name, ray.get(ref))
                except ray.exceptions.RayError as error:  # the task's process died more often than retried
                    self._finish(name, None, f"{type(error).__name__}: {str(error).splitlines()[0]}")
            self._poll_board()
            self.display.refresh(self.states)
        return self.states


def write_summary(path: Path, states: dict[str, StageState], attempts: dict[str, list], extra: dict) -> None:
    stages = {}
    for name, state in states.items():
        stages[name] = {"status": state.status, "node": state.node, "attempts": len(attempts.get(name, [])),
                        "attempt_nodes": [attempt["node"] for attempt in attempts.get(name, [])],
                        "seconds": round(state.finished - state.started, 3) if state.finished else None,
                        "times": {k: round(v, 3) for k, v in state.result.get("times", {}).items()},
                        "error": state.error, "log": state.log,
                        "run_cache_entry": state.result.get("run_cache_entry")}
    path.write_text(json.dumps({"stages": stages, **extra}, indent=1))
