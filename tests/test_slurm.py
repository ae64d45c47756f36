"""benchmark/sweep.py --slurm through a real Slurm scheduler: the job array it writes is submitted with `sbatch --wait`
and runs a tiny sweep of fp3o_smac.py on SMAX (2 seeds, one 1-CPU array task each); every task ran its run (record,
log, TensorBoard logs), report.py builds its table from the folder, and the finished runs are not run again.

Needs a Slurm cluster that answers (`benchmark/cluster/slurm_local.sh start` sets up a one-node one as root); without
one the test skips, except where REQUIRE_SLURM=1 (.ci/run sets it) or CI=true: there it fails.
"""
import csv
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, script_env
from harness import describe, run_dirs

REQUIRED = os.environ.get("REQUIRE_SLURM") == "1" or os.environ.get("CI") == "true"
SMAC = ["--num-envs", "8", "--num-steps", "8", "--total-timesteps", "64", "--eval-episodes", "4", "--eval-interval", "1"]


def slurm_or_skip() -> int:
    """Skip (or, where Slurm is required, fail) unless sbatch is installed and a controller answers with a node that
    takes jobs; returns the most CPUs of such a node."""
    reason, cpus = None, 0
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        reason = "sbatch not found: no Slurm here (benchmark/cluster/slurm_local.sh sets up a one-node cluster)"
    elif os.environ.get("SLURM_CONF") and not os.path.isfile(os.environ["SLURM_CONF"]):
        reason = f"SLURM_CONF={os.environ['SLURM_CONF']} does not exist"  # sinfo would retry it for a minute
    else:
        try:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %c"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess([], 1, "", "sinfo did not answer within 30 s")
        if proc.returncode != 0 or not proc.stdout.strip():
            reason = f"no Slurm controller answers (start one: benchmark/cluster/slurm_local.sh start): {proc.stderr.strip()}"
        else:
            nodes = [line.split() for line in proc.stdout.splitlines() if len(line.split()) == 3]
            cpus = max((int(c) for _, state, c in nodes if state in ("idle", "mixed", "allocated", "completing")), default=0)
            reason = None if cpus else f"no Slurm node takes jobs: {proc.stdout.strip()}"
    if reason is not None:
        if REQUIRED:
            pytest.fail(reason + " (required here: REQUIRE_SLURM=1 or CI=true)")
        pytest.skip(reason)
    return cpus


def sweep(*args, cwd):
    cmd = [sys.executable, str(ROOT / "benchmark" / "sweep.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=120)


def submit(sbatch_file: Path) -> subprocess.CompletedProcess:
    """sbatch --wait: returns when every array task has ended; its exit status is the highest of theirs."""
    cmd = ["sbatch", "--wait", str(sbatch_file)]
    return subprocess.run(cmd, cwd=sbatch_file.parent, env=script_env(), capture_output=True, text=True, timeout=900)


def interval(record: dict):
    start = datetime.datetime.fromisoformat(record["started"]).timestamp()
    return start, start + record["duration_s"]


def test_sweep_job_array_runs_on_slurm(tmp_path):
    cpus = slurm_or_skip()
    out = tmp_path / "sweep"
    flags = ["--scripts", "fp3o_smac.py", "--tasks", "2s3z", "--sharing", "full", "--seeds", "1", "2", "--out", out,
             f"--args={' '.join(SMAC)}", "--slurm", "--slurm-cpus", "1", "--slurm-mem", "2G", "--slurm-time", "20",
             "--slurm-parallel", "2", "--slurm-name", "tiny"]
    proc = sweep(*flags, cwd=tmp_path)
    assert proc.returncode == 0 and "2 to run" in proc.stdout, describe(proc)
    sbatch_file = out / "slurm" / "tiny.sbatch"
    directives = re.findall(r"^#SBATCH (.*)$", sbatch_file.read_text(), re.M)
    assert {"--array=0-1%2", "--cpus-per-task=1", "--mem=2G", "--time=20"} <= set(directives)
    run_list = json.loads((out / "slurm" / "tiny.json").read_text())["runs"]
    assert [r["id"] for r in run_list] == ["fp3o__2s3z__full__1", "fp3o__2s3z__full__2"]

    proc = submit(sbatch_file)
    task_logs = {i: out / "slurm" / f"tiny_{i}.out" for i in range(2)}
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in task_logs.values() if p.exists())
    assert proc.returncode == 0 and re.match(r"Submitted batch job \d+", proc.stdout), describe(proc) + logs
    for i, run in enumerate(run_list):  # array task i ran run i, in its folder, and said so in its Slurm output
        assert f"{run['id']}: finished (exit 0)" in task_logs[i].read_text(), logs
        rec = json.loads((out / run["id"] / "record.json").read_text())
        assert (rec["status"], rec["state"], rec["attempt"], rec["command"]) == (0, "finished", 1, run["command"])
        log = (out / run["id"] / "log.txt").read_text()
        assert log.startswith("$ ") and "backend smax" in log and "device cpu" in log, log[-2000:]
        (tb,) = run_dirs(out / run["id"])
        assert tb.name.startswith(f"2s3z__fp3o_smac__full__{run['seed']}__") and list(tb.glob("events.out.tfevents.*"))
    first, second = (interval(json.loads((out / r["id"] / "record.json").read_text())) for r in run_list)
    if cpus >= 2:  # consumable CPUs: two 1-CPU tasks run at once on a node of 2 CPUs
        assert first[0] < second[1] and second[0] < first[1], f"one task after the other on a node of {cpus} CPUs"

    report_dir = tmp_path / "report"
    cmd = [sys.executable, str(ROOT / "benchmark" / "report.py"), str(out), "--out-dir", str(report_dir),
           "--bootstrap-reps", "10"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    table = (report_dir / "table.md").read_text()
    assert "on 2 runs (2 finished with exit status 0)" in table, table
    assert re.search(r"^\| 2s3z \| full \| final \(64\) \| \**\d+\.\d ± \d+\.\d", table, re.M), table
    with open(report_dir / "runs.csv", newline="") as f:
        assert sorted((row["run"], row["status"]) for row in csv.DictReader(f)) == [(r["id"], "0") for r in run_list]

    proc = sweep(*flags, cwd=tmp_path)  # everything finished: nothing to submit
    assert proc.returncode == 0 and "2 finished before, 0 to run" in proc.stdout and "nothing to submit" in proc.stdout
    proc = submit(sbatch_file)  # the same job array again: every task finds its run finished
    assert proc.returncode == 0, describe(proc)
    for i, run in enumerate(run_list):
        assert f"{run['id']}: finished before, skipped" in task_logs[i].read_text()
        assert json.loads((out / run["id"] / "record.json").read_text())["attempt"] == 1
