"""Device-resident offline dataset and on-device sampling of action chunks.

Dataset rows i = 0..N-1 are transitions (s_i, a_i, r_i, m_i, s'_i); `terminals[i] = 1` marks the last row of an
episode (a time limit, not a task end: bootstrapping is controlled by `masks` = 1 - success). For a chunk that
starts at row i of an episode whose last row is T, with h steps and discount gamma:

    idx_k        = min(i + k, T),                       k = 0..h-1
    real_k       = [i + k <= T]                         (steps past the episode end are padding)
    actions      = concat_k a_{idx_k}                   (padding repeats the episode's last action)
    reward_sum   = sum_k gamma^k r_{idx_k} real_k
    L            = min(i + h - 1, T)                    (the chunk's last real step)
    bootstrap    = m_L,   next_obs = s'_L,   valid = [i + h - 1 <= T]  (all h actions are real)

Chunk starts are drawn uniformly over the rows that are not the last row of their episode, like the
reference (which draws an episode, then a start in [first, last) of it: the same law for equal-length episodes).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

DATASET_KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


@flax.struct.dataclass
class DeviceDataset:
    """The dataset as jax arrays plus precomputed indices.

    episode_end[i]: index of the last row of row i's episode. starts: rows a chunk may start at.
    reversal: optional (N, F + 1, h * d) cache; reversal[i, k] is the point at flow time k / F of the
    reversed chunk that starts at row i (reversal[i, F] = that chunk). Rows never used as starts may hold anything.
    """

    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    masks: jax.Array
    next_observations: jax.Array
    episode_end: jax.Array
    starts: jax.Array
    reversal: jax.Array | None = None

    @property
    def size(self) -> int:
        return self.observations.shape[0]

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]


def _as_f32(name: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"dataset[{name!r}] must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"dataset[{name!r}] contains NaN or inf")
    return arr


def episode_indices(terminals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From the terminal flags, (episode_end per row, valid chunk starts = rows with terminals == 0)."""
    done = np.asarray(terminals) > 0
    if done.ndim != 1 or done.size == 0:
        raise ValueError(f"terminals must be a non-empty 1-D array, got shape {np.shape(terminals)}")
    if not done[-1]:
        raise ValueError("terminals[-1] must be 1: the dataset has to end with the last row of an episode")
    ends = np.flatnonzero(done)
    episode_end = ends[np.searchsorted(ends, np.arange(done.size))]
    starts = np.flatnonzero(~done)
    if starts.size == 0:
        raise ValueError("no chunk can start anywhere: every episode has a single row")
    return episode_end.astype(np.int32), starts.astype(np.int32)


def to_device(dataset: Mapping[str, np.ndarray], reversal: np.ndarray | None = None) -> DeviceDataset:
    """Validate a dataset dict (see DATASET_KEYS) and put it on the default device once."""
    missing = [k for k in DATASET_KEYS if k not in dataset]
    if missing:
        raise ValueError(f"dataset is missing keys {missing}; needs {list(DATASET_KEYS)}")
    arrays = {k: _as_f32(k, dataset[k]) for k in DATASET_KEYS}
    n = arrays["observations"].shape[0]
    expected_ndim = {
        "observations": 2,
        "actions": 2,
        "next_observations": 2,
        "rewards": 1,
        "masks": 1,
        "terminals": 1,
    }
    for k, ndim in expected_ndim.items():
        if arrays[k].ndim != ndim or arrays[k].shape[0] != n:
            raise ValueError(f"dataset[{k!r}] has shape {arrays[k].shape}; expected {ndim}-D with {n} rows")
    if arrays["next_observations"].shape != arrays["observations"].shape:
        raise ValueError(
            f"next_observations {arrays['next_observations'].shape} != observations {arrays['observations'].shape}"
        )
    episode_end, starts = episode_indices(arrays["terminals"])
    cache = None
    if reversal is not None:
        cache = _as_f32("reversal", reversal)
        if cache.ndim != 3 or cache.shape[0] != n or cache.shape[2] % arrays["actions"].shape[1] != 0:
            raise ValueError(
                f"reversal cache must be (N={n}, F + 1, h * action_dim={arrays['actions'].shape[1]}k), got {cache.shape}"
            )
    return DeviceDataset(
        observations=jnp.asarray(arrays["observations"]),
        actions=jnp.asarray(arrays["actions"]),
        rewards=jnp.asarray(arrays["rewards"]),
        masks=jnp.asarray(arrays["masks"]),
        next_observations=jnp.asarray(arrays["next_observations"]),
        episode_end=jnp.asarray(episode_end),
        starts=jnp.asarray(starts),
        reversal=None if cache is None else jnp.asarray(cache),
    )


def chunks_at(data: DeviceDataset, rows: jax.Array, h: int, discount: float) -> dict[str, jax.Array]:
    """The length-h chunks that start at `rows` (B,), as defined in the module docstring.

    Returns observations (B, obs_dim), actions (B, h * d), action_mask (B, h), reward_sum (B,),
    bootstrap_mask (B,), valid (B,), next_observations (B, obs_dim), rows (B,).
    """
    if h < 1:
        raise ValueError(f"chunk length h must be >= 1, got {h}")
    rows = rows.astype(jnp.int32)
    end = data.episode_end[rows]  # (B,)
    offsets = jnp.arange(h, dtype=jnp.int32)
    steps = rows[:, None] + offsets[None, :]  # (B, h)
    idx = jnp.minimum(steps, end[:, None])
    real = (steps <= end[:, None]).astype(jnp.float32)
    gammas = jnp.asarray(discount, jnp.float32) ** offsets.astype(jnp.float32)
    last = jnp.minimum(rows + h - 1, end)
    batch_size = rows.shape[0]
    return {
        "observations": data.observations[rows],
        "actions": data.actions[idx].reshape(batch_size, h * data.action_dim),
        "action_mask": real,
        "reward_sum": jnp.sum(data.rewards[idx] * gammas * real, axis=1),
        "bootstrap_mask": data.masks[last],
        "valid": (rows + h - 1 <= end).astype(jnp.float32),
        # The reference takes observations[min(i + h, T)] here, which is s_T (not s'_T) when the chunk ends
        # exactly at the episode's last row; s'_L = next_observations of the chunk's last real step is right.
        "next_observations": data.next_observations[last],
        "rows": rows,
    }


def sample_rows(data: DeviceDataset, key: jax.Array, batch_size: int) -> jax.Array:
    """`batch_size` chunk starts drawn uniformly (with replacement) from `data.starts`."""
    pick = jax.random.randint(key, (batch_size,), 0, data.starts.shape[0])
    return data.starts[pick]


def sample_chunks(data: DeviceDataset, key: jax.Array, batch_size: int, h: int, discount: float) -> dict:
    """A batch of random chunks (see `chunks_at`), sampled on the device."""
    return chunks_at(data, sample_rows(data, key, batch_size), h, discount)


def action_loss_mask(action_mask: jax.Array, action_dim: int) -> jax.Array:
    """Expand the per-step mask (B, h) to the flattened chunk layout (B, h * action_dim)."""
    return jnp.repeat(action_mask, action_dim, axis=1)
