"""Training throughput of a SMAC script next to the raw SMAX stepping rate at the same number of envs.

Raw stepping: the script's own environment wrapper stepped with uniformly random available actions.
Training: a real run of the script; SPS, rollout and update time are read from its TensorBoard log
(the first `--skip` iterations, which include jit compilation, are left out).

Usage: python benchmark/throughput.py --scripts fp3o_smac.py --sharing full none --iterations 12
"""
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List

import torch
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: ["fp3o_smac.py"])
    """top-level SMAC scripts to measure"""
    sharing: List[str] = field(default_factory=lambda: ["full", "none"])
    """sharing modes to measure"""
    map: str = "2s3z"
    """SMAX map"""
    num_envs: int = 128
    """environments (the scripts' default)"""
    num_steps: int = 25
    """steps per environment per iteration (the scripts' default)"""
    iterations: int = 12
    """training iterations per measurement"""
    skip: int = 2
    """first iterations left out of the averages (jit compilation, warm-up)"""
    raw_steps: int = 500
    """batched steps for the raw stepping rate"""
    out: str = os.path.join(ROOT, "benchmark", "results", "throughput.md")
    """markdown table to write"""


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_sps(module, map_name, num_envs, steps):
    """Env steps per second of the script's wrapper alone, with random available actions."""
    envs = module.make_envs("smax", map_name, num_envs, 0, torch.device("cpu"))
    nxt = envs.reset(seed=0)
    for i in range(steps + 20):
        if i == 20:  # after compilation
            start = time.perf_counter()
        logits = torch.zeros(nxt["avail"].shape).masked_fill(~nxt["avail"], -1e10)
        nxt = envs.step(torch.distributions.Categorical(logits=logits).sample())
    return steps * num_envs / (time.perf_counter() - start)


def scalars(run_dir, tag):
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def train_stats(script, sharing, args):
    """Mean SPS / rollout / update seconds of a short training run, and its peak resident memory."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, script), "--map", args.map, "--sharing", sharing,
               "--num-envs", str(args.num_envs), "--num-steps", str(args.num_steps), "--eval-interval", "0",
               "--total-timesteps", str(args.iterations * args.num_envs * args.num_steps), "--no-progress-bar"]  # fmt: skip
        wrapped = ["/usr/bin/time", "-f", "%M"] if os.path.exists("/usr/bin/time") else []
        proc = subprocess.run(wrapped + cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        run_dir = glob.glob(os.path.join(tmp, "runs", "*"))[0]
        rollout = scalars(run_dir, "charts/rollout_time")[args.skip :]
        update = scalars(run_dir, "charts/update_time")[args.skip :]
        batch = args.num_envs * args.num_steps
        sps = batch * len(rollout) / (sum(rollout) + sum(update))
        peak_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024 if wrapped else float("nan")
        return sps, sum(rollout) / len(rollout), sum(update) / len(update), peak_mb


if __name__ == "__main__":
    args = tyro.cli(Args)
    rows = []
    for script in args.scripts:
        raw = raw_sps(load_script(os.path.join(ROOT, script)), args.map, args.num_envs, args.raw_steps)
        for sharing in args.sharing:
            sps, rollout, update, peak = train_stats(script, sharing, args)
            rows.append((script, sharing, sps, raw, rollout, update, peak))
            print(rows[-1], flush=True)
    lines = [f"SMAX `{args.map}`, {args.num_envs} envs x {args.num_steps} steps, {os.cpu_count()} CPU cores, "
             f"`python benchmark/throughput.py {' '.join(sys.argv[1:])}`", "",
             "| script | sharing | training SPS | raw SMAX SPS | training / raw | rollout s/iter | update s/iter | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for script, sharing, sps, raw, rollout, update, peak in rows:
        lines.append(f"| {script} | {sharing} | {sps:.0f} | {raw:.0f} | {sps / raw:.0%} | {rollout:.3f} | {update:.3f} | {peak:.0f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
