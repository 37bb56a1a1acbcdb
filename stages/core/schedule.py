"""A training run's schedule: when it logs, checkpoints, evaluates, refreshes its cache and swaps dataset files.

Light (standard library only): the params schema checks the schedules its settings give with the same rules
(:func:`schedule_problems`) before any stage starts, naming params.yaml's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

PERIODS = ("total_steps", "log_every", "checkpoint_every", "eval_every", "refresh_every", "swap_every")


def schedule_problems(values: dict[str, int]) -> list[tuple[str, str]]:
    """``(setting, problem)`` for each rule of a :class:`Schedule` that ``values`` (its fields) break: the one
    statement of the rules, which the params schema reports under its own key names. A problem names the other
    setting it refers to as ``{updates_per_call}`` or ``{refresh_every}`` (for the caller to fill in)."""
    per_call, problems = values["updates_per_call"], []
    if per_call < 1:
        return [("updates_per_call", "must be >= 1")]
    for name in PERIODS:
        value = values.get(name, 0)
        if value < 0 or value % per_call:
            problem = f"must be a non-negative multiple of {{updates_per_call}}={per_call}"
            problems.append((name, problem + " (updates run in fused calls of that many steps)"))
    for name in ("total_steps", "log_every", "checkpoint_every"):
        if values.get(name, 0) < 1:
            problems.append((name, "must be >= 1"))
    refresh = values.get("refresh_every", 0)
    if refresh > 0 and values.get("checkpoint_every", 0) % refresh:
        # A resumed run rebuilds the cache from the restored actor, which is only the actor the uninterrupted run
        # refreshed from if every checkpoint falls on a refresh boundary.
        problem = f"must be a multiple of {{refresh_every}}={refresh}"
        problems.append(("checkpoint_every", problem + " so that a resumed run rebuilds the same cache"))
    return problems


@dataclass(frozen=True)
class Schedule:
    """When things happen, in update steps. Every period is a multiple of ``updates_per_call`` (0 = never); the
    rules: :func:`schedule_problems`."""

    total_steps: int
    updates_per_call: int
    log_every: int
    checkpoint_every: int
    eval_every: int = 0
    refresh_every: int = 0
    swap_every: int = 0

    def __post_init__(self) -> None:
        problems = schedule_problems(vars(self))
        if problems:
            name, problem = problems[0]
            names = {"updates_per_call": "updates_per_call", "refresh_every": "refresh_every"}
            raise ValueError(f"{name}={getattr(self, name)} {problem.format(**names)}")

    @staticmethod
    def due(step: int, every: int) -> bool:
        return every > 0 and step % every == 0
