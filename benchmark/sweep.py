"""Run a command template over scripts x tasks x sharing modes x seeds, with a pool of workers or as a Slurm job array.

Every run has its own folder OUT/{algorithm}__{task}__{sharing}__{seed}/ that is the script's working directory, so
its TensorBoard logs land in OUT/<run>/runs/. Beside them: log.txt (stdout and stderr) and record.json (labels,
command, exit status, start, duration). A run whose record.json says exit status 0 for the same command (the
interpreter aside) is finished: starting the sweep again skips it, and runs again failed or interrupted runs and runs
whose command changed (another budget, other flags), their earlier output moved to *.attempt<k>.
`benchmark/report.py OUT` turns the folder into tables, curves and a CSV.

Scripts are PATH or LABEL=PATH EXTRA-FLAGS; tasks are NAME or LABEL=FLAGS:
  --scripts fp3o_smac.py "fp3o-dc=fp3o_smac.py --double-clip"
  --tasks 3s5z "5m_vs_6m=--map 5m_vs_6m --clip-coef 0.05"                      (a bare task becomes `--map TASK`)
  --tasks "HalfCheetah-6x1=--scenario HalfCheetah --agent-conf 6x1"
  --tasks simple_spread_v3 --task-flag=--env                        (flag values starting with -- need the =)

Usage:
  python benchmark/sweep.py --scripts fp3o_smac.py mappo_smac.py happo_smac.py --tasks 2s3z --seeds 1 2 \
      --args="--total-timesteps 500000 --eval-interval 10" --out benchmark/sweeps/2s3z --workers 2
  ... --dry-run     print the commands, run nothing
  ... --slurm       write OUT/slurm/<name>.sbatch (one array task per unfinished run) instead of running
  ... --gpus auto   spread the runs over this machine's GPUs (CUDA_VISIBLE_DEVICES per run; --workers 8 on 4 GPUs: 2 each)
"""
import csv
import datetime
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY_SUFFIXES = ("_smac", "_mamujoco", "_mpe")  # fp3o_smac.py -> algorithm "fp3o"


@dataclass
class Args:
    out: str = os.path.join("benchmark", "sweeps", "sweep")
    """the sweep folder: one sub-folder per run (working directory, log.txt, record.json)"""
    scripts: List[str] = field(default_factory=lambda: ["fp3o_smac.py", "mappo_smac.py", "happo_smac.py"])
    """scripts to run: PATH (relative to the repository root or the current folder) or LABEL=PATH EXTRA-FLAGS"""
    tasks: List[str] = field(default_factory=lambda: ["2s3z"])
    """tasks: NAME (passed as `TASK_FLAG NAME`) or LABEL=FLAGS (passed verbatim, e.g. `3s5z=--map 3s5z --actor mlp`)"""
    task_flag: str = "--map"
    """the flag that selects a bare task (`--map` for the SMAC scripts; `--task-flag=--env` for ippo_mpe.py)"""
    sharing: List[str] = field(default_factory=lambda: ["full", "partial", "none"])
    """parameter sharing modes"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds"""
    args: str = ""
    """flags added to every command (write it as --args="--total-timesteps 500000 --eval-interval 10")"""
    template: str = "{python} {script} {task_args} --sharing {sharing} --seed {seed} {args}"
    """the command; fields: {python} {script} (with its extra flags) {task_args} {task} {algorithm} {sharing} {seed} {args}"""
    python: str = sys.executable
    """the Python interpreter that runs the scripts"""
    workers: int = 2
    """runs at a time"""
    gpus: List[str] = field(default_factory=list)
    """GPUs to spread the runs over: ids (`--gpus 0 1 2 3`) or `auto` (those CUDA_VISIBLE_DEVICES or nvidia-smi lists).
    Each run starts with CUDA_VISIBLE_DEVICES set to the GPU running the fewest runs (round robin when all start at
    once), so --workers 8 on 4 GPUs runs 2 per GPU; recorded in record.json's env. Empty: the runs see what the sweep sees"""
    torch_threads: int = 1
    """`--torch-threads N` (and OMP_NUM_THREADS=N) for every run, unless the command sets --torch-threads; 0: neither"""
    progress_bar: bool = False
    """keep the scripts' progress bars (by default `--no-progress-bar` is added: bars fill the log files)"""
    timeout: float = 0.0
    """hours after which a run is stopped and recorded as failed (0: no limit)"""
    finished_in: List[str] = field(default_factory=list)
    """runs.csv files of earlier reports (benchmark/report.py): a run listed there with exit status 0 and the same
    command (the interpreter and the script's folder aside) is finished, so a study continues on a new machine"""
    force: bool = False
    """run finished runs again too"""
    dry_run: bool = False
    """print the commands (and which runs are finished) and run nothing"""
    track: bool = False
    """add `--track` (wandb): the scripts tag runs (algorithm, sharing, task); WANDB_TAGS / WANDB_RUN_GROUP are set too"""
    wandb_project_name: Optional[str] = None
    """with --track: add `--wandb-project-name NAME` (one project per study makes reports easy to filter)"""
    wandb_entity: Optional[str] = None
    """with --track: add `--wandb-entity NAME`"""
    slurm: bool = False
    """write a Slurm job-array script (one array task per unfinished run) and its run list instead of running"""
    slurm_name: Optional[str] = None
    """job name and file name of the Slurm script (default: the sweep folder's name and a hash of its run list)"""
    slurm_parallel: int = 32
    """most array tasks running at once (the `%P` of `#SBATCH --array=0-K%P`)"""
    slurm_cpus: int = 2
    """`--cpus-per-task` (torch threads plus one for the simulator)"""
    slurm_mem: str = "8G"
    """`--mem` per array task"""
    slurm_time: str = "3-00:00:00"
    """`--time` limit per array task"""
    slurm_partition: Optional[str] = None
    """`--partition`"""
    slurm_gpus: int = 0
    """GPUs per array task (`#SBATCH --gres=gpu:N`; Slurm sets the task's CUDA_VISIBLE_DEVICES, recorded in record.json)"""
    slurm_directives: List[str] = field(default_factory=list)
    """more `#SBATCH` options, e.g. --slurm-directives="--account=abc" "--qos=long" """
    slurm_setup: str = ""
    """shell line run before the task, e.g. "source .venv/bin/activate" or "module load python" """
    run_list: Optional[str] = None
    """(used by the Slurm script) run one run of this run list (JSON written by --slurm) and exit with its status"""
    run_index: Optional[int] = None
    """(used by the Slurm script) which run of --run-list: the array task id"""


@dataclass
class Run:
    id: str
    algorithm: str
    script: str
    task: str
    sharing: str
    seed: int
    command: List[str]
    cwd: str
    env: dict


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def split_spec(spec: str):
    """`NAME` -> (NAME, None); `LABEL=REST` -> (LABEL, REST)."""
    label, sep, rest = spec.partition("=")
    return (label.strip(), rest.strip()) if sep else (spec.strip(), None)


def resolve_script(path: str) -> str:
    for candidate in (path, os.path.join(ROOT, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    fail(f"script '{path}' not found (looked in {os.getcwd()} and {ROOT})")


def algorithm_label(script_path: str) -> str:
    stem = os.path.basename(script_path)[: -len(".py")] if script_path.endswith(".py") else os.path.basename(script_path)
    for suffix in FAMILY_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def has_flag(command: List[str], flag: str) -> bool:
    return any(c == flag or c.startswith(flag + "=") for c in command)


def build_runs(args: Args, out: str) -> List[Run]:
    """The sweep's runs, seeds outermost (a stopped sweep has whole comparisons for its first seeds)."""
    scripts = []
    for spec in args.scripts:
        label, rest = split_spec(spec)
        words = shlex.split(rest if rest is not None else label)
        path = resolve_script(words[0])
        scripts.append((label if rest is not None else algorithm_label(path), path, words[1:]))
    tasks = []
    for spec in args.tasks:
        label, rest = split_spec(spec)
        task_args = shlex.split(rest) if rest is not None else ([args.task_flag, label] if args.task_flag else [label])
        tasks.append((label, task_args))
    for what, labels in (("script", [s[0] for s in scripts]), ("task", [t[0] for t in tasks])):
        if len(set(labels)) != len(labels):
            fail(f"two {what}s have the same label ({labels}): name them with LABEL=...")
        if any("__" in x or "/" in x for x in labels):
            fail(f"{what} labels may not contain '__' or '/': {labels}")
    runs = []
    for seed in args.seeds:
        for task, task_args in tasks:
            for sharing in args.sharing:
                for algorithm, path, script_args in scripts:
                    fields = dict(python=shlex.quote(args.python), script=shlex.join([path, *script_args]),
                                  task_args=shlex.join(task_args), task=shlex.quote(task), algorithm=shlex.quote(algorithm),
                                  sharing=shlex.quote(sharing), seed=seed, args=args.args)  # fmt: skip
                    try:
                        command = shlex.split(args.template.format(**fields))
                    except (KeyError, IndexError, ValueError) as e:
                        fail(f"bad --template {args.template!r}: {e!r}")
                    env = {}
                    if args.torch_threads > 0 and not has_flag(command, "--torch-threads"):
                        command += ["--torch-threads", str(args.torch_threads)]
                        env.update(OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads))
                    if not args.progress_bar and not has_flag(command, "--no-progress-bar"):
                        command.append("--no-progress-bar")
                    if args.track:
                        command += [] if has_flag(command, "--track") else ["--track"]
                        wandb_flags = ("--wandb-project-name", args.wandb_project_name), ("--wandb-entity", args.wandb_entity)
                        for flag, value in wandb_flags:
                            if value and not has_flag(command, flag):
                                command += [flag, value]
                        # read by wandb.init when a script passes no tags / group of its own
                        env.update(WANDB_TAGS=f"{algorithm},{sharing},{task}")
                        env.update(WANDB_RUN_GROUP=f"{task}__{algorithm}__{sharing}")
                    run_id = f"{algorithm}__{task}__{sharing}__{seed}"
                    runs.append(Run(run_id, algorithm, path, task, sharing, seed, command, os.path.join(out, run_id), env))
    if len({r.id for r in runs}) != len(runs):
        fail("two runs have the same folder: repeated seeds or sharing modes?")
    return runs


def visible_gpus() -> List[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries up to the first invalid one, if it is set, else
    nvidia-smi's indices (none without nvidia-smi)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        gpus = []
        for entry in (x.strip() for x in listed.split(",")):
            if not entry or entry.startswith("-"):  # CUDA stops at an invalid entry; "" and "-1" hide every GPU
                break
            gpus.append(entry)
        return gpus
    query = ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]
    try:
        proc = subprocess.run(query, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return proc.stdout.split() if proc.returncode == 0 else []


def resolve_gpus(args: Args) -> List[str]:
    """--gpus as a list of device ids (empty: no assignment)."""
    if not args.gpus:
        return []
    if args.slurm:
        fail("--gpus spreads the local workers over GPUs; on Slurm ask for them with --slurm-gpus N (Slurm assigns them)")
    gpus = visible_gpus() if args.gpus == ["auto"] else [g.strip() for g in args.gpus]
    if not gpus:
        fail("--gpus auto found no GPU (CUDA_VISIBLE_DEVICES hides them all, or nvidia-smi lists none)")
    if "auto" in gpus or any(not g or "," in g for g in gpus) or len(set(gpus)) != len(gpus):
        fail(f"--gpus takes `auto` alone or distinct device ids (e.g. --gpus 0 1), not {args.gpus}")
    return gpus


def read_record(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, "record.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def comparable(command: List[str]) -> List[str]:
    """A command without its interpreter and with the script's base name: the same run from another checkout or venv."""
    return [os.path.basename(command[1]), *command[2:]] if len(command) > 1 else []


def read_finished(paths: List[str]) -> dict:
    """{run id: comparable command} of the runs a report's runs.csv lists with exit status 0."""
    done = {}
    for path in paths:
        try:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("status") == "0":
                        done[row["run"]] = comparable(shlex.split(row["command"]))
        except (OSError, KeyError, ValueError) as e:
            fail(f"cannot read --finished-in {path}: {e}")
    return done


def is_finished(run: Run, reported: Optional[dict] = None) -> bool:
    """Exit status 0 with this very command: the interpreter's path may differ (a cluster node, another venv). Or the
    run is in `reported` (read_finished) with the same command, its script from any folder."""
    if reported and reported.get(run.id) == comparable(run.command):
        return True
    record = read_record(run.cwd)
    return record is not None and record.get("status") == 0 and record.get("command", [])[1:] == run.command[1:]


def write_record(run_dir: str, record: dict):
    tmp = os.path.join(run_dir, "record.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "record.json"))  # never a half-written record


def base_env(out: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # one compilation cache for the whole sweep: SMAX's jitted step compiles once per map and batch size
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several runs share a GPU: jax takes what it needs only
    return env


def execute(run: Run, out: str, timeout_h: float = 0.0, running: Optional[dict] = None) -> dict:
    """Run one run in its folder (moving an earlier attempt's output aside) and write its record; returns the record."""
    os.makedirs(run.cwd, exist_ok=True)
    previous = read_record(run.cwd)
    attempt = (previous or {}).get("attempt", 0) + 1
    for name in ("runs", "log.txt", "wandb"):
        path = os.path.join(run.cwd, name)
        if os.path.exists(path):
            stem, ext = os.path.splitext(name)
            os.replace(path, os.path.join(run.cwd, f"{stem}.attempt{attempt - 1}{ext}"))
    log = os.path.join(run.cwd, "log.txt")
    record = dict(id=run.id, algorithm=run.algorithm, script=run.script, task=run.task, sharing=run.sharing, seed=run.seed,
                  command=run.command, command_line=shlex.join(run.command), cwd=run.cwd, log=log, env=run.env,
                  status=None, state="running", attempt=attempt, host=socket.gethostname(),
                  started=datetime.datetime.now().isoformat(timespec="seconds"), duration_s=None)  # fmt: skip
    write_record(run.cwd, record)
    start = time.time()
    with open(log, "w") as f:
        f.write(f"$ {record['command_line']}\n")
        f.flush()
        try:
            env = {**base_env(out), **run.env}
            proc = subprocess.Popen(run.command, cwd=run.cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        except OSError as e:  # e.g. no such interpreter: a failed run, not a crashed sweep
            f.write(f"could not start: {e}\n")
            now = datetime.datetime.now().isoformat(timespec="seconds")
            record.update(status=127, state="failed", duration_s=0.0, finished=now)
            write_record(run.cwd, record)
            return record
        if running is not None:
            running[run.id] = proc
        try:
            status = proc.wait(timeout=timeout_h * 3600 if timeout_h > 0 else None)
            state = "finished" if status == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status, state = proc.wait(), "timeout"
        finally:
            if running is not None:
                running.pop(run.id, None)
    if status < 0 and state != "timeout":
        state = "interrupted"
    record.update(status=status, state=state, duration_s=round(time.time() - start, 1),
                  finished=datetime.datetime.now().isoformat(timespec="seconds"))  # fmt: skip
    write_record(run.cwd, record)
    return record


def run_pool(runs: List[Run], out: str, workers: int, timeout_h: float, gpus: List[str] = ()) -> List[dict]:
    """Run with `workers` at a time, each run on the GPU of `gpus` running the fewest runs when it starts (ties: the
    first listed); Ctrl-C or SIGTERM stops the running scripts (their records say interrupted)."""
    running, records, lock = {}, [], threading.Lock()
    busy = {gpu: 0 for gpu in gpus}

    def on_gpu(run: Run) -> dict:
        if not gpus:
            return execute(run, out, timeout_h, running)
        with lock:
            gpu = min(gpus, key=lambda g: busy[g])
            busy[gpu] += 1
        try:
            return execute(replace(run, env={**run.env, "CUDA_VISIBLE_DEVICES": gpu}), out, timeout_h, running)
        finally:
            with lock:
                busy[gpu] -= 1

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # the runs have sessions of their own: a stopped sweep stops them itself
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    futures = {pool.submit(on_gpu, run): run for run in runs}
    try:
        for fut in as_completed(futures):
            record = fut.result()
            with lock:
                records.append(record)
                word = "ok" if record["status"] == 0 else f"{record['state']} (exit {record['status']})"
                took = f"{record['duration_s']:.0f} s"
                print(f"[{len(records)}/{len(runs)}] {record['id']}: {word}, {took}, log {record['log']}", flush=True)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(running.values()):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        print("interrupted: running scripts stopped; start the sweep again to continue", file=sys.stderr)
        raise SystemExit(130) from None
    pool.shutdown()
    return records


def slurm_script(args: Args, runs: List[Run], out: str) -> str:
    """Write OUT/slurm/<name>.json (the run list) and <name>.sbatch (one array task per run); returns the sbatch path."""
    digest = hashlib.sha1("\n".join(r.id + shlex.join(r.command) for r in runs).encode()).hexdigest()[:8]
    name = args.slurm_name or f"{os.path.basename(out.rstrip(os.sep))}_{digest}"
    folder = os.path.join(out, "slurm")
    os.makedirs(folder, exist_ok=True)
    run_list = os.path.join(folder, f"{name}.json")
    with open(run_list, "w") as f:
        json.dump(dict(out=out, timeout_h=args.timeout, gpus=args.slurm_gpus, runs=[asdict(r) for r in runs]), f, indent=1)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{len(runs) - 1}%{max(1, args.slurm_parallel)}"]
    lines += [f"#SBATCH --cpus-per-task={args.slurm_cpus}", f"#SBATCH --mem={args.slurm_mem}"]
    lines += [f"#SBATCH --time={args.slurm_time}", f"#SBATCH --output={os.path.join(folder, name)}_%a.out"]
    lines += [f"#SBATCH --partition={args.slurm_partition}"] if args.slurm_partition else []
    lines += [f"#SBATCH --gres=gpu:{args.slurm_gpus}"] if args.slurm_gpus > 0 else []
    lines += [f"#SBATCH {d}" for d in args.slurm_directives]
    lines += ["# Written by benchmark/sweep.py --slurm. Submit: sbatch " + shlex.quote(os.path.join(folder, name + ".sbatch")),
              "# Array task i runs run i of the run list below in its folder (log.txt, record.json, runs/), exactly as the",
              "# local runner does; a finished run (record.json with exit status 0, same command) is skipped. Runs:"]
    lines += [f"#   {i}: {r.id}: {shlex.join(r.command)}" for i, r in enumerate(runs)]
    lines += ["set -euo pipefail", f"cd {shlex.quote(ROOT)}"] + ([args.slurm_setup] if args.slurm_setup else [])
    lines += [f"exec {shlex.quote(args.python)} {shlex.quote(os.path.abspath(__file__))} --run-list {shlex.quote(run_list)} "
              "--run-index \"$SLURM_ARRAY_TASK_ID\""]  # fmt: skip
    path = os.path.join(folder, f"{name}.sbatch")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_from_list(path: str, index: int):
    """One array task: run `index` of the run list, unless it has finished; exit with its status."""
    with open(path) as f:
        spec = json.load(f)
    if not 0 <= index < len(spec["runs"]):
        fail(f"--run-index {index} outside the run list ({len(spec['runs'])} runs)")
    run = Run(**spec["runs"][index])
    if is_finished(run):
        print(f"{run.id}: finished before, skipped")
        sys.exit(0)
    if spec.get("gpus", 0) > 0:  # the devices Slurm gave this task, for the record
        run = replace(run, env={**run.env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")})
    record = execute(run, spec["out"], spec.get("timeout_h", 0.0))
    print(f"{run.id}: {record['state']} (exit {record['status']}) after {record['duration_s']:.0f} s; log {record['log']}")
    sys.exit(0 if record["status"] == 0 else 1)


def main(args: Args):
    if args.run_list is not None:
        if args.run_index is None:
            fail("--run-list needs --run-index")
        return run_from_list(args.run_list, args.run_index)
    out = os.path.abspath(args.out)
    gpus = resolve_gpus(args)
    runs = build_runs(args, out)
    reported = read_finished(args.finished_in)
    todo = [r for r in runs if args.force or not is_finished(r, reported)]
    print(f"sweep {out}: {len(runs)} runs, {len(runs) - len(todo)} finished before, {len(todo)} to run", flush=True)
    if gpus:
        per_gpu = -(-max(1, args.workers) // len(gpus))
        print(f"GPUs {' '.join(gpus)}: each run gets the least busy one (CUDA_VISIBLE_DEVICES), at most {per_gpu} per GPU")
    if args.dry_run:
        for r in runs:
            mark = "run " if r in todo else "done"
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in r.env.items())
            print(f"[{mark}] (cd {shlex.quote(r.cwd)} && {env + ' ' if env else ''}{shlex.join(r.command)})")
        return
    if args.slurm:
        if not todo:
            print("nothing to submit")
            return
        path = slurm_script(args, todo, out)
        print(f"wrote {path} ({len(todo)} array tasks); submit with: sbatch {shlex.quote(path)}")
        return
    records = run_pool(todo, out, args.workers, args.timeout, gpus)
    failed = [r for r in records if r["status"] != 0]
    print(f"done: {len(records) - len(failed)} ok, {len(failed)} failed", flush=True)
    for r in failed:
        print(f"  {r['id']}: {r['log']}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main(tyro.cli(Args))
