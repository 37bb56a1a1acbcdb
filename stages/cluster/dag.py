"""The stages ``dvc repro [targets]`` would consider, in its order, with their upstream stages (DVC's own graph)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GPU_KINDS = ("prior", "reverse", "train")


@dataclass
class Dag:
    order: list[str]  # dvc repro's order (a topological order)
    upstream: dict[str, list[str]]  # stage -> the stages it directly depends on, in dvc repro's order
    breakers: dict[str, str] = field(default_factory=dict)  # stage -> why the run-cache cannot carry it

    def ancestors(self, stage: str) -> list[str]:
        seen: set[str] = set()
        todo = list(self.upstream[stage])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.upstream[name])
        return [name for name in self.order if name in seen]

    def descendants(self, stage: str) -> set[str]:
        found: set[str] = set()
        for name in self.order:
            if any(up == stage or up in found for up in self.upstream[name]):
                found.add(name)
        return found


def load_dag(workspace: Path, targets: list[str]) -> Dag:
    """Stages (with ancestors) of ``targets`` (all when empty), as DVC resolves them; frozen stages cut loose."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro
    from dvc.stage import PipelineStage

    with Repo(str(workspace)) as repo:
        graph = get_active_graph(repo.index.graph)
        stages = collect_stages(repo, targets) if targets else None
        steps = plan_repro(graph, stages)
        names = {stage: stage.addressing for stage in steps}
        dag = Dag(order=[], upstream={})
        for stage in steps:
            if not isinstance(stage, PipelineStage):
                continue  # a .dvc file: data, pushed by its owner, nothing to run
            name = names[stage]
            dag.order.append(name)
            # in dvc repro's order, not by name: the worker pulls and git-ignores them in this order, and DVC's
            # .gitignore in a folder two of them write into is part of that folder's hash as a dependency
            direct = {names[up] for up in graph.successors(stage) if up in names and isinstance(up, PipelineStage)}
            dag.upstream[name] = [earlier for earlier in dag.order if earlier in direct]
            if stage.always_changed:
                dag.breakers[name] = "always_changed: true (DVC keeps no run-cache entry for it)"
            for out in stage.outs:
                if not out.use_cache:
                    dag.breakers[name] = f"output {out.def_path} has cache: false (never pushed, not restorable)"
                elif out.persist:
                    dag.breakers[name] = f"output {out.def_path} has persist: true (no run-cache entry)"
        return dag


def kind(stage: str) -> str:
    """'train' for train_rql@..., 'evaluate' for evaluate_fql@..., else the stage's name before '@'."""
    base = stage.split("@")[0]
    return base.split("_")[0] if base.startswith(("train_", "evaluate_")) else base
