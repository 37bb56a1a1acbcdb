"""Rollout videos: frames of an evaluated episode (with and without shadows) and the GIF written from them."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from stages.core.rollout import Evaluator
from stages.core.video import write_gif
from tests.cube_oracle import TASK, OraclePolicy


def test_video_frames_and_gif(local, tmp_path):
    result = local.run(OraclePolicy(h=5), episodes=2, max_episode_steps=10, video_episodes=1, frame_skip=4)
    assert set(result.videos) == {0}
    frames = result.videos[0]
    assert frames.shape == (4, 200, 200, 3) and frames.dtype == np.uint8  # reset, steps 4 and 8, last step 10
    assert not np.array_equal(frames[0], frames[-1]), "the arm moves between the first and last frame"
    assert local._backend.local.envs[0].unwrapped._model.vis.quality.shadowsize == 1024  # cheaper shadow map
    path = write_gif(tmp_path / "sub" / "rollout.gif", frames, fps=10)
    back = iio.imread(path, index=None)
    assert back.shape[:3] == (4, 200, 200)
    assert [p.name for p in path.parent.iterdir()] == ["rollout.gif"]  # no temporary file left behind
    with pytest.raises(ValueError, match="no frames"):
        write_gif(tmp_path / "empty.gif", [])


def test_video_frames_without_shadows_turn_off_every_lights_shadow_and_keep_the_same_episode(local):
    """shadow_size=0 (the evaluate stage's GIF): no light casts a shadow, frames differ, the episode is the same."""
    with Evaluator(TASK, num_envs=1, workers=1, shadow_size=0) as shadowless:
        plain = shadowless.run(OraclePolicy(h=5), episodes=1, max_episode_steps=10, video_episodes=1, frame_skip=4)
        model = shadowless._backend.local.envs[0].unwrapped._model
        assert model.nlight > 0 and not model.light_castshadow.any()
    shadowed = local.run(OraclePolicy(h=5), episodes=1, max_episode_steps=10, video_episodes=1, frame_skip=4)
    assert local._backend.local.envs[0].unwrapped._model.light_castshadow.any()
    assert plain.videos[0].shape == shadowed.videos[0].shape
    assert not np.array_equal(plain.videos[0], shadowed.videos[0]), "the shadow of the arm is gone"
    assert plain.to_dict()["episodes"] == shadowed.to_dict()["episodes"]  # rendering changes no step of the episode
    with pytest.raises(ValueError, match="shadow_size"):
        Evaluator(TASK, num_envs=1, workers=1, shadow_size=-1)
