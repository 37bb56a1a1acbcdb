"""BC-flow: the RQL actor trained by flow matching only (no critic), with the same EMA actor for evaluation.

    L_bc = mean(action_mask * (v(s, x_t, t) - (x1 - x0))^2),  x_t = (1 - t) x0 + t x1,  x0 ~ N(0, I), t ~ U[0, 1)
    pi_ema <- (1 - ema) pi + ema pi_ema   (pre-update parameters, as the reference)

RQL weighs this loss by alpha; alone, a constant weight only rescales Adam's input (invariant up to eps), so
there is none. The evaluated policy is the EMA actor through the Euler sampler. Also the reversal prior.
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import optax

from stages.core import bounds
from stages.core.agents import common
from stages.core.batches import action_loss_mask, sample_chunks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.FlowConfig):
    ema: float = 0.999

    def __post_init__(self):
        super().__post_init__()
        bounds.EMA.check("ema", self.ema)


class TrainState(flax.struct.PyTreeNode):
    actor: dict
    ema_actor: dict
    actor_opt: optax.OptState
    rng: jax.Array
    step: jax.Array


@partial(jax.jit, static_argnums=0)
def init(config: Config, key: jax.Array) -> TrainState:
    k_actor, k_rng = jax.random.split(key)
    actor = common.init_velocity(common.make_actor(config), config, k_actor)
    return TrainState(
        actor=actor,
        ema_actor=common.copy_tree(actor),
        actor_opt=optax.adam(config.lr).init(actor),
        rng=k_rng,
        step=jnp.zeros((), jnp.int32),
    )


def policy_params(state: TrainState) -> dict:
    """Parameters of the evaluated policy: the EMA actor."""
    return state.ema_actor


def make_step(config: Config):
    actor_def = common.make_actor(config)
    tx = optax.adam(config.lr)

    def step(state: TrainState, data):
        rng, k_rows, k_fm = jax.random.split(state.rng, 3)
        batch = sample_chunks(data, k_rows, config.batch_size, config.h, config.discount)
        x_t, t, velocity_target = common.flow_matching_pairs(k_fm, batch["actions"])
        mask = action_loss_mask(batch["action_mask"], config.action_dim)

        def loss_fn(params):
            v = actor_def.apply({"params": params}, batch["observations"], x_t, t)
            return jnp.mean(jnp.square(v - velocity_target) * mask)

        bc_loss, grads = jax.value_and_grad(loss_fn)(state.actor)
        actor, actor_opt = common.apply_adam(tx, grads, state.actor_opt, state.actor)
        new_state = TrainState(
            actor=actor,
            ema_actor=common.polyak(state.actor, state.ema_actor, 1.0 - config.ema),
            actor_opt=actor_opt,
            rng=rng,
            step=state.step + 1,
        )
        return new_state, {
            "bc_loss": bc_loss,
            "actor_loss": bc_loss,
            "actor_grad_norm": optax.global_norm(grads),
        }

    return step


@functools.cache
def make_update(config: Config, num_updates: int = 1):
    """Jitted `(state, data) -> (state, metrics)` running `num_updates` updates in a lax.scan (mean metrics).

    `state` is donated. Memoised: the same (config, num_updates) returns the same compiled function.
    """
    return common.make_scan_update(make_step(config), num_updates, partial(common.check_dataset, config))


def sample_actions(config: Config, params, observations, key: jax.Array) -> jax.Array:
    """Action chunks (B, h, d) from the flow actor `params` (pass `policy_params(state)`), F Euler steps, clipped."""
    return common.sample_flow_actions(config, params, observations, key)
