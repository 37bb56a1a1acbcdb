"""Flax networks of the flow agents: a GELU MLP, a vmapped critic ensemble and the actor velocity field.

All layers use the reference initialisation: kernels ~ variance_scaling(1, fan_avg, uniform), zero biases.
LayerNorm (when enabled) follows every hidden activation, never the output layer:

    MLP(x) = W_L . LN(gelu(W_{L-1} ... LN(gelu(W_1 x + b_1)) ...)) + b_L
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Kernel initialiser of the reference: variance scaling, fan_avg, uniform."""
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def _check_hidden_dims(hidden_dims: Sequence[int], owner: str) -> None:
    if len(hidden_dims) == 0 or any(int(n) <= 0 for n in hidden_dims):
        raise ValueError(
            f"{owner}: hidden_dims must be a non-empty sequence of positive ints, got {hidden_dims!r}"
        )


def _concat_inputs(*parts: jnp.ndarray | None) -> jnp.ndarray:
    """Concatenate the non-None inputs on the last axis after checking that their leading dims agree."""
    parts = [p for p in parts if p is not None]
    lead = parts[0].shape[:-1]
    for p in parts[1:]:
        if p.shape[:-1] != lead:
            raise ValueError(f"inputs disagree on leading (batch) dims: {[q.shape for q in parts]}")
    return jnp.concatenate(parts, axis=-1)


class MLP(nn.Module):
    """GELU MLP with `hidden_dims` hidden layers (optional LayerNorm after each activation) and a linear output."""

    hidden_dims: Sequence[int]
    output_dim: int
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        _check_hidden_dims(self.hidden_dims, "MLP")
        for size in self.hidden_dims:
            x = nn.Dense(size, kernel_init=default_init())(x)
            x = nn.gelu(x)
            if self.layer_norm:
                x = nn.LayerNorm()(x)
        return nn.Dense(self.output_dim, kernel_init=default_init())(x)


class CriticEnsemble(nn.Module):
    """`ensemble` independent critics Q_e(s, x[, f]) evaluated on the same input.

    The members are one MLP vmapped over a leading parameter axis, so XLA emits batched matmuls.
    Input: concat(s, x, f) (f omitted when `times` is None). Output: (ensemble, *batch).
    """

    hidden_dims: Sequence[int]
    ensemble: int
    layer_norm: bool = True

    @nn.compact
    def __call__(self, observations, actions, times=None) -> jnp.ndarray:
        if self.ensemble < 1:
            raise ValueError(f"CriticEnsemble: ensemble must be >= 1, got {self.ensemble}")
        inputs = _concat_inputs(observations, actions, times)
        members = nn.vmap(
            MLP,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.ensemble,
        )
        q = members(hidden_dims=tuple(self.hidden_dims), output_dim=1, layer_norm=self.layer_norm)(inputs)
        return q[..., 0]


class VelocityField(nn.Module):
    """Flow velocity v(s, x, t) -> R^{action_dim} (an MLP on concat(s, x, t), no LayerNorm by default).

    With `times=None` the same network is a one-step map mu(s, z) (FQL's one-step policy).
    """

    hidden_dims: Sequence[int]
    action_dim: int
    layer_norm: bool = False

    @nn.compact
    def __call__(self, observations, actions, times=None) -> jnp.ndarray:
        if actions.shape[-1] != self.action_dim:
            raise ValueError(
                f"VelocityField: x has last dim {actions.shape[-1]}, expected action_dim={self.action_dim}"
            )
        inputs = _concat_inputs(observations, actions, times)
        return MLP(tuple(self.hidden_dims), self.action_dim, self.layer_norm)(inputs)
