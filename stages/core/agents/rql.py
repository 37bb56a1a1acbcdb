"""Reversal Q-Learning (RQL): a critic over partial flow states, trained on dataset chunks reversed through the actor.

Per update, on a batch of chunks (s, x1 = a_{t:t+h}) (see stages.core.batches):

* partial states: x1 is reversed through the online actor by a distance d (half of the batch d ~ U[0, 1),
  half d = k / F, k ~ U{0..F}) to x_f at flow time f = 1 - d (`reversal='online'`, method euler or exact); or,
  with `reversal='cached'`, k ~ U{0..F} and x_f = cache[row, k], f = k / F (grid points only).
* target:  y = sum_k gamma^k r_k real_k + gamma^h m_L (mean_e Qbar_e - rho std_e Qbar_e)(s', x0', 0), x0' ~ N(0, I),
  with Qbar the target ensemble and s' the next observation of the chunk's last real step.
* critic:  L_Q = mean_{e, b} valid_b * |kappa - [y_b < Q_e]| (y_b - Q_e(s_b, sg(x_f), f))^2.
* actor:   x_t = (1 - t) x0 + t x1, t ~ U[0, 1), v = v_theta(s, x_t, t),
           L_pi = alpha * mean(action_mask * (v - (x1 - x0))^2)
                  - mean_b valid_b * mean_e Q_e(s, x_t + v min(1/F, 1 - t), min(t + 1/F, 1))
  (critic parameters are constants in L_pi: only the actor is moved by the Q term).
* targets, after the Adam steps and, like the reference, from the parameters *before* them:
  Qbar <- tau Q + (1 - tau) Qbar,   pi_ema <- (1 - ema) pi + ema pi_ema.

The evaluated policy is the EMA actor run through the Euler sampler (F steps from N(0, I), clipped).
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import optax

from stages.core import bounds, flows
from stages.core.agents import common
from stages.core.batches import DeviceDataset, action_loss_mask, sample_chunks

REVERSAL_MODES = ("online", "cached")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.CriticConfig):
    """RQL settings (defaults: the reference's get_config). See the module docstring for the symbols."""

    ensemble: int = 10
    alpha: float = 1.0
    expectile: float = 0.5
    rho: float = 0.0
    ema: float = 0.999
    reversal: str = "online"
    reversal_method: str = "euler"
    reversal_iterations: int = 20
    reversal_tolerance: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.reversal not in REVERSAL_MODES:
            raise ValueError(f"reversal must be one of {REVERSAL_MODES}, got {self.reversal!r}")
        if self.reversal_method not in flows.REVERSAL_METHODS:
            raise ValueError(
                f"reversal_method must be one of {flows.REVERSAL_METHODS}, got {self.reversal_method!r}"
            )
        bounds.COUNT.check("reversal_iterations", self.reversal_iterations)
        bounds.TOLERANCE.check("reversal_tolerance", self.reversal_tolerance)
        bounds.EXPECTILE.check("expectile", self.expectile)
        bounds.EMA.check("ema", self.ema)
        bounds.BC_WEIGHT.check("alpha", self.alpha)
        bounds.PESSIMISM.check("rho", self.rho)


class TrainState(flax.struct.PyTreeNode):
    actor: dict
    critic: dict
    target_critic: dict
    ema_actor: dict
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    rng: jax.Array
    step: jax.Array


@partial(jax.jit, static_argnums=0)
def init(config: Config, key: jax.Array) -> TrainState:
    """Fresh parameters (target critic = critic, EMA actor = actor), Adam states, rng and step 0."""
    k_actor, k_critic, k_rng = jax.random.split(key, 3)
    actor = common.init_velocity(common.make_actor(config), config, k_actor)
    critic = common.init_velocity(common.make_critic(config), config, k_critic)
    tx = optax.adam(config.lr)
    return TrainState(
        actor=actor,
        critic=critic,
        target_critic=common.copy_tree(critic),
        ema_actor=common.copy_tree(actor),
        actor_opt=tx.init(actor),
        critic_opt=tx.init(critic),
        rng=k_rng,
        step=jnp.zeros((), jnp.int32),
    )


def policy_params(state: TrainState) -> dict:
    """Parameters of the evaluated policy: the EMA actor."""
    return state.ema_actor


def _partial_states(config: Config, data: DeviceDataset, velocity, batch, key):
    """(x_f, f, metrics) for the critic, from the online reversal or from the cache."""
    s, chunk = batch["observations"], batch["actions"]
    if config.reversal == "cached":
        k = jax.random.randint(key, (chunk.shape[0],), 0, config.flow_steps + 1)
        x_f = data.reversal[batch["rows"], k]
        return x_f, (k.astype(jnp.float32) / config.flow_steps)[:, None], {}
    distance = flows.mixed_distances(key, chunk.shape[0], config.flow_steps)
    x_f, f, info = flows.reverse(
        velocity,
        s,
        chunk,
        distance,
        config.flow_steps,
        config.reversal_method,
        config.reversal_iterations,
        config.reversal_tolerance,
    )
    metrics = {}
    if config.reversal_method == "exact":
        metrics = {
            "reversal_residual_max": jnp.max(info["residual"]),
            "reversal_iterations": info["iterations"].astype(jnp.float32),
        }
    return x_f, f, metrics


def td_target(config: Config, target_critic: dict, batch: dict, next_noise: jax.Array) -> jax.Array:
    """y = reward_sum + gamma^h * bootstrap_mask * (mean_e - rho * std_e) Qbar_e(s', next_noise, f = 0), shape (B,)."""
    s_next = batch["next_observations"]
    times = jnp.zeros((s_next.shape[0], 1), jnp.float32)
    next_qs = common.make_critic(config).apply({"params": target_critic}, s_next, next_noise, times)
    next_q = next_qs.mean(axis=0) - config.rho * next_qs.std(axis=0)
    return batch["reward_sum"] + config.discount**config.h * batch["bootstrap_mask"] * next_q


def make_step(config: Config):
    """One RQL update `(state, data) -> (state, metrics)` (not jitted; `make_update` scans and jits it)."""
    actor_def, critic_def = common.make_actor(config), common.make_critic(config)
    tx = optax.adam(config.lr)
    F, B, D = config.flow_steps, config.batch_size, config.chunk_dim

    def step(state: TrainState, data: DeviceDataset):
        rng, k_rows, k_rev, k_next, k_fm = jax.random.split(state.rng, 5)
        batch = sample_chunks(data, k_rows, B, config.h, config.discount)
        s, x1, valid = batch["observations"], batch["actions"], batch["valid"]

        velocity = common.velocity_fn(config, state.actor)

        x_f, f, rev_metrics = _partial_states(config, data, velocity, batch, k_rev)
        x_f = jax.lax.stop_gradient(x_f)

        target = td_target(config, state.target_critic, batch, jax.random.normal(k_next, (B, D), jnp.float32))

        def critic_loss_fn(params):
            q = critic_def.apply({"params": params}, s, x_f, f)
            return jnp.mean(common.expectile_loss(target - q, config.expectile) * valid), q

        (critic_loss, q), critic_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic)

        x_t, t, velocity_target = common.flow_matching_pairs(k_fm, x1)
        mask = action_loss_mask(batch["action_mask"], config.action_dim)

        def actor_loss_fn(params):
            v = actor_def.apply({"params": params}, s, x_t, t)
            bc_loss = jnp.mean(jnp.square(v - velocity_target) * mask)
            x_next = x_t + v * jnp.minimum(1.0 / F, 1.0 - t)
            q_pi = critic_def.apply({"params": state.critic}, s, x_next, jnp.minimum(t + 1.0 / F, 1.0)).mean(
                axis=0
            )
            q_loss = -jnp.mean(q_pi * valid)
            return config.alpha * bc_loss + q_loss, (bc_loss, q_loss, q_pi)

        (actor_loss, (bc_loss, q_loss, q_pi)), actor_grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
            state.actor
        )

        actor, fields = common.actor_critic_update(tx, state, state.actor, actor_grads, critic_grads, rng, config.tau)
        # The reference blends the pre-update online parameters into the targets (and the EMA); so do we.
        ema_actor = common.polyak(state.actor, state.ema_actor, 1.0 - config.ema)
        new_state = state.replace(actor=actor, ema_actor=ema_actor, **fields)
        losses = {"critic_loss": critic_loss, "actor_loss": actor_loss, "bc_loss": bc_loss, "q_loss": q_loss}
        metrics = common.critic_actor_metrics(losses, q, target, q_pi, valid, actor_grads, critic_grads)
        metrics.update(rev_metrics)
        return new_state, metrics

    return step


@functools.cache
def make_update(config: Config, num_updates: int = 1):
    """Jitted `(state, data) -> (state, metrics)` running `num_updates` updates in a lax.scan.

    Metrics are the mean over those updates of each per-update value. `state` is donated.
    Memoised: the same (config, num_updates) returns the same compiled function.
    """
    check = partial(common.check_dataset, config, needs_cache=config.reversal == "cached")
    return common.make_scan_update(make_step(config), num_updates, check)


def sample_actions(config: Config, params, observations, key: jax.Array) -> jax.Array:
    """Action chunks (B, h, d) from the flow actor `params` (pass `policy_params(state)`), F Euler steps, clipped."""
    return common.sample_flow_actions(config, params, observations, key)
