"""--capture-video in the SMAC scripts: SMAX evaluation episodes as mp4 files and TensorBoard videos, the real game's
StarCraft II replays through the game processes (checked with the stand-in game of test_env.py)."""
import importlib
import os
import sys
import types

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from harness import Job, describe, run_dir, run_scripts, summary_line
from readers import find_checkpoint, load_checkpoint, read_scalars
from test_env import FakeSC2Env
from video import assert_watchable, tensorboard_videos

SCRIPTS = ["fp3o_smac", "mappo_smac", "happo_smac", "a2po_smac"]


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


@pytest.fixture(scope="module")
def video_runs(tmp_path_factory):
    """Every script: a 2-iteration run on SMAX 3m evaluating (and drawing 2 episodes) at both iterations, then
    `--eval-only --capture-video` on its checkpoint, in a folder of its own (its videos and events are the eval's)."""
    base, jobs = tmp_path_factory.mktemp("videos"), []
    common = ["--map", "3m", "--num-envs", "8", "--num-steps", "25", "--eval-episodes", "3", "--no-progress-bar"]
    train = [*common, "--total-timesteps", "400", "--eval-interval", "1", "--capture-video", "--video-episodes", "2"]
    evaluate = ["--eval-only", "--capture-video", "--video-episodes", "1"]
    for name in SCRIPTS:
        resume = lambda name=name: ["--resume", find_checkpoint(base / name / "train"), *evaluate]
        jobs += [
            Job(f"{name}/train", f"{name}.py", [*train, "--save-model"], base / name / "train"),
            Job(f"{name}/eval", f"{name}.py", resume, base / name / "eval", after=[f"{name}/train"]),
        ]
    return base, run_scripts(jobs)


def videos_and_steps(run) -> tuple:
    """The mp4 files of a run folder and the steps of its TensorBoard videos videos/episode_{k}."""
    videos = tensorboard_videos(run)
    return sorted(p.name for p in (run / "videos").glob("*.mp4")), {t: [s for s, _ in v] for t, v in videos.items()}


def first_episode_lengths(name, checkpoint) -> dict:
    """The lengths of the first episodes of a SMAX 3m evaluation (3 episodes) of the checkpoint's actor, in process."""
    S, ckpt = importlib.import_module(name), load_checkpoint(checkpoint)
    envs, args = LengthsOf(S.SmaxEnvs("3m", 3, torch.device("cpu"))), ckpt["args"]
    actor = S.AgentNet(envs.envs.n_agents, envs.envs.obs_dim, envs.envs.n_actions, args["hidden_size"], args["sharing"],
                       recurrent=args["actor"] == "rnn")
    actor.load_state_dict(ckpt["actor"])
    S.evaluate(actor, envs, 3, torch.device("cpu"))
    return envs.lengths


@pytest.mark.parametrize("name", SCRIPTS)
def test_capture_video_writes_mp4s_and_tensorboard_videos_and_eval_only_renders_a_checkpoint(video_runs, name):
    base, procs = video_runs
    train, again = procs[f"{name}/train"], procs[f"{name}/eval"]
    assert train.returncode == 0 and again.returncode == 0, describe(train) + describe(again)
    run = run_dir(base / name / "train")
    videos, steps = videos_and_steps(run)
    assert videos == ["200_0.mp4", "200_1.mp4", "400_0.mp4", "400_1.mp4"], "every evaluation, its first 2 episodes"
    assert steps == {"videos/episode_0": [200, 400], "videos/episode_1": [200, 400]}
    lengths = first_episode_lengths(name, run / "checkpoint.pt")  # of the last evaluation, the checkpoint's policy
    gifs = tensorboard_videos(run)
    for k in range(2):  # one frame per state the agents act in, in the mp4 and in TensorBoard's GIF
        first, last = gifs[f"videos/episode_{k}"]
        assert_watchable(iio.imread(run / "videos" / f"200_{k}.mp4"), first[1])
        assert_watchable(iio.imread(run / "videos" / f"400_{k}.mp4"), lengths[k])
        assert last[1] == lengths[k]
    assert_watchable(iio.imread(base / name / "eval" / "runs" / run.name / "videos" / "400_0.mp4"), lengths[0])
    assert "ALSA" not in train.stderr and "os.fork" not in train.stderr, "the encoders start quietly"
    win = read_scalars(run)["eval/win_rate"][-1][1]  # the run's last line sums it up: the final evaluation, steps, ...
    assert summary_line(train).groups() == ("eval", "win rate", f"{win:.3f}", "400", run.name)
    assert videos_and_steps(base / name / "eval" / "runs" / run.name) == (["400_0.mp4"], {"videos/episode_0": [400]}), (
        "--eval-only: its first episode at the checkpoint's step, as mp4 and TensorBoard video"
    )


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
