"""Videos of evaluation episodes (--capture-video): what evaluate() draws and what a run writes.

- `EndingAt(envs, lengths)`: batched envs whose env i ends its first episode after lengths[i] steps.
- `assert_watchable(frames, length)`: a video of exactly `length` frames, neither blank nor frozen.
- `tensorboard_videos(run)`: a run's TensorBoard videos, {tag: [(step, frames), ...]}.
- `assert_videos(proc, run, steps, episodes, length, size)`: a run's mp4 files and TensorBoard videos.
"""
from pathlib import Path

import numpy as np
import torch


class EndingAt:
    """Batched envs (a script's env class) whose env i ends its first episode after lengths[i] steps, for checking what
    evaluate() does with episodes of different lengths (e.g. videos of the first ones)."""

    def __init__(self, envs, lengths):
        self.envs, self.num_envs, self.lengths, self.t = envs, envs.num_envs, torch.tensor(lengths), 0

    def reset(self, seed):
        return self.envs.reset(seed)

    def step(self, actions):
        out, self.t = self.envs.step(actions), self.t + 1
        out["done"] = out["done"] | (self.lengths == self.t)
        return out

    def render(self, i):
        return self.envs.render(i)


def assert_watchable(frames, length: int):
    """A video of `length` frames [T, H, W, 3] (uint8) that is neither blank nor frozen."""
    frames = np.asarray(frames)
    assert frames.shape[0] == length, f"one frame per state the agents act in: {frames.shape[0]} frames, not {length}"
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8
    assert frames[0].std() > 0, "a blank frame"
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 0.1, "a frozen video"


def tensorboard_videos(run: Path) -> dict:
    """A run's TensorBoard videos (tags videos/...), in the order written: {tag: [(step, the number of frames of its GIF)]}."""
    import imageio.v3 as iio
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    tags = [tag for tag in events.Tags()["images"] if tag.startswith("videos/")]
    frames = lambda image: len(iio.imread(image.encoded_image_string, extension=".gif"))
    return {tag: [(image.step, frames(image)) for image in events.Images(tag)] for tag in tags}


def assert_videos(proc, run: Path, steps, episodes: int, length: int, size):
    """A run's --capture-video output: videos/{step}_{k}.mp4 for every evaluation step and its first `episodes` episodes,
    each a watchable video of `length` frames of `size` (H, W); the same as TensorBoard videos; the encoders quiet."""
    import imageio.v3 as iio

    assert {p.name for p in (run / "videos").iterdir()} == {f"{s}_{k}.mp4" for s in steps for k in range(episodes)}
    for path in (run / "videos").iterdir():
        frames = iio.imread(path)
        assert frames.shape[1:3] == tuple(size), path
        assert_watchable(frames, length)
    videos = tensorboard_videos(run)
    for k in range(episodes):
        assert [step for step, _ in videos[f"videos/episode_{k}"]] == list(steps)
    assert "ALSA" not in proc.stderr, "the encoders start quietly"
