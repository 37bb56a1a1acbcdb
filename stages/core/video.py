"""Animated GIF writing for rollout videos (pure: no knowledge of the project's files)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stages.core.files import atomic_path


def as_frames(frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Stack frames into a uint8 array (T, H, W, 3), checking shape and dtype.

    Raises ValueError for an empty sequence, a frame that isn't (H, W, 3) or (H, W, 4), or frames of different sizes.
    """
    if len(frames) == 0:
        raise ValueError("no frames to write: the video is empty")
    first = np.asarray(frames[0])
    for i, frame in enumerate(frames):
        shape = np.shape(frame)
        if len(shape) != 3 or shape[2] not in (3, 4):
            raise ValueError(f"frame {i} has shape {shape}, expected (H, W, 3) or (H, W, 4)")
        if shape != first.shape:
            raise ValueError(
                f"frame {i} has shape {shape}, but frame 0 has {first.shape}; all frames must match"
            )
    stacked = np.stack([np.asarray(f) for f in frames])[..., :3]
    if stacked.dtype != np.uint8:
        if np.issubdtype(stacked.dtype, np.floating):
            stacked = np.clip(np.rint(stacked * 255.0), 0, 255)
        stacked = stacked.astype(np.uint8)
    return stacked


def write_gif(path: str | os.PathLike, frames: Sequence[np.ndarray] | np.ndarray, fps: float = 15.0) -> Path:
    """Write frames as a looping animated GIF, atomically (temporary file in the same folder, then rename).

    Args:
        path: destination file; its folder is created if missing.
        frames: T frames, each (H, W, 3) uint8 (float frames in [0, 1] are scaled); an alpha channel is dropped.
        fps: playback rate in frames per second.

    Returns:
        The destination path.
    """
    import imageio.v3 as iio

    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    stacked = as_frames(frames)
    dest = Path(path)
    with atomic_path(dest) as tmp:
        iio.imwrite(tmp, stacked, extension=".gif", duration=1000.0 / fps, loop=0)
    return dest
