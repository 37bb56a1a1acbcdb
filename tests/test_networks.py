"""Networks: output shapes and dtypes, LayerNorm placement, ensemble independence, reference initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stages.core.networks import MLP, CriticEnsemble, VelocityField


@pytest.mark.parametrize("h", [1, 5])
@pytest.mark.parametrize("ensemble", [1, 10])
def test_shapes_and_dtypes(h, ensemble):
    """Abstract evaluation (no compile): the traced shapes are the ones XLA would produce."""
    obs_dim, d, batch = 3, 2, 7
    s = jnp.ones((batch, obs_dim))
    x = jnp.ones((batch, h * d))
    t = jnp.full((batch, 1), 0.3)
    actor = VelocityField((16, 16), h * d)
    critic = CriticEnsemble((16, 16), ensemble)

    def forward(key):
        v = actor.apply(actor.init(key, s, x, t), s, x, t)
        q = critic.apply(critic.init(key, s, x, t), s, x, t)
        q_no_t = critic.apply(critic.init(key, s, x), s, x)  # FQL's critic has no time input
        return v, q, q_no_t

    v, q, q_no_t = jax.eval_shape(forward, jax.random.PRNGKey(0))
    assert (v.shape, v.dtype) == ((batch, h * d), jnp.float32)
    assert (q.shape, q.dtype) == ((ensemble, batch), jnp.float32)
    assert q_no_t.shape == (ensemble, batch)


def test_ensemble_members_differ_and_share_input():
    critic = CriticEnsemble((8,), 4)
    s, x, t = jnp.ones((5, 2)), jnp.zeros((5, 3)), jnp.zeros((5, 1))
    params = jax.jit(critic.init)(jax.random.PRNGKey(0), s, x, t)
    kernels = jax.tree_util.tree_leaves(params)
    assert all(k.shape[0] == 4 for k in kernels)  # leading member axis on every parameter
    q = jax.jit(critic.apply)(params, s, x, t)
    assert len(np.unique(np.asarray(q[:, 0]))) == 4


def _names(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_layer_norm_after_each_hidden_activation_only_when_enabled():
    x = jnp.ones((2, 4))
    with_ln = jax.eval_shape(MLP((8, 8, 8), 1, layer_norm=True).init, jax.random.PRNGKey(0), x)
    without = jax.eval_shape(MLP((8, 8, 8), 1, layer_norm=False).init, jax.random.PRNGKey(0), x)
    assert sum("LayerNorm" in n and n.endswith("scale") for n in _names(with_ln)) == 3
    assert not any("LayerNorm" in n for n in _names(without))


def test_reference_initialisation_fan_avg_uniform():
    fan_in, fan_out = 300, 200
    params = jax.jit(MLP((fan_out,), 1).init)(jax.random.PRNGKey(0), jnp.ones((1, fan_in)))["params"]
    w = np.asarray(params["Dense_0"]["kernel"])
    limit = np.sqrt(3.0 / ((fan_in + fan_out) / 2.0))
    assert np.abs(w).max() <= limit
    assert np.abs(w).max() > 0.99 * limit  # uniform on [-limit, limit], not a narrower law
    assert np.var(w) == pytest.approx(limit**2 / 3.0, rel=0.05)
    assert np.all(np.asarray(params["Dense_0"]["bias"]) == 0.0)


def test_bad_shapes_raise_clear_errors():
    actor = VelocityField((8,), 4)
    s, x, t = jnp.ones((3, 2)), jnp.ones((3, 4)), jnp.ones((3, 1))
    params = jax.jit(actor.init)(jax.random.PRNGKey(0), s, x, t)
    with pytest.raises(ValueError, match="action_dim"):
        actor.apply(params, s, jnp.ones((3, 5)), t)
    with pytest.raises(ValueError, match="leading"):
        actor.apply(params, jnp.ones((2, 2)), x, t)
    with pytest.raises(ValueError, match="hidden_dims"):
        jax.eval_shape(MLP((), 1).init, jax.random.PRNGKey(0), s)
    with pytest.raises(ValueError, match="ensemble"):
        jax.eval_shape(CriticEnsemble((8,), 0).init, jax.random.PRNGKey(0), s, x, t)


def _vmapped_flax_mlp(hidden_dims, ensemble, layer_norm):
    """The critic ensemble's members as flax builds them (the init path), to check the fast apply against."""
    import flax.linen as nn

    return nn.vmap(
        MLP,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=0,
        axis_size=ensemble,
    )(hidden_dims=hidden_dims, output_dim=1, layer_norm=layer_norm)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("ensemble", [1, 3])
def test_critic_fast_apply_is_the_flax_mlp_with_its_gradients(layer_norm, ensemble):
    """stacked_mlp (batched matmuls, hand-written backward) computes flax's vmapped MLP: the forward pass and the
    parameter and input gradients to float rounding (bit-identity is not promised: the CPU's matmul kernels may sum
    a batched dot in another order than vmap's)."""
    hidden = (16, 12, 8)
    critic = CriticEnsemble(hidden, ensemble, layer_norm=layer_norm)
    reference = _vmapped_flax_mlp(hidden, ensemble, layer_norm)
    k_s, k_x, k_p, k_w = jax.random.split(jax.random.PRNGKey(0), 4)
    s = jax.random.normal(k_s, (2, 5, 3))  # two batch dims
    x = 2.0 * jax.random.normal(k_x, (2, 5, 4))
    t = jnp.full((2, 5, 1), 0.3)
    params = jax.jit(critic.init)(jax.random.PRNGKey(1), s, x, t)
    # move LayerNorm scales/biases and biases away from their init values (1 and 0)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(k_p, len(leaves))
    params = jax.tree_util.tree_unflatten(
        treedef, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    )
    weights = jax.random.normal(k_w, (ensemble, 2, 5))

    def fast(p, x):
        return critic.apply(p, s, x, t)

    def slow(p, x):
        inputs = jnp.concatenate([s, x, t], axis=-1)
        return reference.apply({"params": p["params"]["VmapMLP_0"]}, inputs)[..., 0]

    q_fast, q_slow = jax.jit(fast)(params, x), jax.jit(slow)(params, x)
    assert q_fast.shape == (ensemble, 2, 5)
    np.testing.assert_allclose(q_fast, q_slow, rtol=1e-5, atol=1e-6)

    def grads(apply):
        loss = lambda p, x: jnp.sum(weights * jnp.sin(apply(p, x)))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    (gp_fast, gx_fast), (gp_slow, gx_slow) = grads(fast), grads(slow)
    assert jax.tree_util.tree_structure(gp_fast) == jax.tree_util.tree_structure(gp_slow)
    for a, b in zip(
        jax.tree_util.tree_leaves(gp_fast) + [gx_fast], jax.tree_util.tree_leaves(gp_slow) + [gx_slow]
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
