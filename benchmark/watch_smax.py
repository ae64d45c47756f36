"""Watch a saved SMAC policy: its greedy SMAX episodes as mp4 videos and TensorBoard videos, for any of the SMAC scripts.

`mappo_smac.py --resume runs/<run>/checkpoint.pt --eval-only --capture-video` renders a MAPPO checkpoint itself;
fp3o_smac.py, happo_smac.py and a2po_smac.py have no --capture-video yet (each script's 900-line budget), and this
renders their checkpoints the same way. It finds the script whose Args wrote the checkpoint (that script's
load_checkpoint checks the file), builds that script's actor from the saved settings and weights, plays `--episodes`
greedy episodes through mappo_smac.py's SMAX wrapper and evaluate() (the episodes of every script's evaluation: the
same reset seed), draws the first `--videos` of them with its renderer and writes them with its record():
runs/<run>/videos/{global_step}_{k}.mp4 and the TensorBoard videos videos/episode_{k} of runs/<run>, below the current
folder (as the scripts' --eval-only does).

Usage: python benchmark/watch_smax.py runs/<run>/checkpoint.pt --videos 2
"""
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("fp3o_smac", "happo_smac", "a2po_smac", "mappo_smac")


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """a checkpoint of a SMAC script trained on SMAX (`runs/<run>/checkpoint.pt`, written by --save-model)"""
    episodes: Optional[int] = None
    """greedy episodes to play (default: the run's --eval-episodes)"""
    videos: int = 1
    """episodes drawn, the first ones (at most --episodes)"""


def import_script(name: str):
    sys.path.insert(0, ROOT)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(ROOT)


def script_of(saved_args: dict) -> str:
    """The SMAC script whose Args hold every saved setting; of several (a checkpoint of an older version, which saved
    fewer), the one that lacks the fewest."""
    fields = {name: set(import_script(name).Args.__dataclass_fields__) for name in SCRIPTS}
    fitting = [name for name in SCRIPTS if set(saved_args) <= fields[name]]
    return min(fitting, key=lambda name: len(fields[name] - set(saved_args))) if fitting else "mappo_smac"


def load_checkpoint(path: str):
    """(the SMAC script that wrote the checkpoint at `path`, the checkpoint); a file that is not such a checkpoint is one
    `error:` line of that script's own load_checkpoint."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)["args"]
    except Exception:  # the script's load_checkpoint says what is wrong with the file
        saved = {}
    S = import_script(script_of(saved))
    return S, S.load_checkpoint(path)


def saved_actor(S, ckpt: dict, envs):
    """The actor of script S for `envs` (SMAX), built from the checkpoint's settings, with its saved weights."""
    a = ckpt["args"]
    if S.choose_backend(a["env_backend"], a["map"]) != "smax":
        S.fail(f"{a['map']} was trained on the real game, not SMAX: there --capture-video saves StarCraft II replays")
    actor = S.AgentNet(envs.n_agents, envs.obs_dim, envs.n_actions, a["hidden_size"], a["sharing"],
                       recurrent=a["actor"] == "rnn")  # fmt: skip
    actor.load_state_dict(ckpt["actor"])
    return actor


def main(args: Args):
    M = import_script("mappo_smac")  # the SMAX wrapper, evaluate(), the renderer and record() of --capture-video
    M.import_smax()  # quietly: a SMAX checkpoint holds jaxmarl's env states, whose import prints otherwise
    S, ckpt = load_checkpoint(args.checkpoint)
    episodes, run_name = args.episodes or ckpt["args"]["eval_episodes"], ckpt["run_name"]
    if not 1 <= args.videos <= episodes:
        M.fail(f"--videos ({args.videos}) must lie between 1 and --episodes ({episodes})")
    if not (M.importable("imageio_ffmpeg") and M.importable("moviepy")):
        M.fail("videos need imageio-ffmpeg and moviepy: pip install -r requirements.txt")
    device = torch.device("cpu")
    envs = M.make_envs("smax", ckpt["args"]["map"], episodes, 0, device)  # a map SMAX lacks: one error line
    actor = saved_actor(S, ckpt, envs)
    ret, win, frames = M.evaluate(actor, envs, episodes, device, args.videos)
    M.record(envs, frames, args.videos, run_name, ckpt["global_step"], SummaryWriter(f"runs/{run_name}"))
    print(f"{S.__name__}.py at step {ckpt['global_step']}: win_rate {win:.3f}, episodic_return {ret:.3f} over {episodes} "
          f"episodes; videos in runs/{run_name}/videos/")


if __name__ == "__main__":
    main(tyro.cli(Args))
