"""From validated params to the agent that one (agent, dataset) run trains: algorithm, config, reversal mode.

The config depends on the dataset, not on the task: presets are per environment (stages.params.resolve_agent), so
the runs of every task of a dataset, and its BC prior, share their settings.

The run names and what each is: stages.agent_registry (the one table of agents).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from stages.agent_registry import AGENTS, ALGORITHMS
from stages.core import agents
from stages.params import Params, resolve_agent

AGENT_NAMES = tuple(AGENTS)


@dataclass(frozen=True)
class RunSpec:
    """What one training run is: the agent's module and config, and how it gets its partial actions."""

    name: str
    algorithm: str  # the module stages.core.agents.<algorithm>
    config: Any  # the algorithm's Config
    reversal: str  # 'online' | 'cached' | 'none' (agents without a reversal)
    refresh_every: int  # cached only: rebuild the cache from the current actor every N steps (0 = never)

    @property
    def module(self) -> ModuleType:
        return agents.load(self.algorithm)

    @property
    def uses_cache(self) -> bool:
        return self.reversal == "cached"

    @property
    def starts_from_prior(self) -> bool:
        """Cached runs start their actor from the BC prior the cache was reversed through."""
        return self.uses_cache


def run_spec(params: Params, name: str, dataset: str, obs_dim: int, action_dim: int) -> RunSpec:
    """The run of agent ``name`` on a task of ``dataset`` (``obs_dim``/``action_dim`` from the dataset)."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; choose from {list(AGENT_NAMES)}")
    agent, resolved = AGENTS[name], resolve_agent(params, dataset)
    net = params.networks
    config = agents.load(agent.algorithm).Config(
        obs_dim=obs_dim, action_dim=action_dim, h=resolved.h, flow_steps=params.flow.steps,
        actor_hidden=tuple(net.actor), actor_layer_norm=net.actor_layer_norm, lr=resolved.lr,
        batch_size=resolved.batch_size, discount=resolved.discount, **agent.options(params, resolved, agent),
    )  # fmt: skip
    refresh_every = params.train.refresh_every if agent.refreshes else 0
    return RunSpec(name=name, algorithm=agent.algorithm, config=config, reversal=agent.reversal,
                   refresh_every=refresh_every)  # fmt: skip


def prior_config(params: Params, dataset: str, obs_dim: int, action_dim: int) -> Any:
    """The BC-flow config of the dataset's reversal prior: the RQL actor's shape, flow-matching loss only."""
    return run_spec(params, "bc_flow", dataset, obs_dim, action_dim).config


def make_policy(algorithm: str, config: Any, policy_params: Any):
    """A batched evaluation policy ``(observations (n, obs_dim), key) -> chunks (n, h, d)`` as numpy."""
    import jax
    import numpy as np

    module = agents.load(algorithm)
    params = jax.device_put(policy_params)

    def policy(observations, key):
        return np.asarray(module.sample_actions(config, params, observations, key))

    return policy


def config_from_metadata(metadata: dict) -> tuple[str, Any]:
    """(algorithm, Config) of a policy export's metadata (as written by the train and prior stages)."""
    algorithm = metadata.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"policy metadata names an unknown algorithm {algorithm!r}; known: {sorted(ALGORITHMS)}")
    return algorithm, agents.load(algorithm).Config(**metadata["config"])
