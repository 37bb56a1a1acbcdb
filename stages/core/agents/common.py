"""Pieces shared by the flow agents: the common config, losses, target updates and the K-step update driver."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from stages.core import bounds, flows
from stages.core.batches import DeviceDataset
from stages.core.networks import CriticEnsemble, VelocityField


def _positive_int_tuple(name: str, value) -> tuple[int, ...]:
    dims = tuple(int(v) for v in value)
    if len(dims) == 0 or any(v <= 0 for v in dims) or any(int(v) != v for v in value):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
    return dims


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """Settings every flow agent has. `action_dim` is the per-step action size d; chunks have h * d values."""

    obs_dim: int
    action_dim: int
    h: int = 3
    flow_steps: int = 10
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)
    actor_layer_norm: bool = False
    lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99

    def __post_init__(self):
        object.__setattr__(self, "actor_hidden", _positive_int_tuple("actor_hidden", self.actor_hidden))
        _check(self.obs_dim >= 1, f"obs_dim must be >= 1, got {self.obs_dim}")
        _check(self.action_dim >= 1, f"action_dim must be >= 1, got {self.action_dim}")
        bounds.COUNT.check("h (chunk length)", self.h)
        bounds.COUNT.check("flow_steps", self.flow_steps)
        bounds.LEARNING_RATE.check("lr", self.lr)
        bounds.BATCH_SIZE.check("batch_size", self.batch_size)
        bounds.DISCOUNT.check("discount", self.discount)

    @property
    def chunk_dim(self) -> int:
        """Size h * d of a flattened action chunk (the flow's dimension)."""
        return self.h * self.action_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticConfig(FlowConfig):
    """The settings of a flow agent with a critic ensemble and a Polyak target."""

    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)
    ensemble: int = 2
    critic_layer_norm: bool = True
    tau: float = 0.005

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "critic_hidden", _positive_int_tuple("critic_hidden", self.critic_hidden))
        bounds.COUNT.check("ensemble", self.ensemble)
        bounds.TARGET_RATE.check("tau", self.tau)


def make_actor(config: FlowConfig) -> VelocityField:
    return VelocityField(config.actor_hidden, config.chunk_dim, config.actor_layer_norm)


def make_critic(config) -> CriticEnsemble:
    return CriticEnsemble(config.critic_hidden, config.ensemble, config.critic_layer_norm)


def init_velocity(module: VelocityField, config: FlowConfig, key: jax.Array, with_time: bool = True):
    s = jnp.zeros((1, config.obs_dim), jnp.float32)
    x = jnp.zeros((1, config.chunk_dim), jnp.float32)
    t = jnp.zeros((1, 1), jnp.float32) if with_time else None
    return module.init(key, s, x, t)["params"]


def copy_tree(tree):
    """A buffer-distinct copy (two state leaves must not share a buffer when the state is donated)."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def polyak(online, target, rate: float):
    """target <- rate * online + (1 - rate) * target, leaf by leaf."""
    return jax.tree_util.tree_map(lambda p, tp: rate * p + (1.0 - rate) * tp, online, target)


def expectile_loss(diff: jnp.ndarray, expectile: float) -> jnp.ndarray:
    """|kappa - [diff < 0]| * diff^2 with diff = target - q (kappa = `expectile`)."""
    weight = jnp.where(diff >= 0, expectile, 1.0 - expectile)
    return weight * jnp.square(diff)


def flow_matching_pairs(key: jax.Array, x1: jnp.ndarray):
    """Flow-matching training points: x0 ~ N(0, I), t ~ U[0, 1), x_t = (1 - t) x0 + t x1, target x1 - x0."""
    k_noise, k_time = jax.random.split(key)
    x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
    t = jax.random.uniform(k_time, (x1.shape[0], 1), x1.dtype)
    return (1.0 - t) * x0 + t * x1, t, x1 - x0


def apply_adam(tx: optax.GradientTransformation, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def actor_critic_update(tx: optax.GradientTransformation, state, actor_params, actor_grads, critic_grads, rng,
                        tau: float):  # fmt: skip
    """The end every actor-critic update shares: Adam on the actor's params (``actor_params``: all that its
    optimiser state covers) and on the critic, the Polyak target blended from the pre-update critic (as the
    reference does), the next rng and step. Returns (the updated actor params, the other fields for
    ``state.replace``)."""
    actor, actor_opt = apply_adam(tx, actor_grads, state.actor_opt, actor_params)
    critic, critic_opt = apply_adam(tx, critic_grads, state.critic_opt, state.critic)
    target_critic = polyak(state.critic, state.target_critic, tau)
    return actor, {"critic": critic, "target_critic": target_critic, "actor_opt": actor_opt, "critic_opt": critic_opt,
                   "rng": rng, "step": state.step + 1}  # fmt: skip


def critic_actor_metrics(losses: dict, q, target, q_pi, valid, actor_grads, critic_grads) -> dict:
    """The per-update metrics the Q-learning agents share: losses, Q statistics, valid share, gradient norms.

    `losses` are the scalar loss terms (critic_loss, actor_loss, bc_loss, q_loss, ...), listed first.
    """
    return {
        **losses,
        "q_mean": q.mean(),
        "q_min": q.min(),
        "q_max": q.max(),
        "target_q_mean": target.mean(),
        "q_pi_mean": q_pi.mean(),
        "valid_fraction": valid.mean(),
        "actor_grad_norm": optax.global_norm(actor_grads),
        "critic_grad_norm": optax.global_norm(critic_grads),
    }


def check_dataset(config: FlowConfig, data: DeviceDataset, needs_cache: bool = False) -> None:
    """Raise a clear error when the device dataset does not fit the agent config."""
    if not isinstance(data, DeviceDataset):
        raise TypeError(
            f"expected a DeviceDataset (stages.core.batches.to_device), got {type(data).__name__}"
        )
    if data.obs_dim != config.obs_dim:
        raise ValueError(f"dataset obs_dim {data.obs_dim} != config.obs_dim {config.obs_dim}")
    if data.action_dim != config.action_dim:
        raise ValueError(f"dataset action_dim {data.action_dim} != config.action_dim {config.action_dim}")
    if needs_cache:
        expected = (data.size, config.flow_steps + 1, config.chunk_dim)
        if data.reversal is None:
            raise ValueError(
                "reversal='cached' needs a dataset with a reversal cache (to_device(..., reversal=...))"
            )
        if tuple(data.reversal.shape) != expected:
            raise ValueError(f"reversal cache shape {tuple(data.reversal.shape)} != expected {expected}")


def make_scan_update(
    step: Callable[[Any, DeviceDataset], tuple[Any, dict]], num_updates: int, check: Callable
):
    """Jit `num_updates` applications of `step` in one lax.scan; metrics are averaged over the updates.

    The returned function `(state, data) -> (state, metrics)` donates `state`: do not reuse the state passed in.
    """
    if num_updates < 1:
        raise ValueError(f"num_updates must be >= 1, got {num_updates}")

    def run(state, data):
        def body(carry, _):
            return step(carry, data)

        state, metrics = jax.lax.scan(body, state, None, length=num_updates)
        return state, jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)

    jitted = jax.jit(run, donate_argnums=0)

    def update(state, data):
        check(data)
        return jitted(state, data)

    return update


def check_observations(config: FlowConfig, observations) -> jnp.ndarray:
    observations = jnp.asarray(observations, jnp.float32)
    if observations.ndim != 2 or observations.shape[1] != config.obs_dim:
        raise ValueError(f"observations must be (B, obs_dim={config.obs_dim}), got {observations.shape}")
    return observations


def velocity_fn(config: FlowConfig, params) -> flows.Velocity:
    """The actor `params` as a velocity callable v(s, x, t) for stages.core.flows (sampling, reversal)."""
    actor_def = make_actor(config)

    def velocity(observations, x, t):
        return actor_def.apply({"params": params}, observations, x, t)

    return velocity


@partial(jax.jit, static_argnums=0)
def _sample_flow(config: FlowConfig, params, observations, key):
    noise = jax.random.normal(key, (observations.shape[0], config.chunk_dim), jnp.float32)
    chunks = flows.euler_sample(
        velocity_fn(config, params), observations, noise, config.flow_steps, clip=True
    )
    return chunks.reshape(observations.shape[0], config.h, config.action_dim)


def sample_flow_actions(config: FlowConfig, params, observations, key: jax.Array) -> jax.Array:
    """Chunks (B, h, d): the flow actor `params` integrated by F Euler steps from N(0, I), clipped to [-1, 1]."""
    return _sample_flow(config, params, check_observations(config, observations), key)
