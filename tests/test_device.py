"""The six scripts on a GPU: a short training run of each on CUDA (`--cuda`), with the devices of its rollout batches,
critic, checkpointed networks and optimiser moments, jax's backend (SMAX) and the GPU memory it took; and a run stopped
after one iteration and resumed on CUDA, bit for bit the run that never stopped (the checkpoint holds the CUDA random
state). Skipped without an NVIDIA GPU that torch can use.

The rest of the suite runs with CUDA hidden (conftest); these runs get the devices the suite was started with
(conftest.ON_DEVICE). They need only torch with CUDA, jax with CUDA (SMAX on the GPU) and the project's other
packages: benchmark/device_check.py runs them on a bare GPU machine. Set JAX_PLATFORMS=cpu to check SMAX on the CPU
beside torch on the GPU instead.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import ON_DEVICE, ROOT, script_env
from harness import Job, describe, run_scripts
from readers import assert_same_training_state, assert_same_tree, find_checkpoint

SMAC = ["--map", "2s3z", "--num-envs", 8, "--num-steps", 8, "--eval-episodes", 4, "--eval-interval", 1]
SCRIPTS = {  # script: (flags of a tiny run, environment steps per iteration)
    "fp3o_smac.py": (SMAC, 64),
    "mappo_smac.py": (SMAC, 64),
    "happo_smac.py": (SMAC, 64),
    "a2po_smac.py": (SMAC, 64),
    "fp3o_mamujoco.py": (["--num-envs", 2, "--num-steps", 32, "--num-minibatches", 4, "--eval-episodes", 2,
                          "--max-episode-steps", 20, "--agent-obsk", 1, "--eval-interval", 1], 64),
    "ippo_mpe.py": (["--num-envs", 2, "--num-steps", 5, "--max-cycles", 7, "--eval-episodes", 2, "--eval-interval", 1], 10),
}
COMMON = ["--cuda", "--no-progress-bar", "--torch-threads", 1, "--save-model", "--checkpoint-interval", 1]

# runs `python driver.py SCRIPT ARGS...`: the script as __main__, as `python SCRIPT ARGS` would run it, and device.json
DRIVER = '''
import json, os, runpy, sys
import torch

script = os.path.abspath(sys.argv[1])
seen = {"batches": [], "critic": []}
free_before, total = torch.cuda.mem_get_info()


def profile(frame, event, arg):
    """The devices of every batch rollout_batch returns (a dict, or a dict and more) and of the critic it was given."""
    code = frame.f_code
    if event == "return" and arg is not None and code.co_name == "rollout_batch" and code.co_filename == script:
        batch = arg[0] if isinstance(arg, tuple) else arg
        seen["batches"].append({k: str(v.device) for k, v in batch.items() if torch.is_tensor(v)})
        seen["critic"].append(sorted({str(p.device) for p in frame.f_locals["critic"].parameters()}))


sys.argv = [script] + sys.argv[2:]
sys.setprofile(profile)
try:
    runpy.run_path(script, run_name="__main__")
finally:
    sys.setprofile(None)
    jax = sys.modules.get("jax")
    seen["jax_backend"] = jax.default_backend() if jax is not None else None
    torch.cuda.synchronize()
    seen["memory_taken"] = (free_before - torch.cuda.mem_get_info()[0]) / total  # of the GPU's memory
    with open("device.json", "w") as f:
        json.dump(seen, f)
'''


def cuda_missing() -> Optional[str]:
    """Why these tests cannot run here, or None."""
    if not (shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia")):
        return "no NVIDIA GPU here (no nvidia-smi, /dev/nvidia0 or /proc/driver/nvidia)"
    if ON_DEVICE["CUDA_VISIBLE_DEVICES"] is not None and not ON_DEVICE["CUDA_VISIBLE_DEVICES"].strip():
        return "CUDA_VISIBLE_DEVICES is empty: every GPU is hidden"
    probe = "import torch; print(torch.cuda.is_available())"
    cmd = [sys.executable, "-c", probe]
    proc = subprocess.run(cmd, env=script_env(ON_DEVICE), capture_output=True, text=True, timeout=300)
    if proc.stdout.strip() != "True":
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: {proc.stderr.strip()[-300:]}"
    return None


MISSING = cuda_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"needs a CUDA GPU: {MISSING}")


def saved_from(path) -> dict:
    """A checkpoint read on the CPU, and {data pointer of each storage: the device it was saved from ('cuda:0')}."""
    where = {}

    def remember(storage, location):
        where[storage.data_ptr()] = location
        return storage

    return torch.load(path, map_location=remember, weights_only=False), where


def devices(tree, where) -> set:
    """The devices the non-empty tensors in a (nested) state dict were saved from."""
    if torch.is_tensor(tree):
        return {where[tree.untyped_storage().data_ptr()]} if tree.numel() else set()
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return set().union(*(devices(v, where) for v in values))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("device")
    driver = base / "device_driver.py"
    driver.write_text(DRIVER)
    jobs = []
    for script, (flags, steps) in SCRIPTS.items():
        name = script[:-3]
        one, two = [*flags, *COMMON, "--total-timesteps", steps], [*flags, *COMMON, "--total-timesteps", 2 * steps]
        half = base / f"{name}_resume"

        def resume(half=half, steps=steps):
            return ["--resume", keep_copy(half), "--total-timesteps", 2 * steps, "--no-progress-bar"]

        jobs.append(Job(f"{name}_full", str(driver), [ROOT / script, *two], base / f"{name}_full", env=ON_DEVICE))
        jobs.append(Job(f"{name}_half", script, one, half, env=ON_DEVICE))
        jobs.append(Job(f"{name}_resume", script, resume, half, env=ON_DEVICE, after=[f"{name}_half"]))
    results = run_scripts(jobs)
    print("run times: " + ", ".join(f"{n} {p.duration:.1f}s" for n, p in results.items()), file=sys.stderr)
    return {job.name: (results[job.name], Path(job.cwd)) for job in jobs}


def keep_copy(folder: Path) -> Path:
    """The checkpoint after one iteration, copied aside (the resumed run overwrites it)."""
    copy = folder / "half.pt"
    shutil.copyfile(find_checkpoint(folder), copy)
    return copy


def ran(runs, name):
    proc, cwd = runs[name]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, describe(proc)
    return proc, cwd


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_trains_on_the_gpu(runs, script):
    proc, cwd = ran(runs, f"{script[:-3]}_full")
    assert "device cuda" in proc.stdout, describe(proc)
    seen = json.loads((cwd / "device.json").read_text())
    assert len(seen["batches"]) == 2, "one rollout batch per iteration"
    for batch, critic in zip(seen["batches"], seen["critic"], strict=True):
        assert set(batch.values()) == {"cuda:0"}, f"rollout tensors off the GPU: {batch}"
        assert critic == ["cuda:0"]
    ckpt, where = saved_from(find_checkpoint(cwd))
    for key in ("actor", "critic"):
        assert devices(ckpt[key], where) == {"cuda:0"}, key
    for key in ("actor_opt", "critic_opt"):  # Adam's moments (its step counts stay on the CPU)
        moments = [s[m] for s in ckpt[key]["state"].values() for m in ("exp_avg", "exp_avg_sq")]
        assert moments and devices(moments, where) == {"cuda:0"}, key
    cuda_rng = ckpt["rng"].get("cuda")
    assert cuda_rng and all(torch.is_tensor(s) and s.numel() > 0 for s in cuda_rng), "the checkpoint lacks CUDA's RNG state"
    if script.endswith("_smac.py"):  # SMAX: jax on the GPU beside torch, unless the caller put it on the CPU
        expected = {"cpu"} if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu" else {"gpu", "cuda"}
        assert seen["jax_backend"] in expected, f"jax ran SMAX on {seen['jax_backend']} (install jax with CUDA)"
    # jax's default would take 75% of the GPU at its first call, leaving torch and other runs the rest
    assert seen["memory_taken"] < 0.25, f"the run took {seen['memory_taken']:.0%} of the GPU's memory"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_resume_on_the_gpu_equals_an_uninterrupted_run(runs, script):
    name, steps = script[:-3], SCRIPTS[script][1]
    _, full = ran(runs, f"{name}_full")
    ran(runs, f"{name}_half")
    _, resumed = ran(runs, f"{name}_resume")
    half = torch.load(resumed / "half.pt", map_location="cpu", weights_only=False)
    ref = torch.load(find_checkpoint(full), map_location="cpu", weights_only=False)
    res = torch.load(find_checkpoint(resumed), map_location="cpu", weights_only=False)
    assert half["iteration"] == 1 and half["rng"].get("cuda"), "stopped after one iteration, with CUDA's RNG state"
    assert any(not torch.equal(half["actor"][k], ref["actor"][k]) for k in ref["actor"]), "the second iteration trained"
    assert_same_training_state(ref, res, 2, 2 * steps)
    assert_same_tree(ref["rng"]["cuda"], res["rng"]["cuda"], "CUDA's RNG state")  # the GPU's samples went alike
