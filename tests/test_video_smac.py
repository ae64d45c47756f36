"""--capture-video in the SMAC scripts: SMAX evaluation episodes as mp4 files and TensorBoard videos, the real game's
StarCraft II replays through the game processes (checked with the stand-in game of test_env.py)."""
import glob
import importlib
import os
import sys
import types

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from harness import run_dir, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_env import FakeSC2Env
from video import assert_watchable

SCRIPTS = ["mappo_smac"]  # the SMAC scripts with --capture-video


@pytest.fixture(params=SCRIPTS)
def S(request):
    return importlib.import_module(request.param)


class LengthsOf:
    """Passes an env batch through and keeps the length of each env's first finished episode."""

    def __init__(self, envs):
        self.envs, self.num_envs, self.lengths = envs, envs.num_envs, {}

    def reset(self, seed):
        return self.envs.reset(seed)

    def step(self, actions):
        out = self.envs.step(actions)
        for i in torch.nonzero(out["done"]).flatten().tolist():
            self.lengths.setdefault(i, int(out["ep_length"][i]))
        return out

    def render(self, i):
        return self.envs.render(i)


def test_evaluate_draws_one_frame_per_step_of_the_first_episodes(S):
    torch.manual_seed(0)
    envs = LengthsOf(S.SmaxEnvs("3m", 3, torch.device("cpu")))
    actor = S.AgentNet(envs.envs.n_agents, envs.envs.obs_dim, envs.envs.n_actions, 16, "full", recurrent=True)
    ret, win, frames = S.evaluate(actor, envs, 3, torch.device("cpu"), videos=2)
    assert len(frames) == 2 and sorted(envs.lengths) == [0, 1, 2]
    for k, video in enumerate(frames):
        assert_watchable(video, envs.lengths[k])
    assert (ret, win) == S.evaluate(actor, envs.envs, 3, torch.device("cpu"))[:2], "drawing changes no result"
    assert S.evaluate(actor, envs.envs, 3, torch.device("cpu"))[2] == [], "nothing is drawn without videos"


def test_the_drawing_shows_units_by_team_and_health(S):
    envs = S.SmaxEnvs("3m", 1, torch.device("cpu"))
    envs.reset(seed=0)
    full = envs.render(0)
    blue, red = np.array([31, 119, 180]), np.array([214, 39, 40])  # matplotlib's C0 and C3
    assert (np.abs(full.astype(int) - blue).sum(-1) < 30).sum() > 50, "allies are drawn in blue"
    assert (np.abs(full.astype(int) - red).sum(-1) < 30).sum() > 50, "enemies are drawn in red"
    state = envs.carry[1].state
    envs.carry = (envs.carry[0], envs.carry[1].replace(state=state.replace(unit_health=state.unit_health * 0.1)))
    assert (np.abs(envs.render(0).astype(int) - red).sum(-1) < 30).sum() == 0, "a wounded unit is drawn paler"


def test_capture_video_writes_mp4s_and_tensorboard_videos_and_eval_only_renders_a_checkpoint(tmp_path):
    script = f"{SCRIPTS[0]}.py"
    common = ["--map", "3m", "--num-envs", "8", "--num-steps", "25", "--eval-episodes", "3", "--no-progress-bar"]
    proc = run_script(script, *common, "--total-timesteps", "400", "--eval-interval", "1", "--capture-video",
                      "--video-episodes", "2", "--save-model", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir(tmp_path)
    videos = sorted(os.path.basename(p) for p in glob.glob(f"{run}/videos/*.mp4"))
    assert videos == ["200_0.mp4", "200_1.mp4", "400_0.mp4", "400_1.mp4"], "every evaluation, its first 2 episodes"
    frames = iio.imread(f"{run}/videos/400_0.mp4")
    assert_watchable(frames, len(frames))
    assert len(frames) > 1
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert {"videos/episode_0", "videos/episode_1"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("videos/episode_0")] == [200, 400]
    assert "ALSA" not in proc.stderr and "os.fork" not in proc.stderr, "the encoders start quietly"
    for path in glob.glob(f"{run}/videos/*"):
        os.remove(path)
    proc = run_script(script, "--resume", f"{run}/checkpoint.pt", "--eval-only", "--capture-video", "--video-episodes", "1",
                      cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.path.basename(p) for p in glob.glob(f"{run}/videos/*.mp4")) == ["400_0.mp4"]
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("videos/episode_0")] == [200, 400, 400], "and the evaluation's TensorBoard video"


class ReplayingGame(FakeSC2Env):
    """The stand-in game with SMAC's replay API: save_replay() writes a replay of the episodes so far to replay_dir."""

    def __init__(self, index, replay_dir):
        super().__init__(index)
        self.replay_dir = replay_dir

    def save_replay(self):
        os.makedirs(self.replay_dir, exist_ok=True)
        with open(os.path.join(self.replay_dir, f"game{self.index}_{self.episode}.SC2Replay"), "w") as f:
            f.write(f"{self.episode} episodes")


def test_the_real_game_saves_replays_of_the_first_games(S, tmp_path):
    envs = S.SC2Envs(lambda i: ReplayingGame(i, str(tmp_path / "replays")), 3, torch.device("cpu"))
    try:
        out = envs.reset(seed=0)
        for _ in range(4):
            out = envs.step(torch.ones(3, FakeSC2Env.N_AGENTS, dtype=torch.long) * out["active"].long())
        S.record(envs, [], 2, "unused", 0, writer=None)
        assert sorted(os.listdir(tmp_path / "replays")) == ["game0_3.SC2Replay", "game1_2.SC2Replay"]
        assert envs.step(torch.zeros(3, FakeSC2Env.N_AGENTS, dtype=torch.long))["obs"].shape[0] == 3, "games go on"
    finally:
        envs.close()


def test_the_games_are_made_with_the_replay_folder(S, monkeypatch):
    made = []
    fake = types.SimpleNamespace(StarCraft2Env=lambda **kw: made.append(kw), StarCraftCapabilityEnvWrapper=None)
    fake.StarCraftCapabilityEnvWrapper = lambda **kw: made.append(kw)
    for name in ("smac", "smac.env", "smacv2", "smacv2.env", "smacv2.env.starcraft2", "smacv2.env.starcraft2.wrapper"):
        monkeypatch.setitem(sys.modules, name, fake)
    S.make_sc2_env("smac", "3m", 1, "/tmp/replays")
    S.make_sc2_env("smacv2", "protoss_5_vs_5", 1, "/tmp/replays")
    assert [kw["replay_dir"] for kw in made] == ["/tmp/replays", "/tmp/replays"]
