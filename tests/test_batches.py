"""Device dataset and chunk sampling: padding, masks, rewards and s' at episode boundaries; validation errors."""

import jax
import numpy as np
import pytest

from stages.core import batches

GAMMA = 0.5


def _two_episodes():
    """Episode A = rows 0..3, episode B = rows 4..6; every value tells its row apart."""
    n = 7
    rows = np.arange(n, dtype=np.float32)
    return {
        "observations": np.stack([rows, -rows], axis=1),
        "actions": np.stack([rows / 10, rows / 10 + 0.05], axis=1),
        "rewards": rows + 1.0,  # r_i = i + 1
        "masks": np.array([1, 1, 1, 0, 1, 1, 1], np.float32),  # success at row 3
        "terminals": np.array([0, 0, 0, 1, 0, 0, 1], np.float32),
        "next_observations": np.stack([rows + 100, -rows - 100], axis=1),  # s'_i distinct from s_{i+1}
    }


def test_episode_indices():
    end, starts = batches.episode_indices(_two_episodes()["terminals"])
    np.testing.assert_array_equal(end, [3, 3, 3, 3, 6, 6, 6])
    np.testing.assert_array_equal(starts, [0, 1, 2, 4, 5])  # never an episode's last row (as the reference)


def test_chunks_at_boundaries_hand_computed():
    data = batches.to_device(_two_episodes())
    b = batches.chunks_at(data, jax.numpy.array([0, 1, 2, 5]), h=3, discount=GAMMA)
    b = {k: np.asarray(v) for k, v in b.items()}
    # row 0: steps 0,1,2 all real, chunk ends before the episode end
    # row 1: steps 1,2,3, ends exactly at the episode's last row 3 -> s' = next_observations[3] (reference: s_3)
    # row 2: steps 2,3,(3) -> one padded step, invalid
    # row 5: steps 5,6,(6) -> one padded step, invalid
    np.testing.assert_array_equal(b["action_mask"], [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(b["valid"], [1, 1, 0, 0])
    np.testing.assert_allclose(
        b["actions"][2], [0.2, 0.25, 0.3, 0.35, 0.3, 0.35], rtol=1e-6
    )  # last real action repeated
    np.testing.assert_allclose(
        b["reward_sum"],
        [1 + GAMMA * 2 + GAMMA**2 * 3, 2 + GAMMA * 3 + GAMMA**2 * 4, 3 + GAMMA * 4, 6 + GAMMA * 7],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(
        b["bootstrap_mask"], [1, 0, 0, 1]
    )  # mask of the last real step (2, 3, 3, 6)
    np.testing.assert_array_equal(b["next_observations"][:, 0], [102, 103, 103, 106])
    np.testing.assert_array_equal(b["observations"][:, 0], [0, 1, 2, 5])
    np.testing.assert_array_equal(b["rows"], [0, 1, 2, 5])


def test_h1_chunks_are_plain_transitions():
    data = batches.to_device(_two_episodes())
    b = batches.chunks_at(data, data.starts, h=1, discount=GAMMA)
    np.testing.assert_array_equal(b["valid"], 1)
    np.testing.assert_array_equal(b["reward_sum"], [1, 2, 3, 5, 6])
    np.testing.assert_array_equal(b["next_observations"][:, 0], [100, 101, 102, 104, 105])


def test_sampling_in_jit_covers_all_starts_and_only_starts():
    data = batches.to_device(_two_episodes())
    sample = jax.jit(lambda key: batches.sample_chunks(data, key, 512, 3, GAMMA))
    b = sample(jax.random.PRNGKey(0))
    assert set(np.asarray(b["rows"]).tolist()) == {0, 1, 2, 4, 5}
    assert b["actions"].shape == (512, 6) and b["actions"].dtype == np.float32
    assert not np.array_equal(b["rows"], sample(jax.random.PRNGKey(1))["rows"])


def test_action_loss_mask_follows_the_flat_chunk_layout():
    mask = batches.action_loss_mask(jax.numpy.array([[1.0, 1.0, 0.0]]), action_dim=2)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0]])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("masks"), "missing"),
        (lambda d: d.update(rewards=np.zeros(6)), "rewards"),
        (lambda d: d.update(terminals=np.zeros(7)), "terminals\\[-1\\]"),
        (lambda d: d["observations"].__setitem__((2, 0), np.nan), "NaN"),
        (lambda d: d.update(next_observations=np.zeros((7, 3))), "next_observations"),
    ],
)
def test_to_device_rejects_bad_datasets(change, message):
    dataset = _two_episodes()
    change(dataset)
    with pytest.raises(ValueError, match=message):
        batches.to_device(dataset)


def test_reversal_cache_shape_is_checked():
    with pytest.raises(ValueError, match="reversal cache"):
        batches.to_device(_two_episodes(), reversal=np.zeros((6, 11, 6)))
    data = batches.to_device(_two_episodes(), reversal=np.zeros((7, 11, 6)))
    assert data.reversal.shape == (7, 11, 6)
