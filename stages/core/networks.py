"""Flax networks of the flow agents: a GELU MLP, a vmapped critic ensemble and the actor velocity field.

All layers use the reference initialisation: kernels ~ variance_scaling(1, fan_avg, uniform), zero biases.
LayerNorm (when enabled) follows every hidden activation, never the output layer:

    MLP(x) = W_L . LN(gelu(W_{L-1} ... LN(gelu(W_1 x + b_1)) ...)) + b_L

gelu is flax's `nn.gelu` (tanh approximation), LayerNorm flax's (epsilon 1e-6, variance E[x^2] - E[x]^2 clipped
at 0). The critic ensemble is initialised by `nn.vmap` over flax's MLP (one rng per member) and applied by
`stacked_mlp`: the same function, computed with one batched matmul per layer and a hand-written backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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


LAYER_NORM_EPSILON = 1e-6  # flax.linen.LayerNorm's default
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi).astype(np.float32))
_GELU_CUBIC = 0.044715


def _gelu_with_derivative(z: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(gelu(z), gelu'(z)) from one tanh; gelu(z) by the same operations as `jax.nn.gelu(z, approximate=True)`."""
    t = jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * (z**3)))
    cdf = 0.5 * (1.0 + t)
    derivative = cdf + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * (z * z))
    return z * cdf, derivative


def _layer_norm_stats(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """flax's LayerNorm statistics over the last axis: (mean, rsqrt(var + eps)), var = E[x^2] - E[x]^2 clipped at 0."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    mean2 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    var = jnp.maximum(0.0, mean2 - jnp.square(mean))
    return mean, jax.lax.rsqrt(var + LAYER_NORM_EPSILON)


def _num_layers(params: dict) -> int:
    return sum(1 for k in params if k.startswith("Dense_"))


def _dense(h: jnp.ndarray, dense: dict) -> jnp.ndarray:
    """h (E, N, in) @ kernel (E, in, out) + bias (E, out): one batched matmul, member axis leading (no transposes)."""
    return jnp.einsum("eni,eio->eno", h, dense["kernel"]) + dense["bias"][:, None, :]


def _stacked_forward(params: dict, inputs: jnp.ndarray, layer_norm: bool, keep: bool):
    """E stacked MLPs on shared inputs (N, in) -> (E, N, out), as flax computes each member.

    With `keep`, also returns what the backward pass needs: per hidden layer (input, gelu'(z), normalised
    activation x_hat, 1 / std), and the last hidden activation.
    """
    num_layers = _num_layers(params)
    members = params["Dense_0"]["kernel"].shape[0]
    h = jnp.broadcast_to(inputs, (members,) + inputs.shape)  # (E, N, in): cheap, and keeps the dots batched
    saved = []
    for i in range(num_layers - 1):
        a_in = h
        z = _dense(h, params[f"Dense_{i}"])
        if keep:
            h, gelu_grad = _gelu_with_derivative(z)
        else:
            h, gelu_grad = nn.gelu(z), None
        xhat = rstd = None
        if layer_norm:
            ln = params[f"LayerNorm_{i}"]
            mean, rstd = _layer_norm_stats(h)
            centred = h - mean
            h = (
                centred * (rstd * ln["scale"][:, None, :]) + ln["bias"][:, None, :]
            )  # flax's order of operations
            xhat = centred * rstd if keep else None
        saved.append((a_in, gelu_grad, xhat, rstd))
    out = _dense(h, params[f"Dense_{num_layers - 1}"])
    return out, (saved, h)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def stacked_mlp(params: dict, inputs: jnp.ndarray, layer_norm: bool) -> jnp.ndarray:
    """E MLPs with stacked parameters (leading member axis E; flax names Dense_i, LayerNorm_i) on shared inputs.

    inputs (N, in) -> (E, N, out). The forward pass is flax's MLP of each member, operation for operation (equal up
    to float rounding: the CPU's kernels may sum a batched dot in another order than vmap's). The backward pass is
    written out (its result equals autodiff's up to float rounding): it reuses gelu'(z) and the normalised
    activations kept by the forward pass instead of differentiating through tanh and the LayerNorm statistics
    again, and computes every matmul as one batched dot with the member axis leading.
    """
    return _stacked_forward(params, inputs, layer_norm, keep=False)[0]


def _stacked_mlp_fwd(params, inputs, layer_norm):
    out, (saved, last) = _stacked_forward(params, inputs, layer_norm, keep=True)
    return out, (params, inputs, saved, last)


def _stacked_mlp_bwd(layer_norm, residuals, d_out):
    params, inputs, saved, last = residuals
    num_layers = _num_layers(params)
    top = f"Dense_{num_layers - 1}"
    grads = {top: {"kernel": jnp.einsum("eni,eno->eio", last, d_out), "bias": jnp.sum(d_out, axis=1)}}
    dh = jnp.einsum("eno,eio->eni", d_out, params[top]["kernel"])
    for i in range(num_layers - 2, -1, -1):
        a_in, gelu_grad, xhat, rstd = saved[i]
        if layer_norm:
            # y = x_hat * scale + bias, x_hat = (u - mean(u)) / std(u)
            scale = params[f"LayerNorm_{i}"]["scale"][:, None, :]
            grads[f"LayerNorm_{i}"] = {"scale": jnp.sum(dh * xhat, axis=1), "bias": jnp.sum(dh, axis=1)}
            dxhat = dh * scale
            mean_dxhat = jnp.mean(dxhat, axis=-1, keepdims=True)
            mean_dxhat_xhat = jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
            dh = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
        dz = dh * gelu_grad
        kernel = params[f"Dense_{i}"]["kernel"]
        if i == 0:  # the input is shared by the members: its gradient sums over them
            grads["Dense_0"] = {"kernel": jnp.einsum("ni,eno->eio", inputs, dz), "bias": jnp.sum(dz, axis=1)}
            d_inputs = jnp.einsum("eno,eio->ni", dz, kernel)
        else:
            grads[f"Dense_{i}"] = {
                "kernel": jnp.einsum("eni,eno->eio", a_in, dz),
                "bias": jnp.sum(dz, axis=1),
            }
            dh = jnp.einsum("eno,eio->eni", dz, kernel)
    return {k: grads[k] for k in params}, d_inputs.astype(inputs.dtype)


stacked_mlp.defvjp(_stacked_mlp_fwd, _stacked_mlp_bwd)


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

    The members are one MLP vmapped over a leading parameter axis (initialised by `nn.vmap`, one rng per member);
    applied by `stacked_mlp`, one batched matmul per layer. Input: concat(s, x, f) (f omitted when `times` is
    None). Output: (ensemble, *batch).
    """

    hidden_dims: Sequence[int]
    ensemble: int
    layer_norm: bool = True

    @nn.compact
    def __call__(self, observations, actions, times=None) -> jnp.ndarray:
        if self.ensemble < 1:
            raise ValueError(f"CriticEnsemble: ensemble must be >= 1, got {self.ensemble}")
        inputs = _concat_inputs(observations, actions, times)
        if not self.is_initializing():
            q = stacked_mlp(
                self.variables["params"]["VmapMLP_0"], inputs.reshape(-1, inputs.shape[-1]), self.layer_norm
            )
            return q[..., 0].reshape((self.ensemble,) + inputs.shape[:-1])
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
