"""Agents: shapes, hand-computed critic targets, learning on tiny problems, K-per-call equivalence, cached mode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stages.core import agents, batches
from stages.core.agents import bc_flow, common, fql, rql

OBS_DIM, ACTION_DIM = 3, 2
TINY = {"actor_hidden": (32, 32), "batch_size": 32}


def _dataset(n=200, episode=50, seed=0):
    rs = np.random.RandomState(seed)
    obs = rs.randn(n, OBS_DIM).astype(np.float32)
    terminals = np.zeros(n)
    terminals[episode - 1 :: episode] = 1
    return {
        "observations": obs,
        "actions": np.clip(0.6 * np.tanh(obs[:, :ACTION_DIM]) + 0.1 * rs.randn(n, ACTION_DIM), -1, 1),
        "rewards": -np.abs(obs[:, 0]),
        "masks": np.ones(n),
        "terminals": terminals,
        "next_observations": np.roll(obs, -1, axis=0),
    }


def _config(name, **overrides):
    kw = dict(obs_dim=OBS_DIM, action_dim=ACTION_DIM, **TINY)
    if name != "bc_flow":
        kw["critic_hidden"] = (32, 32)
    kw.update(overrides)
    return agents.load(name).Config(**kw)


@pytest.fixture(scope="module")
def data():
    return batches.to_device(_dataset())


@pytest.mark.parametrize("name", ["rql", "fql", "bc_flow"])
@pytest.mark.parametrize("h, ensemble", [(1, 1), (5, 10)])
def test_shapes_and_dtypes(data, name, h, ensemble):
    """Traced abstractly (no compile): init, one update and sampling have the documented shapes and dtypes."""
    agent = agents.load(name)
    config = _config(name, h=h, **({} if name == "bc_flow" else {"ensemble": ensemble}))
    state = jax.eval_shape(lambda key: agent.init(config, key), jax.random.PRNGKey(0))
    if name != "bc_flow":
        assert all(leaf.shape[0] == ensemble for leaf in jax.tree_util.tree_leaves(state.critic))
        assert jax.tree_util.tree_structure(state.critic) == jax.tree_util.tree_structure(state.target_critic)
    new_state, metrics = jax.eval_shape(agent.make_step(config), state, data)
    same = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, state, new_state)
    assert all(jax.tree_util.tree_leaves(same))
    assert {"actor_loss", "bc_loss"} <= set(metrics)
    assert all(m.shape == () and m.dtype == jnp.float32 for m in metrics.values())
    chunks = jax.eval_shape(
        lambda p, o, k: agent.sample_actions(config, p, o, k),
        agent.policy_params(state),
        data.observations[:4],
        jax.random.PRNGKey(1),
    )
    assert chunks.shape == (4, h, ACTION_DIM) and chunks.dtype == jnp.float32


def _abstract_init(agent, config):
    return jax.eval_shape(lambda key: agent.init(config, key), jax.random.PRNGKey(0))


def _constant_critic(params, values):
    """Critic parameters whose member e outputs values[e] everywhere (all kernels 0, last bias = value)."""
    zeroed = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, p.dtype), params)
    mlp = zeroed["VmapMLP_0"]
    last = max((k for k in mlp if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    mlp[last]["bias"] = jnp.asarray(values, jnp.float32)[:, None]
    return zeroed


def _boundary_batch(h, gamma):
    """Rows 0..3 and 4..6 are episodes; rewards r_i = i + 1; success (mask 0) at row 3."""
    rows = np.arange(7, dtype=np.float32)
    dataset = {
        "observations": np.stack([rows, -rows, rows], 1),
        "actions": np.stack([rows / 10, -rows / 10], 1),
        "rewards": rows + 1,
        "masks": np.array([1, 1, 1, 0, 1, 1, 1]),
        "terminals": np.array([0, 0, 0, 1, 0, 0, 1]),
        "next_observations": np.stack([rows + 1, -rows - 1, rows + 1], 1),
    }
    data = batches.to_device(dataset)
    return batches.chunks_at(data, jnp.array([0, 1, 2, 4]), h, gamma)


def test_rql_critic_target_hand_computed():
    gamma, rho, h = 0.9, 0.5, 2
    config = _config("rql", h=h, ensemble=3, rho=rho, discount=gamma)
    state = _abstract_init(rql, config)
    members = np.array([1.0, 2.0, 6.0])
    batch = _boundary_batch(h, gamma)
    noise = jax.random.normal(jax.random.PRNGKey(3), (4, config.chunk_dim))
    y = jax.jit(rql.td_target, static_argnums=0)(
        config, _constant_critic(state.target_critic, members), batch, noise
    )
    boot = members.mean() - rho * members.std()
    expected = [
        1 + gamma * 2 + gamma**2 * boot,  # rows 0, 1
        2 + gamma * 3 + gamma**2 * boot,  # rows 1, 2
        3 + gamma * 4,  # rows 2, 3: the last step is the success row 3 (mask 0): no bootstrap
        5 + gamma * 6 + gamma**2 * boot,  # rows 4, 5
    ]
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    # h = 3: rows 2, 3, (3) cross the episode end: the padded step adds no reward and the chunk is invalid;
    # rows 4, 5, 6 end exactly at the episode's last row and bootstrap from s'_6
    batch3 = _boundary_batch(3, gamma)
    config3 = dataclasses.replace(config, h=3)
    critic3 = _constant_critic(_abstract_init(rql, config3).target_critic, members)
    y3 = jax.jit(rql.td_target, static_argnums=0)(config3, critic3, batch3, jnp.zeros((4, 6)))
    np.testing.assert_allclose(y3[2], 3 + gamma * 4, rtol=1e-6)
    np.testing.assert_allclose(y3[3], 5 + gamma * 6 + gamma**2 * 7 + gamma**3 * boot, rtol=1e-6)
    np.testing.assert_array_equal(batch3["valid"], [1, 1, 0, 1])
    np.testing.assert_array_equal(batch3["next_observations"][:, 0], [3, 4, 4, 7])


def test_fql_critic_target_uses_mean_or_min():
    gamma, h = 0.9, 2
    config = _config("fql", h=h, ensemble=2, discount=gamma)
    state = fql.init(config, jax.random.PRNGKey(0))
    batch = _boundary_batch(h, gamma)
    noise = jnp.zeros((4, config.chunk_dim))
    critic = _constant_critic(state.target_critic, [1.0, 3.0])
    target = jax.jit(fql.td_target, static_argnums=0)
    y = target(config, state.onestep_actor, critic, batch, noise)
    np.testing.assert_allclose(
        y,
        [
            1 + gamma * 2 + gamma**2 * 2,
            2 + gamma * 3 + gamma**2 * 2,
            3 + gamma * 4,
            5 + gamma * 6 + gamma**2 * 2,
        ],
        rtol=1e-6,
    )
    y_min = target(dataclasses.replace(config, q_agg="min"), state.onestep_actor, critic, batch, noise)
    np.testing.assert_allclose(y_min[0], 1 + gamma * 2 + gamma**2 * 1, rtol=1e-6)


def test_fql_losses_go_down_and_policy_is_clipped(data):
    config = _config("fql", h=2, ensemble=2, discount=0.9, lr=1e-3, alpha=10.0)
    state = fql.init(config, jax.random.PRNGKey(0))
    update = fql.make_update(config, 100)
    state, first = update(state, data)
    for _ in range(3):
        state, last = update(state, data)
    assert all(np.isfinite(float(v)) for v in last.values())
    assert float(last["bc_loss"]) < 0.8 * float(first["bc_loss"])
    assert float(last["critic_loss"]) < 0.5 * float(first["critic_loss"])
    assert float(last["distill_loss"]) < float(first["distill_loss"])
    chunks = fql.sample_actions(
        config, fql.policy_params(state), data.observations[:64], jax.random.PRNGKey(1)
    )
    assert chunks.shape == (64, 2, ACTION_DIM) and float(jnp.abs(chunks).max()) <= 1.0


def test_expectile_loss_weights():
    diff = jnp.array([2.0, -2.0, 0.0])
    np.testing.assert_allclose(common.expectile_loss(diff, 0.9), [0.9 * 4, 0.1 * 4, 0.0], rtol=1e-6)


@pytest.fixture(scope="module")
def rql_runs():
    """One small RQL config with its 1-update and 50-update jitted functions (compiled once for two tests)."""
    config = _config("rql", h=5, flow_steps=4, ensemble=2, alpha=1.0, lr=1e-3, discount=0.9)
    return config, rql.make_update(config, 1), rql.make_update(config, 50)


def test_bc_and_critic_losses_go_down(data, rql_runs):
    config, _, update = rql_runs
    state = rql.init(config, jax.random.PRNGKey(0))
    history = []
    for _ in range(8):
        state, metrics = update(state, data)
        history.append({k: float(v) for k, v in metrics.items()})
    assert all(np.isfinite(v) for m in history for v in m.values())
    assert history[-1]["bc_loss"] < 0.8 * history[0]["bc_loss"]
    assert history[-1]["critic_loss"] < 0.5 * history[0]["critic_loss"]
    assert int(state.step) == 400


def test_bc_flow_loss_goes_down(data):
    config = _config("bc_flow", h=5, lr=1e-3)
    state = bc_flow.init(config, jax.random.PRNGKey(0))
    update = bc_flow.make_update(config, 150)
    state, first = update(state, data)
    state, last = update(state, data)
    state, last = update(state, data)
    assert float(last["bc_loss"]) < 0.8 * float(first["bc_loss"])


def test_rql_q_gradient_moves_actions_to_the_best_action():
    """One-step problem, r = -(a - 0.6)^2, no bootstrapping, dataset actions ~ U[-1, 1] (mean reward -0.69)."""
    rs = np.random.RandomState(0)
    n = 512
    actions = rs.uniform(-1, 1, (n, 1)).astype(np.float32)
    terminals = np.zeros(n)
    terminals[1::2] = 1
    data = batches.to_device(
        {
            "observations": np.zeros((n, 1)),
            "actions": actions,
            "rewards": -((actions[:, 0] - 0.6) ** 2),
            "masks": np.zeros(n),
            "terminals": terminals,
            "next_observations": np.zeros((n, 1)),
        }
    )
    config = rql.Config(
        obs_dim=1,
        action_dim=1,
        h=1,
        flow_steps=5,
        actor_hidden=(32, 32),
        critic_hidden=(32, 32),
        ensemble=2,
        batch_size=128,
        alpha=0.01,
        lr=1e-3,
        expectile=0.5,
        reversal_method="exact",
    )
    state, metrics = rql.make_update(config, 300)(rql.init(config, jax.random.PRNGKey(0)), data)
    assert float(metrics["reversal_residual_max"]) < 1e-4
    chunks = np.asarray(rql.sample_actions(config, state.actor, jnp.zeros((1000, 1)), jax.random.PRNGKey(1)))
    assert chunks.shape == (1000, 1, 1) and np.abs(chunks).max() <= 1.0
    assert 0.3 < chunks.mean() < 0.9
    assert -((chunks - 0.6) ** 2).mean() > -0.1


def test_k_updates_per_call_equal_k_single_calls(data, rql_runs):
    config, single, fused_update = rql_runs
    state = rql.init(config, jax.random.PRNGKey(0))
    fused, _ = fused_update(common.copy_tree(state), data)  # the update donates its input state
    for _ in range(50):
        state, _ = single(state, data)
    assert int(fused.step) == int(state.step) == 50
    np.testing.assert_array_equal(fused.rng, state.rng)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), fused, state)


def test_cached_mode_reads_the_cache_at_row_and_grid_index(data):
    config = _config("rql", h=2, flow_steps=4, ensemble=2, reversal="cached")
    n, k_count, dim = data.size, config.flow_steps + 1, config.chunk_dim
    code = np.arange(n)[:, None, None] * 100.0 + np.arange(k_count)[None, :, None] + np.zeros((1, 1, dim))
    cached = batches.to_device(_dataset(), reversal=code.astype(np.float32))
    batch = batches.sample_chunks(cached, jax.random.PRNGKey(0), 64, config.h, config.discount)
    partial_states = jax.jit(lambda d, b, k: rql._partial_states(config, d, None, b, k)[:2])
    x_f, f = partial_states(cached, batch, jax.random.PRNGKey(1))
    x_f, f = np.asarray(x_f), np.asarray(f)[:, 0]
    np.testing.assert_array_equal(x_f[:, 0] // 100, batch["rows"])
    np.testing.assert_allclose(f, (x_f[:, 0] % 100) / config.flow_steps, rtol=1e-6)
    assert len(np.unique(f)) > 1
    with pytest.raises(ValueError, match="reversal cache"):
        rql.make_update(config, 1)(rql.init(config, jax.random.PRNGKey(0)), data)
    _state, metrics = rql.make_update(config, 2)(rql.init(config, jax.random.PRNGKey(0)), cached)
    assert np.isfinite(float(metrics["critic_loss"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"h": 0}, "h"),
        ({"reversal_method": "rk4"}, "reversal_method"),
        ({"reversal": "offline"}, "reversal"),
        ({"ensemble": 0}, "ensemble"),
        ({"expectile": 1.5}, "expectile"),
        ({"critic_hidden": ()}, "critic_hidden"),
        ({"discount": 0.0}, "discount"),
    ],
)
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config("rql", **overrides)


def test_dataset_and_observation_mismatches_raise(data):
    config = _config("bc_flow", h=2)
    state = bc_flow.init(config, jax.random.PRNGKey(0))
    wrong = dataclasses.replace(config, obs_dim=OBS_DIM + 1)
    with pytest.raises(ValueError, match="obs_dim"):
        bc_flow.make_update(wrong, 1)(state, data)
    with pytest.raises(ValueError, match="observations"):
        bc_flow.sample_actions(config, state.ema_actor, jnp.zeros((2, OBS_DIM + 1)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="q_agg"):
        fql.Config(obs_dim=1, action_dim=1, q_agg="max")


def test_every_registered_algorithm_loads_with_the_agent_interface():
    from stages.agent_registry import ALGORITHMS

    for name in ALGORITHMS:
        module = agents.load(name)
        for attribute in ("Config", "TrainState", "init", "make_update", "policy_params", "sample_actions"):
            assert hasattr(module, attribute), (name, attribute)
    for bad in ("common", "../params", "", None):
        with pytest.raises(ValueError, match="not an agent module name"):
            agents.load(bad)
