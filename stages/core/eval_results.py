"""What an evaluation produces: each episode's outcome, their summary (success with its Wilson interval, means,
throughput) and, for some episodes, video frames."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from stages.core.stats import wilson_interval


@dataclass(frozen=True)
class EpisodeResult:
    """One episode: its index, reset seed, outcome, and the number of policy queries it used."""

    episode: int
    seed: int
    success: bool
    episode_return: float
    length: int
    policy_queries: int


@dataclass(frozen=True)
class EvalSummary:
    """Aggregate over the episodes of one evaluation.

    ``success_ci95`` is the Wilson score 95% interval of the success rate. ``policy_calls`` counts batched calls;
    ``wall_time_s`` is the rollout time, ``policy_time_s`` the part of it spent in the policy (its calls and output
    checks); ``setup_time_s`` is the time spent making environments and starting workers before it (0 when an
    :class:`Evaluator` reuses them) and ``warm_up_time_s`` that of the warm-up policy call (overlapping the workers'
    start-up; 0 without one).
    """

    episodes: int
    successes: int
    success_rate: float
    success_ci95: tuple[float, float]
    mean_return: float
    mean_length: float
    env_steps: int
    policy_calls: int
    wall_time_s: float
    setup_time_s: float
    env_steps_per_s: float
    episodes_per_s: float
    policy_time_s: float = 0.0
    warm_up_time_s: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    """Everything an evaluation produced. ``videos`` maps an episode index to its frames, uint8 (T, H, W, 3)."""

    env_id: str
    summary: EvalSummary
    episodes: tuple[EpisodeResult, ...]
    videos: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready summary and per-episode records (videos are left out)."""
        summary = asdict(self.summary)
        summary["success_ci95"] = list(self.summary.success_ci95)
        return {"env_id": self.env_id, "summary": summary, "episodes": [asdict(e) for e in self.episodes]}


def summarize(
    episodes: Sequence[EpisodeResult],
    wall_time_s: float,
    policy_calls: int,
    setup_time_s: float = 0.0,
    policy_time_s: float = 0.0,
    warm_up_time_s: float = 0.0,
) -> EvalSummary:
    """Summary statistics of finished episodes (success rate with its Wilson 95% interval, means, throughput)."""
    if not episodes:
        raise ValueError("no episodes to summarize")
    n = len(episodes)
    successes = sum(bool(e.success) for e in episodes)
    steps = sum(e.length for e in episodes)
    wall = max(float(wall_time_s), 1e-9)
    return EvalSummary(
        episodes=n,
        successes=successes,
        success_rate=successes / n,
        success_ci95=wilson_interval(successes, n),
        mean_return=float(np.mean([e.episode_return for e in episodes])),
        mean_length=float(np.mean([e.length for e in episodes])),
        env_steps=int(steps),
        policy_calls=int(policy_calls),
        wall_time_s=float(wall_time_s),
        setup_time_s=float(setup_time_s),
        env_steps_per_s=steps / wall,
        episodes_per_s=n / wall,
        policy_time_s=float(policy_time_s),
        warm_up_time_s=float(warm_up_time_s),
    )
