"""The agents a study can train, in one table (light: no JAX, read by the params schema and by every stage).

Each entry is a run name of ``params.yaml``'s ``agents``: the algorithm it trains (the module
``stages.core.agents.<algorithm>``), the group it belongs to (its ``agents.<group>`` list and its
``train_<group>`` / ``evaluate_<group>`` stages in dvc.yaml), how it gets the partial actions of flow reversal,
and the algorithm's own config fields taken from the params. Adding a baseline: its file in stages/core/agents/,
an entry here, its two stages in dvc.yaml (and, if it has hyperparameters of its own, their section in
stages/params.py). README: "Adding an agent".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Options = Callable[[Any, Any, "Agent"], dict[str, Any]]  # (params, resolved agent settings, entry) -> fields


@dataclass(frozen=True)
class Agent:
    algorithm: str  # the module stages.core.agents.<algorithm> (Config, TrainState, init, make_update, ...)
    group: str  # params.yaml `agents.<group>` and the train_<group> / evaluate_<group> stages
    options: Options  # the algorithm's Config fields beyond the flow fields every agent shares
    reversal: Literal["online", "cached", "none"] = "none"  # where RQL's partial actions come from
    refreshes: bool = False  # cached: the cache is rebuilt from the current actor every train.refresh_every steps


def critic_fields(params, resolved) -> dict[str, Any]:
    """The Config fields of an agent with a critic ensemble."""
    net = params.networks
    return {"critic_hidden": tuple(net.critic), "ensemble": net.ensemble, "critic_layer_norm": net.critic_layer_norm,
            "tau": resolved.tau}  # fmt: skip


def _rql(params, resolved, agent: Agent) -> dict[str, Any]:
    return {**critic_fields(params, resolved), "alpha": resolved.alpha, "expectile": resolved.expectile,
            "rho": resolved.rho, "ema": resolved.ema, "reversal": agent.reversal,
            "reversal_method": params.agent.reversal_method, "reversal_iterations": params.reverse.iterations,
            "reversal_tolerance": params.reverse.tolerance}  # fmt: skip


def _fql(params, resolved, agent: Agent) -> dict[str, Any]:
    return {**critic_fields(params, resolved), "alpha": params.fql.alpha}


def _bc_flow(params, resolved, agent: Agent) -> dict[str, Any]:
    return {"ema": resolved.ema}


AGENTS: dict[str, Agent] = {
    # RQL as in the paper: every batch reversed online through the current actor (agent.reversal_method)
    "rql": Agent("rql", "rql", _rql, reversal="online"),
    # RQL whose partial actions come from the reversal cache (the dataset reversed through the BC prior, stages
    # prior and reverse); the actor starts from that prior
    "rql_cached": Agent("rql", "rql_cached", _rql, reversal="cached"),
    # rql_cached with the cache rebuilt on the device from the current actor every train.refresh_every steps
    "rql_refresh": Agent("rql", "rql_cached", _rql, reversal="cached", refreshes=True),
    # action-chunked FQL: flow BC + a one-step policy distilled from it, with the same critic
    "fql": Agent("fql", "fql", _fql),
    # the same flow actor trained by flow matching alone (also the reversal cache's prior)
    "bc_flow": Agent("bc_flow", "bc_flow", _bc_flow),
}
ALGORITHMS = tuple(dict.fromkeys(agent.algorithm for agent in AGENTS.values()))


def groups() -> dict[str, tuple[str, ...]]:
    """Group -> its run names, in table order."""
    found: dict[str, list[str]] = {}
    for name, agent in AGENTS.items():
        found.setdefault(agent.group, []).append(name)
    return {group: tuple(names) for group, names in found.items()}
