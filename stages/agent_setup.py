"""From validated params to the agent that one (agent, task) run trains: algorithm, config, reversal mode.

Agent names in ``params.yaml``'s ``agents`` list:

- ``rql``: RQL; its partial actions come from ``train.reversal`` (``online``: reverse every batch through the
  current actor, the paper's method; ``cached``: read them from the reversal cache, refreshed every
  ``train.refresh_every`` steps when that is > 0).
- ``rql_cached`` and ``rql_refresh``: RQL pinned to the cache without refresh, and with refresh every
  ``train.refresh_every`` steps, so that the three reversal modes can be compared side by side in one study.
- ``fql``: action-chunked FQL (flow BC + one-step policy distilled from it), the same critic.
- ``bc_flow``: the same flow actor trained by flow matching alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from stages.core.agents import AGENTS
from stages.params import Params, resolve_agent

AGENT_NAMES = ("rql", "rql_cached", "rql_refresh", "fql", "bc_flow")


@dataclass(frozen=True)
class RunSpec:
    """What one training run is: the agent's module and config, and how it gets its partial actions."""

    name: str
    algorithm: str  # key of stages.core.agents.AGENTS
    config: Any  # the algorithm's Config
    reversal: str  # 'online' | 'cached' | 'none' (agents without a reversal)
    refresh_every: int  # cached only: rebuild the cache from the current actor every N steps (0 = never)

    @property
    def module(self) -> ModuleType:
        return AGENTS[self.algorithm]

    @property
    def uses_cache(self) -> bool:
        return self.reversal == "cached"

    @property
    def starts_from_prior(self) -> bool:
        """Cached runs start their actor from the BC prior the cache was reversed through."""
        return self.uses_cache


def _reversal(params: Params, name: str) -> tuple[str, int]:
    if name == "rql":
        mode = params.train.reversal
        return mode, params.train.refresh_every if mode == "cached" else 0
    if name == "rql_cached":
        return "cached", 0
    if name == "rql_refresh":
        return "cached", params.train.refresh_every
    return "none", 0


def run_spec(params: Params, name: str, task: str, obs_dim: int, action_dim: int) -> RunSpec:
    """The run of agent ``name`` on ``task`` (``obs_dim``/``action_dim`` from the task's dataset)."""
    if name not in AGENT_NAMES:
        raise ValueError(f"unknown agent {name!r}; choose from {list(AGENT_NAMES)}")
    resolved = resolve_agent(params, task)
    net = params.networks
    common = dict(
        obs_dim=obs_dim,
        action_dim=action_dim,
        h=resolved.h,
        flow_steps=params.flow.steps,
        actor_hidden=tuple(net.actor),
        actor_layer_norm=net.actor_layer_norm,
        lr=resolved.lr,
        batch_size=resolved.batch_size,
        discount=resolved.discount,
    )
    critic = dict(critic_hidden=tuple(net.critic), ensemble=net.ensemble, critic_layer_norm=net.critic_layer_norm,
                  tau=resolved.tau)
    reversal, refresh_every = _reversal(params, name)
    if name.startswith("rql"):
        algorithm = "rql"
        config = AGENTS["rql"].Config(
            **common,
            **critic,
            alpha=resolved.alpha,
            expectile=resolved.expectile,
            rho=resolved.rho,
            ema=resolved.ema,
            reversal=reversal,
            reversal_method=params.reverse.method,
            reversal_iterations=params.reverse.iterations,
            reversal_tolerance=params.reverse.tolerance,
        )
    elif name == "fql":
        algorithm = "fql"
        config = AGENTS["fql"].Config(**common, **critic, alpha=params.fql.alpha)
    else:
        algorithm = "bc_flow"
        config = AGENTS["bc_flow"].Config(**common, ema=resolved.ema)
    return RunSpec(name=name, algorithm=algorithm, config=config, reversal=reversal, refresh_every=refresh_every)


def prior_config(params: Params, task: str, obs_dim: int, action_dim: int) -> Any:
    """The BC-flow config of the task's reversal prior: the RQL actor's shape, flow-matching loss only."""
    return run_spec(params, "bc_flow", task, obs_dim, action_dim).config


def make_policy(algorithm: str, config: Any, policy_params: Any):
    """A batched evaluation policy ``(observations (n, obs_dim), key) -> chunks (n, h, d)`` as numpy."""
    import jax
    import numpy as np

    module = AGENTS[algorithm]
    params = jax.device_put(policy_params)

    def policy(observations, key):
        return np.asarray(module.sample_actions(config, params, observations, key))

    return policy


def config_from_metadata(metadata: dict) -> tuple[str, Any]:
    """(algorithm, Config) of a policy export's metadata (as written by the train and prior stages)."""
    algorithm = metadata.get("algorithm")
    if algorithm not in AGENTS:
        raise ValueError(f"policy metadata names an unknown algorithm {algorithm!r}; known: {sorted(AGENTS)}")
    return algorithm, AGENTS[algorithm].Config(**metadata["config"])
