"""Running the top-level scripts from tests.

- `run_script(script, *args, cwd=...)`: a top-level script in a subprocess (with `sys.executable`) in `cwd`, so that
  its `runs/` and `wandb/` folders land there; returns the CompletedProcess (text stdout/stderr, `duration`).
- `run_scripts(jobs)`: several such runs (`Job`s) at once, a few in parallel, for module-scoped fixtures.
- `run_dir(cwd)`, `run_dirs(cwd)`, `ran_ok(runs, name)`, `describe(proc)`: a run's TensorBoard folder, and checks.
- `run_in_process(script, *args, cwd=..., monkeypatch=..., capfd=...)`: the script as `__main__` in this process, as
  `python script args...` would run it (argv, cwd and environment patched for the call), for checks that end before
  anything trains (bad input): no interpreter start and no imports of torch, jax, ... per call.
- `assert_one_clear_error(proc, mentions)`: what every bad input must give, from a subprocess or from `run_in_process`.
- `summary_line(proc)`: the line a finished run ends with (its result, steps, minutes, run folder), parsed.
- `smac_jobs(script, base)`: the short SMAX runs of a SMAC script that the end-to-end tests share (conftest's
  `smac_runs` starts them).

Subprocesses get conftest's `script_env`: a persistent JAX compilation cache (SMAX's jitted step takes ~10-20 s to
compile on a small CPU, a cache hit well under a second) and one torch thread (on a shared 2-core machine OpenMP
spinning makes the tiny networks several times slower). TEST_SCRIPT_TIMEOUT and TEST_SCRIPT_JOBS set the timeout of a
run and how many run at once.
"""
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from conftest import ROOT, script_env

SCRIPT_TIMEOUT = int(os.environ.get("TEST_SCRIPT_TIMEOUT", "600"))
SCRIPT_JOBS = int(os.environ.get("TEST_SCRIPT_JOBS", "2"))  # concurrent subprocesses in run_scripts


def run_script(
    script: str, *args, cwd, env: Optional[dict] = None, timeout: int = SCRIPT_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run `ROOT/script` (or an absolute path) with the current interpreter in `cwd`; never raises on a non-zero
    exit code (a timeout gives exit code -9)."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=str(cwd), env=script_env(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        proc = subprocess.CompletedProcess(cmd, -9, out, err + f"\n[test harness] timed out after {timeout} s")
    proc.duration = time.time() - t0  # seconds, for diagnosing slow suites
    return proc


def describe(proc: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """For assertion messages: the command, exit code and the ends of stdout/stderr."""
    cmd = " ".join(map(str, proc.args))
    return f"$ {cmd}\nexit code {proc.returncode}\n--- stdout\n{proc.stdout[-tail:]}\n--- stderr\n{proc.stderr[-tail:]}"


@dataclass
class Job:
    """One script run for `run_scripts`. `after`: names of jobs that must finish first (e.g. a resume after a save);
    `args` may be a callable returning the arguments, evaluated when the job starts (e.g. to find a checkpoint).
    `script` is relative to the repository root, or an absolute path (e.g. a driver written by the test)."""

    name: str
    script: str
    args: Union[Sequence, Callable[[], Sequence]]
    cwd: Path
    env: Optional[dict] = None
    after: Sequence[str] = field(default_factory=tuple)


def run_scripts(jobs: Sequence[Job], max_parallel: int = SCRIPT_JOBS) -> dict:
    """Run several jobs, at most `max_parallel` processes at a time, respecting `after`. Returns {name: CompletedProcess}."""
    names = [j.name for j in jobs]
    assert len(set(names)) == len(names), "job names must be unique"
    slots = threading.Semaphore(max(1, max_parallel))
    futures = {}

    def work(job: Job):
        for dep in job.after:
            futures[dep].result()
        with slots:
            Path(job.cwd).mkdir(parents=True, exist_ok=True)
            try:
                args = job.args() if callable(job.args) else job.args
            except Exception as e:  # e.g. the checkpoint of a failed dependency is missing: fail this job only
                proc = subprocess.CompletedProcess([job.script], -1, "", f"[test harness] {job.name} not started: {e!r}")
                proc.duration = 0.0
                return proc
            return run_script(job.script, *args, cwd=job.cwd, env=job.env)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:  # threads only wait; `slots` bounds the processes
        for job in jobs:  # dependencies must be listed before their dependents
            assert all(d in futures for d in job.after), f"{job.name}: list {job.after} before it"
            futures[job.name] = pool.submit(work, job)
        return {name: fut.result() for name, fut in futures.items()}


def run_dirs(cwd) -> list:
    """TensorBoard run folders (`runs/*/`) under `cwd`."""
    return sorted(p for p in (Path(cwd) / "runs").glob("*") if p.is_dir())


def run_dir(cwd) -> Path:
    """The single run folder under `cwd/runs`."""
    dirs = run_dirs(cwd)
    assert len(dirs) == 1, f"expected one run folder under {cwd}/runs, found {dirs}"
    return dirs[0]


def ran_ok(runs: dict, name: str):
    """(proc, cwd) of the run `name` in a {name: (proc, cwd)} dict, asserting that it exited 0 without a traceback."""
    proc, cwd = runs[name]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, describe(proc)
    return proc, cwd


def run_in_process(script: str, *args, cwd, monkeypatch, capfd, env: Optional[dict] = None, hidden=()):
    """Run `ROOT/script` as `__main__` in this process with `sys.argv = [script, *args]`, in `cwd`, with the variables
    of `env` set (None: unset) and the modules named in `hidden` failing to import, all undone afterwards. Returns a
    CompletedProcess with the exit status `python script` would have (0 when it returns, SystemExit's code otherwise)
    and what it wrote on stdout and stderr. Any other exception is raised: a traceback fails the test where it is.

    Output is captured from the file descriptors (`capfd`): importing jaxmarl rebinds sys.stdout and sys.stderr to
    the process's own, so a capture of the Python streams alone would miss what is printed after it."""
    path = str(ROOT / script)
    with monkeypatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", [path, *map(str, args)])
        for key, value in (env or {}).items():
            patch.delenv(key, raising=False) if value is None else patch.setenv(key, str(value))
        for name in hidden:
            patch.setitem(sys.modules, name, None)  # `import name` raises ImportError
        return exit_of(lambda: runpy.run_path(path, run_name="__main__"), capfd, [script, *args])


def exit_of(call, capfd, args=("call",)) -> subprocess.CompletedProcess:
    """`call()` as a process: the exit status a process ending there would have (0 when it returns, SystemExit's
    code otherwise) and what it printed; any other exception is raised."""
    capfd.readouterr()  # what came before
    try:
        call()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


TYRO_BOX = ("╭", "│", "╰")  # tyro's message about a command line it cannot parse, drawn as a box


def assert_one_clear_error(proc: subprocess.CompletedProcess, mentions: Optional[str] = None):
    """Bad input: exit status 2, no traceback, and stderr ends with its only `error: ...` line; above that line at most
    tyro's box (a few lines), which says what in the command line it could not parse. `mentions` is named in the line
    or the box."""
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and [line for line in lines if line.startswith("error: ")] == [lines[-1]], describe(proc)
    assert len(lines) <= 10 and all(line.startswith(TYRO_BOX) for line in lines[:-1]), describe(proc)
    if mentions is not None:
        assert mentions in proc.stderr, describe(proc)


SUMMARY = re.compile(r"done: (eval|training) (win rate|return) (-?[0-9.]+|nan) at step ([0-9,]+) after [0-9.]+ min; "
                     r"runs/(\S+) \(to look at it: tensorboard --logdir runs\)")


def summary_line(proc: subprocess.CompletedProcess) -> re.Match:
    """The last line of a finished run: `done: {eval|training} {win rate|return} {value} at step {steps} after {minutes}
    min; runs/{run} (to look at it: tensorboard --logdir runs)`, as a match with those groups (minutes left out)."""
    assert proc.returncode == 0, describe(proc)
    match = SUMMARY.fullmatch(proc.stdout.strip().splitlines()[-1])
    assert match, describe(proc)
    return match


# ---------------------------------------------------------------------------------------------- short SMAX runs
SMAC_SCRIPTS = ["fp3o_smac", "mappo_smac", "happo_smac", "a2po_smac"]
SMAC_ITER = 64  # environment steps per iteration of the short runs: 8 environments x 8 steps
SMAC_TINY = ["--num-envs", 8, "--num-steps", 8, "--eval-episodes", 4, "--eval-interval", 1, "--no-progress-bar",
             "--torch-threads", 1, "--save-model", "--checkpoint-interval", 1]
SMAC_RUNS = {  # script: {sharing mode: the script's own flags in that run}; every run 2 iterations on SMAX 2s3z
    "fp3o_smac": {"full": ["--actor", "mlp", "--advantage-split", "random"], "partial": ["--double-clip"],
                  "none": ["--no-condition", "--track"]},
    "mappo_smac": {"full": ["--actor", "mlp"], "partial": [], "none": []},
    "happo_smac": {"full": ["--fixed-order"], "partial": [], "none": ["--actor", "mlp"]},
    "a2po_smac": {"full": ["--order", "fixed", "--num-blocks", 2], "partial": [], "none": []},
}
SMAC_RESUMED = {"fp3o_smac": "partial", "mappo_smac": "none", "happo_smac": "partial", "a2po_smac": "partial"}


def smac_jobs(script: str, base) -> list:
    """The short runs of a SMAC script that the end-to-end tests share (conftest's `smac_runs` starts them): one per
    sharing mode (`full`, `partial`, `none`), and the SMAC_RESUMED one again as `half`, stopped after one iteration,
    whose checkpoint is kept as `base/half.pt` before `resume` continues it to two iterations."""
    from readers import find_checkpoint

    def run(sharing, steps):
        track = {"WANDB_DIR": str(base / sharing)} if "--track" in SMAC_RUNS[script][sharing] else None
        return [*SMAC_TINY, "--total-timesteps", steps, "--sharing", sharing, *SMAC_RUNS[script][sharing]], track

    def resume():
        return ["--resume", keep_copy(find_checkpoint(base / "half"), base / "half.pt"), "--total-timesteps", 2 * SMAC_ITER,
                "--no-progress-bar"]

    args, env = run(SMAC_RESUMED[script], SMAC_ITER)
    jobs = [Job("half", f"{script}.py", args, base / "half", env=env),
            Job("resume", f"{script}.py", resume, base / "half", env=env, after=["half"])]
    for sharing in ("none", "partial", "full"):
        args, env = run(sharing, 2 * SMAC_ITER)
        jobs.append(Job(sharing, f"{script}.py", args, base / sharing, env=env))
    return jobs


def keep_copy(src, dst):
    """Copy a checkpoint aside (a resumed run overwrites its own) and return the copy's path."""
    shutil.copyfile(src, dst)
    return dst
