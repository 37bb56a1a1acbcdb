"""Action-chunked Flow Q-Learning (FQL, Park, Li, Levine 2025; chunked critic as in Q-chunking).

Per update, on a batch of chunks (s, x1 = a_{t:t+h}) (see stages.core.batches):

* target:  y = sum_k gamma^k r_k real_k + gamma^h m_L agg_e Qbar_e(s', clip(mu(s', z'), -1, 1)), z' ~ N(0, I),
           agg = mean over the ensemble (or min with `q_agg='min'`), Qbar the target ensemble.
* critic:  L_Q = mean_{e, b} valid_b (Q_e(s_b, x1_b) - y_b)^2.
* BC flow: L_bc = mean(action_mask * (v(s, x_t, t) - (x1 - x0))^2), x_t = (1 - t) x0 + t x1.
* one-step policy mu(s, z): L_mu = alpha * mean((mu(s, z) - sg(flow(s, z)))^2) - lam * mean_b mean_e Q_e(s, clip(mu(s, z)))
  where flow(s, z) is the BC flow's F-step Euler sample from z (clipped) and lam = 1, or
  sg(1 / mean|Q|) with `normalize_q_loss` (an option of the FQL code that its paper did not use).
* target critic: Qbar <- tau Q + (1 - tau) Qbar from the pre-update parameters (as the reference code).

No validity mask on the distillation and Q terms (as the chunked-FQL code): s is a real state for every row.
The evaluated policy is the one-step policy: clip(mu(s, z), -1, 1), z ~ N(0, I).
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
from stages.core.batches import action_loss_mask, sample_chunks

Q_AGGREGATIONS = ("mean", "min")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.CriticConfig):
    """FQL settings (defaults: the FQL code's, with the chunked critic). `alpha` is the distillation weight."""

    alpha: float = 100.0
    q_agg: str = "mean"
    normalize_q_loss: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.q_agg not in Q_AGGREGATIONS:
            raise ValueError(f"q_agg must be one of {Q_AGGREGATIONS}, got {self.q_agg!r}")
        bounds.BC_WEIGHT.check("alpha", self.alpha)


class TrainState(flax.struct.PyTreeNode):
    actor: dict  # BC flow velocity field v(s, x, t)
    onestep_actor: dict  # one-step policy mu(s, z)
    critic: dict
    target_critic: dict
    actor_opt: optax.OptState  # over (actor, onestep_actor)
    critic_opt: optax.OptState
    rng: jax.Array
    step: jax.Array


@partial(jax.jit, static_argnums=0)
def init(config: Config, key: jax.Array) -> TrainState:
    k_actor, k_onestep, k_critic, k_rng = jax.random.split(key, 4)
    actor = common.init_velocity(common.make_actor(config), config, k_actor)
    onestep = common.init_velocity(common.make_actor(config), config, k_onestep, with_time=False)
    critic = common.init_velocity(common.make_critic(config), config, k_critic, with_time=False)
    tx = optax.adam(config.lr)
    return TrainState(
        actor=actor,
        onestep_actor=onestep,
        critic=critic,
        target_critic=common.copy_tree(critic),
        actor_opt=tx.init((actor, onestep)),
        critic_opt=tx.init(critic),
        rng=k_rng,
        step=jnp.zeros((), jnp.int32),
    )


def policy_params(state: TrainState) -> dict:
    """Parameters of the evaluated policy: the one-step policy."""
    return state.onestep_actor


def td_target(config: Config, onestep_actor: dict, target_critic: dict, batch: dict, next_noise: jax.Array):
    """y = reward_sum + gamma^h * bootstrap_mask * agg_e Qbar_e(s', clip(mu(s', next_noise), -1, 1)), shape (B,)."""
    s_next = batch["next_observations"]
    next_actions = jnp.clip(
        common.make_actor(config).apply({"params": onestep_actor}, s_next, next_noise), -1.0, 1.0
    )
    next_qs = common.make_critic(config).apply({"params": target_critic}, s_next, next_actions)
    next_q = next_qs.mean(axis=0) if config.q_agg == "mean" else next_qs.min(axis=0)
    return batch["reward_sum"] + config.discount**config.h * batch["bootstrap_mask"] * next_q


def make_step(config: Config):
    actor_def, onestep_def, critic_def = (
        common.make_actor(config),
        common.make_actor(config),
        common.make_critic(config),
    )
    tx = optax.adam(config.lr)
    B, D = config.batch_size, config.chunk_dim

    def step(state: TrainState, data):
        rng, k_rows, k_next, k_fm, k_distill = jax.random.split(state.rng, 5)
        batch = sample_chunks(data, k_rows, B, config.h, config.discount)
        s, x1, valid = batch["observations"], batch["actions"], batch["valid"]

        target = td_target(
            config,
            state.onestep_actor,
            state.target_critic,
            batch,
            jax.random.normal(k_next, (B, D), jnp.float32),
        )

        def critic_loss_fn(params):
            q = critic_def.apply({"params": params}, s, x1)
            return jnp.mean(jnp.square(q - target) * valid), q

        (critic_loss, q), critic_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic)

        x_t, t, velocity_target = common.flow_matching_pairs(k_fm, x1)
        mask = action_loss_mask(batch["action_mask"], config.action_dim)
        z = jax.random.normal(k_distill, (B, D))

        flow_velocity = common.velocity_fn(config, state.actor)

        flow_actions = flows.euler_sample(flow_velocity, s, z, config.flow_steps, clip=True)

        def actor_loss_fn(params):
            actor_params, onestep_params = params
            v = actor_def.apply({"params": actor_params}, s, x_t, t)
            bc_loss = jnp.mean(jnp.square(v - velocity_target) * mask)
            mu = onestep_def.apply({"params": onestep_params}, s, z)
            distill_loss = jnp.mean(jnp.square(mu - flow_actions))
            q_pi = critic_def.apply({"params": state.critic}, s, jnp.clip(mu, -1.0, 1.0)).mean(axis=0)
            q_loss = -jnp.mean(q_pi)
            if config.normalize_q_loss:
                q_loss = q_loss / jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(q_pi)), 1e-6))
            return bc_loss + config.alpha * distill_loss + q_loss, (bc_loss, distill_loss, q_loss, q_pi)

        params = (state.actor, state.onestep_actor)
        (actor_loss, (bc_loss, distill_loss, q_loss, q_pi)), actor_grads = jax.value_and_grad(
            actor_loss_fn, has_aux=True
        )(params)
        (actor, onestep), fields = common.actor_critic_update(tx, state, params, actor_grads, critic_grads, rng,
                                                              config.tau)  # fmt: skip
        new_state = state.replace(actor=actor, onestep_actor=onestep, **fields)
        losses = {"critic_loss": critic_loss, "actor_loss": actor_loss, "bc_loss": bc_loss,
                  "distill_loss": distill_loss, "q_loss": q_loss}  # fmt: skip
        return new_state, common.critic_actor_metrics(losses, q, target, q_pi, valid, actor_grads, critic_grads)

    return step


@functools.cache
def make_update(config: Config, num_updates: int = 1):
    """Jitted `(state, data) -> (state, metrics)` running `num_updates` updates in a lax.scan (mean metrics).

    `state` is donated. Memoised: the same (config, num_updates) returns the same compiled function.
    """
    return common.make_scan_update(make_step(config), num_updates, partial(common.check_dataset, config))


@partial(jax.jit, static_argnums=0)
def _sample(config: Config, params, observations, key):
    z = jax.random.normal(key, (observations.shape[0], config.chunk_dim), jnp.float32)
    chunks = jnp.clip(common.make_actor(config).apply({"params": params}, observations, z), -1.0, 1.0)
    return chunks.reshape(observations.shape[0], config.h, config.action_dim)


def sample_actions(config: Config, params, observations, key: jax.Array) -> jax.Array:
    """Action chunks (B, h, d) from the one-step policy `params` (pass `policy_params(state)`), clipped."""
    return _sample(config, params, common.check_observations(config, observations), key)
