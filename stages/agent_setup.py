"""From validated params to the agent that one (agent, task) run trains: algorithm, config, reversal mode.

Run names (``params.yaml``'s ``agents`` groups):

- ``rql``: RQL as in the paper; every batch is reversed online through the current actor (``agent.reversal_method``).
- ``rql_cached``: RQL whose partial actions come from the reversal cache (the dataset reversed through the BC prior,
  stages ``prior`` and ``reverse``); the actor starts from that prior.
- ``rql_refresh``: as ``rql_cached``, with the cache rebuilt on the device from the current actor every
  ``train.refresh_every`` steps (``reverse.method``), so it stays close to on-policy.
- ``fql``: action-chunked FQL (flow BC + one-step policy distilled from it) with the same critic.
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
    """(reversal mode, refresh period) of a run: 'online', 'cached' or 'none' (agents without a reversal)."""
    return {
        "rql": ("online", 0),
        "rql_cached": ("cached", 0),
        "rql_refresh": ("cached", params.train.refresh_every),
    }.get(name, ("none", 0))


def run_spec(params: Params, name: str, task: str, obs_dim: int, action_dim: int) -> RunSpec:
    """The run of agent ``name`` on ``task`` (``obs_dim``/``action_dim`` from the task's dataset)."""
    if name not in AGENT_NAMES:
        raise ValueError(f"unknown agent {name!r}; choose from {list(AGENT_NAMES)}")
    resolved = resolve_agent(params, task)
    net = params.networks
    common = {
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "h": resolved.h,
        "flow_steps": params.flow.steps,
        "actor_hidden": tuple(net.actor),
        "actor_layer_norm": net.actor_layer_norm,
        "lr": resolved.lr,
        "batch_size": resolved.batch_size,
        "discount": resolved.discount,
    }
    critic = {
        "critic_hidden": tuple(net.critic),
        "ensemble": net.ensemble,
        "critic_layer_norm": net.critic_layer_norm,
        "tau": resolved.tau,
    }
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
            reversal_method=params.agent.reversal_method,
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
