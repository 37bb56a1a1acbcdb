"""Euler sampler and flow reversal: round trips (exact vs euler), distance 0, closed-form inverse, distances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stages.core import batches, flows
from stages.core.agents import bc_flow, common

F = 10
OBS_DIM, ACTION_DIM, H = 4, 2, 5


def _toy_dataset(n=1000, seed=0):
    """Bimodal, state-dependent actions in [-1, 1], episodes of 100 rows."""
    rs = np.random.RandomState(seed)
    obs = rs.randn(n, OBS_DIM).astype(np.float32)
    mode = np.sign(rs.randn(n, 1))
    actions = np.clip(0.5 * np.tanh(obs[:, :ACTION_DIM]) + 0.4 * mode + 0.05 * rs.randn(n, ACTION_DIM), -1, 1)
    terminals = np.zeros(n)
    terminals[99::100] = 1
    return {
        "observations": obs,
        "actions": actions,
        "rewards": np.zeros(n),
        "masks": np.ones(n),
        "terminals": terminals,
        "next_observations": np.roll(obs, -1, axis=0),
    }


@pytest.fixture(scope="module")
def actors():
    """A random and a BC-trained velocity field, plus a batch of real chunks."""
    config = bc_flow.Config(obs_dim=OBS_DIM, action_dim=ACTION_DIM, h=H, actor_hidden=(64, 64), lr=1e-3)
    data = batches.to_device(_toy_dataset())
    state = bc_flow.init(config, jax.random.PRNGKey(0))
    random_params = common.copy_tree(state.actor)
    state, _first = bc_flow.make_update(config, 1000)(state, data)
    batch = batches.chunks_at(data, data.starts[:128], H, 0.99)
    velocities = {"random": random_params, "trained": state.actor}
    return {k: common.velocity_fn(config, p) for k, p in velocities.items()}, batch


@pytest.mark.parametrize("which", ["random", "trained"])
def test_exact_reversal_round_trip_within_1e4_and_beats_euler(actors, which):
    velocities, batch = actors
    velocity, s, chunk = velocities[which], batch["observations"], batch["actions"]
    errors = {}
    for method in ("exact", "euler"):
        reverse = jax.jit(lambda s, c, m=method: flows.reverse_trajectory(velocity, s, c, F, m, iterations=50, tolerance=1e-6))
        trajectory, info = reverse(s, chunk)
        assert trajectory.shape == (chunk.shape[0], F + 1, H * ACTION_DIM)
        np.testing.assert_array_equal(trajectory[:, F], chunk)
        errors[method] = float(flows.roundtrip_error(velocity, s, trajectory[:, 0], chunk, F).max())
        if method == "exact":
            assert float(info["residual"].max()) <= 1e-6
            # every grid point maps to the next one by one forward Euler step of the sampler
            t = flows.flow_times(F)
            for j in (0, F // 2, F - 1):
                x_next = trajectory[:, j] + velocity(s, trajectory[:, j], jnp.full((s.shape[0], 1), t[j])) / F
                np.testing.assert_allclose(x_next, trajectory[:, j + 1], atol=2e-6)
    print(f"\nround-trip max error ({which} actor): exact {errors['exact']:.2e}, euler {errors['euler']:.2e}")
    assert errors["exact"] < 1e-4
    assert errors["euler"] > 10 * errors["exact"]


@pytest.mark.parametrize("method", ["euler", "exact"])
def test_distance_zero_returns_the_chunk(actors, method):
    velocities, batch = actors
    s, chunk = batch["observations"], batch["actions"]
    x_f, f, info = flows.reverse(velocities["trained"], s, chunk, jnp.zeros(s.shape[0]), F, method)
    np.testing.assert_array_equal(x_f, chunk)
    np.testing.assert_array_equal(f, 1.0)
    assert float(info["residual"].max()) == 0.0


def test_exact_step_matches_closed_form_inverse_of_linear_field():
    """v = a x + c t: forward step x' = x (1 + a dt) + c t dt, so x = (x' - c t dt) / (1 + a dt)."""
    a, c = -1.5, 0.7

    def velocity(s, x, t):
        return a * x + c * t

    s = jnp.zeros((6, 1))
    chunk = jnp.linspace(-1, 1, 24).reshape(6, 4)
    distance = jnp.array([1.0, 0.5, 0.25, 0.0, 0.9, 0.3])
    x_f, f, _ = flows.reverse(velocity, s, chunk, distance, F, "exact", 100, 1e-7)
    expected = np.asarray(chunk, np.float64)
    d = np.asarray(distance, np.float64)[:, None]
    for j in range(F - 1, -1, -1):
        t_j, dt = (1 - d) + d * j / F, d / F
        expected = (expected - c * t_j * dt) / (1 + a * dt)
    np.testing.assert_allclose(x_f, expected, atol=1e-5)
    np.testing.assert_allclose(f[:, 0], 1 - d[:, 0], atol=1e-7)
    # euler uses the velocity at the later point and time instead
    x_e, _, _ = flows.reverse(velocity, s, chunk, distance, F, "euler")
    expected_e = np.asarray(chunk, np.float64)
    for j in range(F - 1, -1, -1):
        t_next, dt = (1 - d) + d * (j + 1) / F, d / F
        expected_e = expected_e - (a * expected_e + c * t_next) * dt
    np.testing.assert_allclose(x_e, expected_e, atol=1e-5)


def test_sampler_clips_only_at_the_end():
    s = jnp.zeros((3, 1))
    noise = jnp.array([[0.0], [0.5], [-3.5]])
    drift = flows.euler_sample(lambda s, x, t: jnp.ones_like(x) * 2.0, s, noise, F, clip=False)
    np.testing.assert_allclose(drift, noise + 2.0, atol=1e-5)
    np.testing.assert_allclose(
        flows.euler_sample(lambda s, x, t: jnp.ones_like(x) * 2.0, s, noise, F), [[1], [1], [-1]]
    )
    # out to x = 2 by t = 0.5 and back to 0: clipping along the way would end at -1 instead
    there_and_back = flows.euler_sample(
        lambda s, x, t: jnp.where(t < 0.5, 4.0, -4.0) * jnp.ones_like(x), s, noise * 0, F
    )
    np.testing.assert_allclose(there_and_back, 0.0, atol=1e-5)


def test_mixed_distances_half_uniform_half_grid():
    d = np.asarray(flows.mixed_distances(jax.random.PRNGKey(0), 1000, F))
    uniform, grid = d[:500], d[500:]
    assert np.all((uniform >= 0) & (uniform < 1)) and len(np.unique(uniform)) > 400
    np.testing.assert_allclose(grid * F, np.round(grid * F), atol=1e-5)
    assert set(np.round(grid * F).astype(int)) == set(range(F + 1))
    assert flows.mixed_distances(jax.random.PRNGKey(0), 7, F).shape == (7,)


def test_reversal_rejects_bad_arguments():
    s, x = jnp.zeros((2, 1)), jnp.zeros((2, 3))
    velocity = lambda s, x, t: x
    with pytest.raises(ValueError, match="method"):
        flows.reverse(velocity, s, x, jnp.ones(2), F, "rk4")
    with pytest.raises(ValueError, match="distance"):
        flows.reverse(velocity, s, x, jnp.ones(3), F)
    with pytest.raises(ValueError, match="observations"):
        flows.reverse(velocity, jnp.zeros((3, 1)), x, jnp.ones(2), F)
    with pytest.raises(ValueError, match="flow_steps"):
        flows.flow_times(0)


def test_exact_reversal_reports_nonconvergence():
    """A field too stiff for the fixed point (dt * Lip > 1) must show a large residual, not hide it."""
    s, x = jnp.zeros((2, 1)), jnp.full((2, 3), 0.5)
    _, _, info = flows.reverse(lambda s, x, t: -30.0 * x, s, x, jnp.ones(2), F, "exact", 10, 1e-6)
    assert int(info["iterations"]) == 10
    assert not float(info["residual"].max()) <= 1e-2  # large, or NaN once the iterates overflow


def test_exact_starts_from_the_backward_euler_point(actors):
    """The fixed point starts from x_{j+1} - v(s, x_{j+1}, t_{j+1}) dt, whose velocity the previous step's solve
    already evaluated: with a single update per step the exact reversal is the euler reversal, and every further
    update moves it towards the exact inverse (one network call each)."""
    velocities, batch = actors
    velocity, s, chunk = velocities["trained"], batch["observations"], batch["actions"]
    distance = flows.mixed_distances(jax.random.PRNGKey(2), s.shape[0], F)
    reverse = jax.jit(
        lambda m, n: flows.reverse(velocity, s, chunk, distance, F, m, n, 0.0), static_argnums=(0, 1)
    )
    x_euler, _, _ = reverse("euler", 1)
    x_one, _, info_one = reverse("exact", 1)
    np.testing.assert_allclose(x_one, x_euler, rtol=0, atol=1e-6)
    assert int(info_one["iterations"]) == 1
    x_exact, _, info = reverse("exact", 50)
    assert float(info["residual"].max()) < float(info_one["residual"].max())
    assert float(jnp.abs(x_exact - x_euler).max()) > 1e-4  # the two methods really differ on a trained actor
