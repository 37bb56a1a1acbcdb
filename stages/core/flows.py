"""Euler flow sampling and its reversal.

A velocity field v(s, x, t) (any callable `velocity(observations, x, t)` with t of shape (B, 1)) defines the
sampler with F forward Euler steps on the grid t_j = j / F:

    x_0 ~ N(0, I),   x_{j+1} = x_j + v(s, x_j, t_j) / F,   action chunk = clip(x_F, -1, 1).

Reversal walks a dataset chunk x (at t = 1) back by a distance d in [0, 1] along the grid
t_j(d) = (1 - d) + d * j / F, j = F .. 0, with step dt = d / F, ending at time f = 1 - d:

* ``euler`` (the reference): x_j = x_{j+1} - v(s, x_{j+1}, t_{j+1}) dt, an approximate inverse.
* ``exact``: x_j solves x_j + v(s, x_j, t_j) dt = x_{j+1}, the exact inverse of the sampler's step, by the
  fixed-point iteration y <- x_{j+1} - v(s, y, t_j) dt (a contraction when dt * Lip(v) < 1), started from the
  backward Euler point x_{j+1} - v(s, x_{j+1}, t_{j+1}) dt, whose velocity the previous step's solve already
  evaluated (its last iterate is x_{j+1}): n updates cost n network calls (starting from y = x_{j+1} would
  cost n + 1), and with a single update per step the exact reversal is the euler reversal.

For d = 1 the reversal grid is the sampler's grid bit for bit, so the sampler started from the exactly reversed
x_0 reproduces the chunk up to the fixed-point tolerance. d = 0 gives dt = 0 and returns the chunk unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Velocity = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]

REVERSAL_METHODS = ("euler", "exact")


def flow_times(flow_steps: int) -> jnp.ndarray:
    """The sampler's time grid j / F for j = 0..F, float32 (shared so that reversal and sampler agree bitwise)."""
    if flow_steps < 1:
        raise ValueError(f"flow_steps must be >= 1, got {flow_steps}")
    return jnp.arange(flow_steps + 1, dtype=jnp.float32) / flow_steps


def _check_pair(observations: jnp.ndarray, x: jnp.ndarray, what: str) -> None:
    if observations.ndim != 2 or x.ndim != 2 or observations.shape[0] != x.shape[0]:
        raise ValueError(
            f"{what}: expected observations (B, obs_dim) and x (B, D), got {observations.shape}, {x.shape}"
        )


def euler_sample(
    velocity: Velocity, observations: jnp.ndarray, noise: jnp.ndarray, flow_steps: int, clip: bool = True
) -> jnp.ndarray:
    """Integrate x_{j+1} = x_j + v(s, x_j, j/F) / F from x_0 = noise for F steps; clip to [-1, 1] if `clip`."""
    _check_pair(observations, noise, "euler_sample")
    times = flow_times(flow_steps)[:-1]
    dt = jnp.float32(1.0) / flow_steps
    ones = jnp.ones((noise.shape[0], 1), noise.dtype)

    def step(x, t):
        return x + velocity(observations, x, t * ones) * dt, None

    x, _ = jax.lax.scan(step, noise, times)
    return jnp.clip(x, -1.0, 1.0) if clip else x


def _max_abs(x: jnp.ndarray) -> jnp.ndarray:
    """Per-row max |x| over the last axis."""
    return jnp.max(jnp.abs(x), axis=-1)


def _inverse_euler_step(velocity, observations, x_next, v_next, t_prev, dt, iterations, tolerance):
    """Solve y + v(s, y, t_prev) dt = x_next for y by fixed-point iteration y <- x_next - v(s, y, t_prev) dt.

    The first update is the backward Euler point y = x_next - v_next dt, with v_next = v(s, x_next, t_next)
    already known (the previous step's last evaluation, or the caller's); each update then costs one network
    call, v(s, y, t_prev), which both checks it and makes the next one. Returns (y, residual per row =
    max|y + v(s, y, t_prev) dt - x_next|, number of updates made (>= 1), v(s, y, t_prev)). Stops after
    `iterations` updates or once every row's residual is <= `tolerance`; the residual returned is the one of the
    returned y, and its velocity starts the next step.
    """

    def residual(y, v):
        return _max_abs(y + v * dt - x_next)

    def cond(carry):
        n, y, v = carry
        return jnp.logical_and(n < iterations, jnp.max(residual(y, v)) > tolerance)

    def body(carry):
        n, y, v = carry
        y = x_next - v * dt
        return n + 1, y, velocity(observations, y, t_prev)

    y0 = x_next - v_next * dt
    n, y, v = jax.lax.while_loop(cond, body, (jnp.int32(1), y0, velocity(observations, y0, t_prev)))
    return y, residual(y, v), n, v


def reverse(
    velocity: Velocity,
    observations: jnp.ndarray,
    chunk: jnp.ndarray,
    distance: jnp.ndarray,
    flow_steps: int,
    method: str = "euler",
    iterations: int = 20,
    tolerance: float = 1e-6,
    return_trajectory: bool = False,
):
    """Walk `chunk` (time 1) back by per-row `distance` d (B,) in F steps of size d / F.

    Returns (x_f (B, D), f (B, 1) = 1 - d, info) where info holds per-row `residual` (max over the F steps of
    the exact solver's residual; 0 for euler) and `iterations` (max fixed-point updates in any step, the start at
    the backward Euler point included; 0 for euler).
    With `return_trajectory`, also returns the grid points (B, F + 1, D): [:, j] is the point at time t_j(d),
    so [:, F] is the chunk and [:, 0] is x_f.
    """
    _check_pair(observations, chunk, "reverse")
    if method not in REVERSAL_METHODS:
        raise ValueError(f"reversal method must be one of {REVERSAL_METHODS}, got {method!r}")
    if distance.shape != (chunk.shape[0],):
        raise ValueError(f"reverse: distance must have shape ({chunk.shape[0]},), got {distance.shape}")
    if method == "exact" and iterations < 1:
        raise ValueError(f"exact reversal needs iterations >= 1, got {iterations}")

    d = distance.astype(chunk.dtype)[:, None]
    grid = (1.0 - d) + d * flow_times(flow_steps)[None, :]  # (B, F + 1), t_j(d)
    dt = d / flow_steps

    steps = jnp.arange(flow_steps - 1, -1, -1)
    if method == "euler":

        def step(x_next, j):
            # one step from t_{j+1} to t_j
            x = x_next - velocity(observations, x_next, grid[:, j + 1, None]) * dt
            return x, (x, jnp.zeros(x.shape[0], x.dtype), jnp.int32(0))

        x_f, (xs, residuals, counts) = jax.lax.scan(step, chunk, steps)
    else:

        def step(carry, j):
            # one step from t_{j+1} to t_j; v_next = v(s, x_next, t_{j+1}) from the previous step's solve
            x_next, v_next = carry
            x, res, n, v = _inverse_euler_step(
                velocity, observations, x_next, v_next, grid[:, j, None], dt, iterations, tolerance
            )
            return (x, v), (x, res, n)

        v_chunk = velocity(observations, chunk, grid[:, flow_steps, None])
        (x_f, _), (xs, residuals, counts) = jax.lax.scan(step, (chunk, v_chunk), steps)
    info = {"residual": jnp.max(residuals, axis=0), "iterations": jnp.max(counts)}
    f = grid[:, :1]
    if not return_trajectory:
        return x_f, f, info
    # xs[i] is the point at time t_{F-1-i}; flip to ascending time and append the chunk at t_F.
    trajectory = jnp.concatenate([jnp.flip(xs, axis=0), chunk[None]], axis=0).swapaxes(0, 1)
    return x_f, f, info, trajectory


def reverse_trajectory(
    velocity: Velocity, observations: jnp.ndarray, chunk: jnp.ndarray, flow_steps: int, method: str = "exact", **solver
):
    """Full reversal (d = 1) of every row: returns (trajectory (B, F + 1, D) with [:, j] at time j / F, info).

    [:, F] is the chunk itself and [:, 0] the noise the sampler maps to it. The rows of a reversal cache.
    `solver` is `reverse`'s `iterations` and `tolerance` (the exact method's fixed point).
    """
    distance = jnp.ones((chunk.shape[0],), chunk.dtype)
    _, _, info, trajectory = reverse(
        velocity, observations, chunk, distance, flow_steps, method, return_trajectory=True, **solver
    )
    return trajectory, info


def roundtrip_error(
    velocity: Velocity, observations: jnp.ndarray, noise: jnp.ndarray, chunk: jnp.ndarray, flow_steps: int
) -> jnp.ndarray:
    """Per-row max |sampler(noise) - chunk| with the sampler's final clip disabled."""
    return _max_abs(euler_sample(velocity, observations, noise, flow_steps, clip=False) - chunk)


def mixed_distances(key: jax.Array, batch_size: int, flow_steps: int) -> jnp.ndarray:
    """The reference's reversal distances: first B - B//2 rows d ~ U[0, 1), last B//2 rows d = k/F, k ~ U{0..F}."""
    k_uniform, k_grid = jax.random.split(key)
    n_grid = batch_size // 2
    uniform = jax.random.uniform(k_uniform, (batch_size - n_grid,))
    grid = jax.random.randint(k_grid, (n_grid,), 0, flow_steps + 1) / flow_steps
    return jnp.concatenate([uniform, grid.astype(jnp.float32)])
