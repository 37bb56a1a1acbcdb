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
