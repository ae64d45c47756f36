"""Tests of benchmark/: report.py on synthetic TensorBoard logs, sweep.py with a fake script (skip-finished runs,
records, dry run, Slurm job array), throughput.py with fake scripts (SPS, rollout/update split, memory, ratios)."""
import csv
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, script_env
from harness import assert_one_clear_error, describe
from rliable import metrics


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmark" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report, sweep, throughput = load("report"), load("sweep"), load("throughput")


def run_tool(tool, *args, cwd, env=None, timeout=120):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / tool), *map(str, args)], cwd=cwd, env=script_env(env),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return proc


# ---------------------------------------------------------------------------------------------------------------------
# report.py on synthetic logs
# ---------------------------------------------------------------------------------------------------------------------
EVAL_STEPS = list(range(10_000, 100_001, 10_000))
SECONDS_PER_STEP = 0.01  # the events' wall_time: 10 s after the run's first event, then 0.01 s per step
# final values per (task, algorithm, sharing) and seed; curves rise linearly to them
FINAL = {
    ("2s3z", "fp3o", "full"): [1.0, 0.5, 0.6],  # median 0.6 (mean would be 0.7), std 0.216
    ("2s3z", "mappo", "full"): [0.2, 0.3, 0.4],
    ("2s3z", "fp3o", "none"): [0.9, 0.9, 0.9],
    ("2s3z", "mappo", "none"): [0.9, 0.96, None],  # seed 3 crashed at 40k steps
    ("HalfCheetah-6x1", "fp3o", "full"): [100.0, 200.0, 600.0],  # mean 300 (median would be 200), std 216.0
    ("HalfCheetah-6x1", "mappo", "full"): [400.0, 500.0, 0.0],  # seed 3 has no log at all
}


def write_synthetic_sweep(folder: Path):
    from torch.utils.tensorboard import SummaryWriter

    for (task, alg, sharing), finals in FINAL.items():
        for seed, final in enumerate(finals, start=1):
            run_id = f"{alg}__{task}__{sharing}__{seed}"
            cwd = folder / run_id
            cwd.mkdir(parents=True)
            crashed = final is None
            no_log = task == "HalfCheetah-6x1" and alg == "mappo" and seed == 3
            record = dict(id=run_id, algorithm=alg, task=task, sharing=sharing, seed=seed, status=1 if crashed or no_log else 0,
                          duration_s=12.5, command_line=f"python {alg}_smac.py --seed {seed}")  # fmt: skip
            (cwd / "record.json").write_text(json.dumps(record))
            if no_log:
                continue
            tag = "eval/win_rate" if task == "2s3z" else "eval/episodic_return"
            writer = SummaryWriter(str(cwd / "runs" / f"{task}__{alg}_smac__{sharing}__{seed}__1700000000"))
            start = time.time() + 10.0  # the writer's first event is at its creation, just before
            for step in EVAL_STEPS:
                if crashed and step > 40_000:
                    break
                value = (0.5 if crashed else final) * step / EVAL_STEPS[-1]
                writer.add_scalar(tag, value, step, walltime=start + step * SECONDS_PER_STEP)
                writer.add_scalar("charts/SPS", 1000 + seed, step, walltime=start + step * SECONDS_PER_STEP)
                if task == "2s3z":  # SMAC runs log their gradient steps; FP3O updates twice per iteration
                    writer.add_scalar(report.GRADIENT_STEPS, (2 if alg == "fp3o" else 1) * step / 100, step)
            writer.close()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic_sweep")
    write_synthetic_sweep(folder)
    return folder


def table_row(table: str, task: str, sharing: str, steps: str, after: str = ""):
    """The cells of the algorithms of the first row task/sharing/steps (of the first table after the line `after`)."""
    start = table.index(after)
    for line in table[start:].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == [task, sharing] and cells[2].startswith(steps):
            return cells[3:]
    raise AssertionError(f"no row {task}/{sharing}/{steps} in\n{table}")


@pytest.fixture(scope="module")
def reported(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report.main(report.Args(sweeps=[str(synthetic)], out_dir=str(out), at=[50_000], reach=[0.33], bootstrap_reps=500))
    return out, (out / "table.md").read_text()


def test_report_median_for_win_rates_mean_for_returns_std_and_bold(reported):
    _, table = reported
    # columns are the algorithms, alphabetically: fp3o, mappo
    fp3o, mappo = table_row(table, "2s3z", "full", "final")
    assert fp3o == "**60.0 ± 21.6**", table  # median in %, not the mean (70.0); std over seeds (ddof 0)
    assert mappo == "30.0 ± 8.2", table
    fp3o, mappo = table_row(table, "HalfCheetah-6x1", "full", "final")
    assert fp3o.startswith("300.0 ± 216.0"), table  # mean, not the median (200.0)
    assert "`eval/win_rate`: median" in table and "`eval/episodic_return`: mean" in table


def test_report_marks_missing_and_incomplete_seeds(reported):
    _, table = reported
    fp3o, mappo = table_row(table, "2s3z", "none", "final")
    assert fp3o == "90.0 ± 0.0" and mappo == "**93.0 ± 3.0** (2/3 seeds)", table  # seed 3 stopped at 40k of 100k
    fp3o, mappo = table_row(table, "HalfCheetah-6x1", "full", "final")
    assert fp3o == "300.0 ± 216.0" and mappo == "**450.0 ± 50.0** (2/3 seeds)", table  # seed 3 has no log
    assert "mappo__2s3z__none__3: incomplete" in table
    assert "mappo__HalfCheetah-6x1__full__3: no `eval/episodic_return` logged (exit status 1)" in table


def test_report_values_at_step_budgets(reported):
    _, table = reported
    fp3o, mappo = table_row(table, "2s3z", "full", "50k")
    assert fp3o == "**30.0 ± 10.8**" and mappo == "15.0 ± 4.1", table  # half of the final values
    fp3o, mappo = table_row(table, "2s3z", "none", "50k")  # the crashed seed (40k) did not reach 50k either
    assert fp3o == "45.0 ± 0.0" and mappo == "**46.5 ± 1.5** (2/3 seeds)", table


def reach_row(table: str, tag: str, task: str, sharing: str):
    """The algorithms' cells of the row task/sharing of the --reach table of `tag`."""
    section = table[table.index(f"Steps to the first `{tag}` >= 0.33") :]
    for line in section.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            break
        if cells[:2] == [task, sharing]:
            return cells[2:]
    raise AssertionError(f"no --reach row {task}/{sharing} in\n{section}")


def test_report_steps_to_reach_a_threshold(reported):
    _, table = reported
    # values rise linearly to the seed's final value at 100k, logged every 10k: final f reaches 0.33 at 33k / f
    assert reach_row(table, "eval/win_rate", "2s3z", "full") == ["60k (3/3: 40k, 60k, 70k)", "> 100k (1/3: 90k, never, never)"]
    # mappo's seed 3 stopped at 40k without getting there: left out, and marked
    assert reach_row(table, "eval/win_rate", "2s3z", "none") == ["40k (3/3: 40k, 40k, 40k)", "40k (2/2: 40k, 40k) (2/3 seeds)"]
    cheetah = reach_row(table, "eval/episodic_return", "HalfCheetah-6x1", "full")
    assert cheetah == ["10k (3/3: 10k, 10k, 10k)", "10k (2/2: 10k, 10k) (2/3 seeds)"]
    series = np.array([[1.0, 0.1], [2.0, 0.5], [3.0, 0.2], [4.0, 0.9]])
    assert report.first_reach(series, 0.5) == 2.0 and report.first_reach(series, 0.95) == float("inf")


IQM = "`eval/win_rate`: interquartile mean"
IMPROVEMENT = "`eval/win_rate`: probability of improvement"


def interval(cell: str):
    """(point, low, high) of a cell `point [low, high]`."""
    point, low, high = map(float, re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell).groups())
    return point, low, high


def test_report_iqm_intervals_contain_the_point_estimate(reported):
    _, table = reported
    fp3o, mappo = table_row(table, "2s3z", "full", "final", after=IQM)
    assert interval(fp3o)[0] == 70.0 and interval(mappo)[0] == 30.0, table  # 3 seeds: the IQM trims none (the mean)
    cells = [table_row(table, "2s3z", "full", steps, after=IQM) for steps in ("50k", "final")]
    cells += [table_row(table, "HalfCheetah-6x1", "full", steps, after="`eval/episodic_return`: interquartile mean")[:1]
              for steps in ("50k", "final")]  # fmt: skip
    for cell in sum(cells, []):
        point, low, high = interval(cell)
        assert low <= point <= high and low < high, table
    fp3o, _ = table_row(table, "2s3z", "none", "final", after=IQM)
    assert fp3o == "90.0 [90.0, 90.0]", table  # equal seeds: nothing to resample
    assert "95% stratified-bootstrap CI, rliable, 500 samples, seed 0" in table


def test_report_iqm_trims_a_quarter_and_bootstrap_is_seeded():
    args = report.Args(sweeps=[], bootstrap_reps=500)
    scores = [[0.0, 1.0, 2.0, 3.0, 10.0]]
    point, low, high = report.interval_estimate(scores, metrics.aggregate_iqm, args)
    assert point == 2.0 and 0.0 <= low < point < high <= 10.0  # the mean of 1, 2, 3: one seed cut at each end
    assert report.interval_estimate(scores, metrics.aggregate_iqm, args) == (point, low, high)
    args.bootstrap_seed = 1
    assert report.interval_estimate(scores, metrics.aggregate_iqm, args) != (point, low, high)
    np.random.seed(5)
    expected = np.random.random()
    np.random.seed(5)
    report.interval_estimate(scores, metrics.aggregate_iqm, args)
    assert np.random.random() == expected  # numpy's global generator is left as it was


def test_report_probability_of_improvement(reported):
    _, table = reported
    # 2s3z, sharing full: every FP3O seed beats every MAPPO seed, at every budget
    assert table_row(table, "2s3z", "full", "final", after=IMPROVEMENT) == ["1.00 [1.00, 1.00]"], table
    assert table_row(table, "2s3z", "full", "50k", after=IMPROVEMENT) == ["1.00 [1.00, 1.00]"], table
    assert "| task | sharing | steps | P(fp3o > mappo) |" in table
    args = report.Args(sweeps=[], bootstrap_reps=200)
    tie = report.interval_estimate([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], metrics.probability_of_improvement, args)
    assert tie[0] == 0.5 and tie[1] < 0.5 < tie[2]
    worse = report.interval_estimate([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], metrics.probability_of_improvement, args)
    assert worse == (0.0, 0.0, 0.0)


def test_report_marks_cells_with_fewer_than_three_seeds(reported):
    _, table = reported
    assert table_row(table, "2s3z", "none", "final", after=IQM) == ["90.0 [90.0, 90.0]", "n=2 < 3"], table
    assert table_row(table, "2s3z", "none", "final", after=IMPROVEMENT) == ["n=2 < 3"], table
    after = "`eval/episodic_return`: interquartile mean"
    assert table_row(table, "HalfCheetah-6x1", "full", "final", after=after)[1] == "n=2 < 3", table
    after = "`eval/episodic_return`: probability of improvement"
    assert table_row(table, "HalfCheetah-6x1", "full", "final", after=after) == ["n=2 < 3"], table


def test_report_csv_and_plots(reported):
    out, _ = reported
    with open(out / "scalars.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "algorithm", "sharing", "task", "seed", "step", "tag", "value", "seconds"]
    # 2s3z: 11 complete runs and a crashed one (4 steps) with three tags; HalfCheetah: 5 runs with logs, two tags
    assert len(rows) == 3 * 11 * len(EVAL_STEPS) + 3 * 4 + 2 * 5 * len(EVAL_STEPS)
    row = next(r for r in rows if r["run"] == "fp3o__2s3z__full__2" and r["tag"] == "eval/win_rate" and r["step"] == "100000")
    assert (row["algorithm"], row["sharing"], row["task"], row["seed"]) == ("fp3o", "full", "2s3z", "2")
    assert float(row["value"]) == pytest.approx(0.5)
    with open(out / "runs.csv") as f:
        runs = {r["run"]: r for r in csv.DictReader(f)}
    assert runs["mappo__2s3z__none__3"]["status"] == "1" and runs["mappo__2s3z__none__3"]["last_step"] == "40000"
    pngs = sorted(p.name for p in out.glob("*.png"))
    # HalfCheetah's runs log no gradient steps
    assert pngs == ["curves_2s3z__eval_win_rate.png", "curves_2s3z__eval_win_rate__gradient_steps.png",
                    "curves_2s3z__eval_win_rate__seconds.png", "curves_HalfCheetah-6x1__eval_episodic_return.png",
                    "curves_HalfCheetah-6x1__eval_episodic_return__seconds.png"]  # fmt: skip
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_report_curve_mean_and_spread_without_extrapolation():
    short = report.RunLog("a", "x", "t", "full", 1, scalars={"v": np.array([[0, 0.0], [10, 1.0]])})
    long = report.RunLog("b", "x", "t", "full", 2, scalars={"v": np.array([[0, 1.0], [20, 3.0]])})
    steps, mean, std, lo, hi, n = report.curve([short, long], "v")
    assert n == 2 and list(steps) == [0, 10, 20]
    np.testing.assert_allclose(mean, [0.5, 1.5, 3.0])  # at 20 only the long run counts
    np.testing.assert_allclose(std, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(hi - lo, [1.0, 1.0, 0.0])


def test_report_curves_against_seconds_and_gradient_steps(synthetic):
    run = next(r for r in report.find_runs([str(synthetic)]) if r.run == "fp3o__2s3z__full__1")
    seconds = run.scalars["eval/win_rate"][:, 2]  # seconds since the run's first event (the writer's creation)
    np.testing.assert_allclose(np.diff(seconds), np.diff(EVAL_STEPS) * SECONDS_PER_STEP, rtol=1e-6)
    first = 10.0 + EVAL_STEPS[0] * SECONDS_PER_STEP  # plus the moment between the writer's creation and `start`
    assert first <= seconds[0] < first + 10.0
    # two runs: values 0, 1, 2 at steps 0, 10, 20; 4 and 8 gradient steps by steps 10 and 20 (none before), or 2 and 4
    runs = [report.RunLog(str(k), "x", "t", "full", k, scalars={
        "v": np.array([[0, 0.0, 0.0], [10, 1.0, 30.0 * k], [20, 2.0, 60.0 * k]]),
        report.GRADIENT_STEPS: np.array([[10, 4.0 / k, 0.0], [20, 8.0 / k, 0.0]])}) for k in (1, 2)]  # fmt: skip
    x, mean, *_, n = report.curve(runs[:1], "v", "gradient_steps")
    assert n == 1 and list(x) == [0, 4, 8] and list(mean) == [0, 1, 2]
    x, mean, *_ = report.curve(runs, "v", "gradient_steps")
    assert list(x) == [0, 2, 4, 8] and list(mean) == [0, 0.75, 1.5, 2.0]  # run 2 at 2, 4; run 1 at 4, 8
    x, mean, *_ = report.curve(runs, "v", "seconds")
    assert list(x) == [0, 30, 60, 120] and list(mean) == [0, 0.75, 1.5, 2.0]
    runs[1].scalars.pop(report.GRADIENT_STEPS)
    assert report.curve(runs, "v", "gradient_steps")[-1] == 1  # a run without gradient steps is left out
    assert report.curve(runs[1:], "v", "gradient_steps") is None


def test_report_cli_on_plain_runs_folder(tmp_path):
    """No sweep records: labels come from the TensorBoard folder names (task__exp_name__sharing__seed__time)."""
    from torch.utils.tensorboard import SummaryWriter

    for seed, value in ((1, 0.25), (2, 0.75)):
        with SummaryWriter(str(tmp_path / "runs" / f"3m__fp3o_smac__partial__{seed}__17000000{seed}")) as w:
            w.add_scalar("eval/win_rate", value, 3200)
    proc = run_tool("report.py", tmp_path, "--out-dir", tmp_path / "out", "--stat", "mean", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table_row(table, "3m", "partial", "final") == ["50.0 ± 25.0"], table
    assert table_row(table, "3m", "partial", "final", after="interquartile mean") == ["n=2 < 3"], table
    assert "P(fp3o >" not in table  # no baseline to compare with
    assert proc.stdout.count("no curves against gradient steps") == 1, describe(proc)  # no run logs them
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["curves_3m__eval_win_rate.png", "curves_3m__eval_win_rate__seconds.png"]
    assert_one_clear_error(run_tool("report.py", tmp_path / "nothing", cwd=tmp_path), "no runs found")
    assert_one_clear_error(run_tool("report.py", tmp_path, "--bootstrap-reps", "0", cwd=tmp_path), "error: --bootstrap-reps")


# ---------------------------------------------------------------------------------------------------------------------
# sweep.py with a fake script
# ---------------------------------------------------------------------------------------------------------------------
FAKE_TRAINER = '''
"""Fake training script: records how it was called, writes one TensorBoard scalar, fails for seeds in fail_seeds.txt;
with sleep.txt, runs that many seconds and appends its GPU, start and end to spans.jsonl."""
import argparse, json, os, sys, time
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

p = argparse.ArgumentParser()
for flag in ("--map", "--sharing", "--seed", "--torch-threads", "--total-timesteps", "--wandb-project-name"):
    p.add_argument(flag)
p.add_argument("--no-progress-bar", action="store_true")
p.add_argument("--track", action="store_true")
a = p.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(), omp=os.environ.get("OMP_NUM_THREADS"),
                            tags=os.environ.get("WANDB_TAGS"), group=os.environ.get("WANDB_RUN_GROUP"),
                            gpu=os.environ.get("CUDA_VISIBLE_DEVICES"))) + "\\n")
w = EventFileWriter(f"runs/{a.map}__fake_smac__{a.sharing}__{a.seed}__{int(time.time())}")
value = summary_pb2.Summary.Value(tag="eval/win_rate", simple_value=int(a.seed) / 10)
w.add_event(event_pb2.Event(wall_time=time.time(), step=1000, summary=summary_pb2.Summary(value=[value])))
w.close()
print(f"trained seed {a.seed}")
if os.path.exists(os.path.join(here, "sleep.txt")):
    start = time.time()
    time.sleep(float(open(os.path.join(here, "sleep.txt")).read()))
    with open(os.path.join(here, "spans.jsonl"), "a") as f:
        f.write(json.dumps(dict(gpu=os.environ.get("CUDA_VISIBLE_DEVICES"), start=start, end=time.time())) + "\\n")
failing = os.path.join(here, "fail_seeds.txt")
fail = open(failing).read().split() if os.path.exists(failing) else []
sys.exit(1 if a.seed in fail else 0)
'''


@pytest.fixture()
def fake(tmp_path):
    script = tmp_path / "scripts" / "fake_smac.py"
    script.parent.mkdir()
    script.write_text(FAKE_TRAINER)
    return script


def calls(fake):
    path = fake.parent / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def records(out):
    return {p.parent.name: json.loads(p.read_text()) for p in Path(out).glob("*/record.json")}


def test_sweep_runs_records_and_skips_finished_runs(fake, tmp_path):
    out = tmp_path / "sweep"
    common = ["--scripts", fake, "--tasks", "2s3z", "--sharing", "full", "none", "--seeds", "1", "2", "--out", out,
              "--args=--total-timesteps 1000"]  # fmt: skip
    (fake.parent / "fail_seeds.txt").write_text("2")
    proc = run_tool("sweep.py", *common, "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 1 and "2 ok, 2 failed" in proc.stdout, describe(proc)
    recs = records(out)
    assert sorted(recs) == ["fake__2s3z__full__1", "fake__2s3z__full__2", "fake__2s3z__none__1", "fake__2s3z__none__2"]
    for run_id, rec in recs.items():
        alg, task, sharing, seed = run_id.split("__")
        assert (rec["algorithm"], rec["task"], rec["sharing"], rec["seed"]) == (alg, task, sharing, int(seed))
        assert rec["status"] == (1 if seed == "2" else 0) and rec["state"] == ("failed" if seed == "2" else "finished")
        assert rec["duration_s"] >= 0 and rec["attempt"] == 1
        assert rec["command"][:2] == [sys.executable, str(fake)]
        assert rec["command"][2:] == ["--map", "2s3z", "--sharing", sharing, "--seed", seed, "--total-timesteps", "1000",
                                      "--torch-threads", "1", "--no-progress-bar"]  # fmt: skip
        assert rec["cwd"] == str(out / run_id)
        log = Path(rec["log"]).read_text()
        assert log.startswith("$ ") and f"trained seed {seed}" in log
        assert len(list((out / run_id / "runs").glob("*/events.out.tfevents.*"))) == 1  # the run's logs in its folder
    first = calls(fake)
    assert len(first) == 4 and {c["omp"] for c in first} == {"1"} and {c["cwd"] for c in first} == {str(out / r) for r in recs}

    (fake.parent / "fail_seeds.txt").write_text("")
    proc = run_tool("sweep.py", *common, cwd=tmp_path)
    assert proc.returncode == 0 and "2 finished before, 2 to run" in proc.stdout, describe(proc)
    again = calls(fake)[4:]
    assert sorted(c["argv"][5] for c in again) == ["2", "2"]  # only the failed runs ran again
    recs = records(out)
    assert recs["fake__2s3z__full__2"]["status"] == 0 and recs["fake__2s3z__full__2"]["attempt"] == 2
    assert recs["fake__2s3z__full__1"]["attempt"] == 1
    rerun = out / "fake__2s3z__full__2"
    assert (rerun / "runs.attempt1").is_dir() and (rerun / "log.attempt1.txt").is_file()  # the failed attempt, kept aside
    assert len(list((rerun / "runs").glob("*"))) == 1  # the report reads one TensorBoard folder per run

    proc = run_tool("sweep.py", *common, cwd=tmp_path)
    assert proc.returncode == 0 and "4 finished before, 0 to run" in proc.stdout, describe(proc)
    assert len(calls(fake)) == 6
    proc = run_tool("sweep.py", *common, "--seeds", "1", "--sharing", "full", "--force", cwd=tmp_path)
    assert proc.returncode == 0 and len(calls(fake)) == 7, describe(proc)
    # another budget is another run: a finished run whose command changed runs again, its output kept aside
    budget = "--args=--total-timesteps 2000"
    proc = run_tool("sweep.py", *common[:-1], budget, "--seeds", "1", "--sharing", "full", cwd=tmp_path)
    assert proc.returncode == 0 and "0 finished before, 1 to run" in proc.stdout, describe(proc)
    assert calls(fake)[-1]["argv"][6:8] == ["--total-timesteps", "2000"]
    rec = records(out)["fake__2s3z__full__1"]
    assert "--total-timesteps 2000" in rec["command_line"] and rec["attempt"] == 3
    assert (out / "fake__2s3z__full__1" / "runs.attempt2").is_dir()
    proc = run_tool("sweep.py", *common[:-1], budget, "--seeds", "1", "--sharing", "full", cwd=tmp_path)
    assert proc.returncode == 0 and "1 finished before, 0 to run" in proc.stdout, describe(proc)
    proc = run_tool("sweep.py", *common, "--seeds", "1", "--sharing", "full", cwd=tmp_path)  # back to 1000: runs again
    assert proc.returncode == 0 and "0 finished before, 1 to run" in proc.stdout and len(calls(fake)) == 9, describe(proc)

    out_report = tmp_path / "report"
    report.main(report.Args(sweeps=[str(out)], out_dir=str(out_report)))
    table = (out_report / "table.md").read_text()
    assert table_row(table, "2s3z", "full", "final") == ["15.0 ± 5.0"], table  # seeds 1, 2: win rates 0.1, 0.2


def test_sweep_dry_run_track_and_template(fake, tmp_path):
    out = tmp_path / "sweep"
    task = "5m_vs_6m=--map 5m_vs_6m --clip-coef 0.05"
    proc = run_tool("sweep.py", "--scripts", f"fp3o-x={fake} --double-clip", "--tasks", task, "--sharing", "partial",
                    "--seeds", "7", "--out", out, "--dry-run", "--track", "--wandb-project-name", "study",
                    "--args=--torch-threads 4", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    assert not calls(fake) and not out.exists(), "a dry run runs nothing"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[run ]"))
    assert f"{out}/fp3o-x__5m_vs_6m__partial__7 &&" in line
    assert "WANDB_TAGS=fp3o-x,partial,5m_vs_6m WANDB_RUN_GROUP=5m_vs_6m__fp3o-x__partial" in line
    command = line.split("WANDB_RUN_GROUP=5m_vs_6m__fp3o-x__partial ", 1)[1].rstrip(")")
    assert command == (f"{sys.executable} {fake} --double-clip --map 5m_vs_6m --clip-coef 0.05 --sharing partial --seed 7 "
                       "--torch-threads 4 --no-progress-bar --track --wandb-project-name study")  # fmt: skip
    assert command.count("--torch-threads") == 1  # the template's own thread count wins

    proc = run_tool("sweep.py", "--scripts", fake, "--tasks", "2s3z", "--sharing", "full", "--seeds", "1", "1", "--out", out,
                    "--dry-run", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    proc = run_tool("sweep.py", "--scripts", "no_such_script.py", "--out", out, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "no_such_script.py" in proc.stderr, describe(proc)


def test_sweep_slurm_job_array(fake, tmp_path):
    out = tmp_path / "sweep"
    common = ["--scripts", fake, "--tasks", "2s3z", "--sharing", "full", "none", "--seeds", "1", "2", "--out", out]
    proc = run_tool("sweep.py", *common, "--sharing", "full", "--seeds", "1", cwd=tmp_path)  # one run finishes locally
    assert proc.returncode == 0, describe(proc)
    proc = run_tool("sweep.py", *common, "--slurm", "--slurm-parallel", "2", "--slurm-name", "study",
                    "--slurm-partition", "cpu", "--slurm-directives=--account=abc", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0 and "sbatch" in proc.stdout, describe(proc)
    assert len(calls(fake)) == 1, "--slurm runs nothing"
    sbatch = (out / "slurm" / "study.sbatch").read_text()
    run_list = json.loads((out / "slurm" / "study.json").read_text())
    assert sbatch.startswith("#!/bin/bash\n")
    directives = re.findall(r"^#SBATCH (.*)$", sbatch, re.M)
    assert "--array=0-2%2" in directives  # three unfinished runs, at most two at a time
    assert {"--job-name=study", "--cpus-per-task=2", "--partition=cpu", "--account=abc"} <= set(directives)
    assert f"--output={out}/slurm/study_%a.out" in directives
    assert [r["id"] for r in run_list["runs"]] == ["fake__2s3z__none__1", "fake__2s3z__full__2", "fake__2s3z__none__2"]
    dry = run_tool("sweep.py", *common, "--dry-run", cwd=tmp_path).stdout
    for i, run in enumerate(run_list["runs"]):  # every array task runs the command the local runner would
        command = " ".join(run["command"])
        assert f"#   {i}: {run['id']}: {command}" in sbatch
        assert any(f"/{run['id']} && " in line and line.endswith(f" {command})") for line in dry.splitlines()), dry
    assert re.search(r'--run-list \S+study\.json --run-index "\$SLURM_ARRAY_TASK_ID"$', sbatch.strip())
    # an #SBATCH script is a bash script: run array task 1 here
    proc = subprocess.run(["bash", str(out / "slurm" / "study.sbatch")], env=script_env({"SLURM_ARRAY_TASK_ID": "1"}),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    assert calls(fake)[-1]["argv"] == run_list["runs"][1]["command"][2:]
    assert calls(fake)[-1]["cwd"] == str(out / "fake__2s3z__full__2")
    assert records(out)["fake__2s3z__full__2"]["status"] == 0
    proc = subprocess.run(["bash", str(out / "slurm" / "study.sbatch")], env=script_env({"SLURM_ARRAY_TASK_ID": "1"}),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "skipped" in proc.stdout and len(calls(fake)) == 2, describe(proc)


def most_at_once(spans) -> int:
    """The most of these (start, end) intervals that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    level, most = 0, 0
    for _, step in events:
        level += step
        most = max(most, level)
    return most


def test_sweep_spreads_runs_over_gpus(fake, tmp_path):
    """--gpus: every run gets one GPU in CUDA_VISIBLE_DEVICES (recorded), the least busy one, so 4 workers on 2 GPUs run
    2 per GPU and never 3; `auto` reads the GPUs the sweep sees; on Slurm --slurm-gpus asks for them per array task."""
    out = tmp_path / "sweep"
    common = ["--scripts", fake, "--tasks", "2s3z", "--sharing", "full", "--out", out]
    (fake.parent / "sleep.txt").write_text("3")
    proc = run_tool("sweep.py", *common, "--seeds", *range(1, 7), "--workers", 4, "--gpus", "0", "1", cwd=tmp_path)
    assert proc.returncode == 0 and "GPUs 0 1: " in proc.stdout and "at most 2 per GPU" in proc.stdout, describe(proc)
    recs = records(out)
    assert len(recs) == 6 and {r["env"]["CUDA_VISIBLE_DEVICES"] for r in recs.values()} == {"0", "1"}
    for call in calls(fake):  # each run saw the GPU its record names
        assert call["gpu"] == recs[Path(call["cwd"]).name]["env"]["CUDA_VISIBLE_DEVICES"]
    spans = [json.loads(line) for line in (fake.parent / "spans.jsonl").read_text().splitlines()]
    per_gpu = {g: [(x["start"], x["end"]) for x in spans if x["gpu"] == g] for g in ("0", "1")}
    assert {g: most_at_once(s) for g, s in per_gpu.items()} == {"0": 2, "1": 2}, per_gpu  # several per GPU, never 3

    (fake.parent / "sleep.txt").unlink()
    auto = run_tool("sweep.py", *common, "--seeds", 7, 8, "--gpus", "auto", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "5,3"})
    assert auto.returncode == 0 and "GPUs 5 3: " in auto.stdout, describe(auto)
    assert {recs["env"]["CUDA_VISIBLE_DEVICES"] for recs in records(out).values() if recs["seed"] > 6} == {"5", "3"}
    without = run_tool("sweep.py", *common, "--seeds", 10, 11, cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "7"})
    assert without.returncode == 0 and "GPUs" not in without.stdout, describe(without)
    assert [c["gpu"] for c in calls(fake)[-2:]] == ["7", "7"]  # without --gpus the runs see what the sweep sees
    assert all("CUDA_VISIBLE_DEVICES" not in r["env"] for r in records(out).values() if r["seed"] >= 10)
    bad_flags = [(["--gpus", "auto"], "found no GPU"), (["--gpus", "0", "0"], "distinct device ids"),
                 (["--gpus", "0", "--slurm"], "--slurm-gpus")]
    for bad, says in bad_flags:
        proc = run_tool("sweep.py", *common, "--seeds", 9, *bad, cwd=tmp_path)  # the suite hides every GPU
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and says in proc.stderr, describe(proc)
        assert "Traceback" not in proc.stderr

    proc = run_tool("sweep.py", *common, "--seeds", 9, "--slurm", "--slurm-gpus", 1, "--slurm-name", "gpu", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "--gres=gpu:1" in re.findall(r"^#SBATCH (.*)$", (out / "slurm" / "gpu.sbatch").read_text(), re.M)
    env = script_env({"SLURM_ARRAY_TASK_ID": "0", "CUDA_VISIBLE_DEVICES": "2"})  # as Slurm starts a task given GPU 2
    proc = subprocess.run(["bash", str(out / "slurm" / "gpu.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and calls(fake)[-1]["gpu"] == "2", describe(proc)
    assert records(out)["fake__2s3z__full__9"]["env"]["CUDA_VISIBLE_DEVICES"] == "2"


# ---------------------------------------------------------------------------------------------------------------------
# throughput.py with fake scripts
# ---------------------------------------------------------------------------------------------------------------------
FAKE_SMAC = '''
"""Fake SMAC script for benchmark/throughput.py: a SMAX-like make_envs and a training loop with known timings."""
import argparse, os, sys, time
from dataclasses import dataclass

UPDATE = {UPDATE}  # seconds per iteration that it logs as update time (x2 without sharing)
MEGABYTES = {MEGABYTES}  # memory it holds while "training" (x2 without sharing)


@dataclass
class Args:
    num_envs: int = 4
    num_steps: int = 5


class FakeEnvs:
    def __init__(self, num_envs):
        import torch

        self.num_envs = num_envs
        self.avail = torch.zeros(num_envs, 3, 6, dtype=torch.bool)
        self.avail[..., 1::2] = True  # only odd actions are available

    def reset(self, seed):
        return dict(avail=self.avail)

    def step(self, actions):
        assert actions.shape == (self.num_envs, 3), actions.shape
        assert self.avail.gather(-1, actions[..., None]).all(), "an unavailable action"
        time.sleep(0.002)
        return dict(avail=self.avail)


def make_envs(backend, map_name, num_envs, seed, device):
    assert backend == "smax" and map_name == "2s3z", (backend, map_name)
    return FakeEnvs(num_envs)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for flag in ("--map", "--sharing", "--seed", "--num-envs", "--num-steps", "--total-timesteps", "--eval-interval"):
        p.add_argument(flag)
    p.add_argument("--torch-threads")
    p.add_argument("--no-progress-bar", action="store_true")
    a = p.parse_args()
    factor = 2 if a.sharing == "none" else 1
    ballast = b"x" * (MEGABYTES * factor << 20)
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    w = EventFileWriter(f"runs/{{a.map}}__fake__{{a.sharing}}__{{a.seed}}__0")
    batch = int(a.num_envs) * int(a.num_steps)
    for i in range(1, int(a.total_timesteps) // batch + 1):
        warm = i <= 2  # compilation: left out by --skip 2
        times = (("charts/rollout_time", 5.0 if warm else 0.1), ("charts/update_time", 5.0 if warm else UPDATE * factor))
        for tag, value in times:
            v = summary_pb2.Summary.Value(tag=tag, simple_value=value)
            w.add_event(event_pb2.Event(wall_time=time.time(), step=i * batch, summary=summary_pb2.Summary(value=[v])))
    w.close()
'''


def test_throughput_table_with_fake_scripts(tmp_path):
    for name, update, megabytes in (("fp3o_smac.py", 0.3, 150), ("mappo_smac.py", 0.1, 100)):
        (tmp_path / name).write_text(FAKE_SMAC.format(UPDATE=update, MEGABYTES=megabytes))
    out = tmp_path / "throughput.md"
    args = throughput.Args(scripts=[str(tmp_path / "fp3o_smac.py"), str(tmp_path / "mappo_smac.py"), "no_such_mpe.py"],
                           sharing=["full", "none"], iterations=5, skip=2, raw_steps=25, out=str(out))  # fmt: skip
    throughput.main(args)
    table = out.read_text()
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].endswith("_smac.py"):
            rows[cells[0], cells[2]] = cells
    assert set(rows) == {(s, m) for s in ("fp3o_smac.py", "mappo_smac.py") for m in ("full", "none")}, table
    batch = 4 * 5  # the scripts' own num_envs x num_steps
    expect = {("fp3o_smac.py", "full"): 0.3, ("fp3o_smac.py", "none"): 0.6,  # update seconds per iteration
              ("mappo_smac.py", "full"): 0.1, ("mappo_smac.py", "none"): 0.2}  # fmt: skip
    for key, update in expect.items():
        _, task, _, envs, sps, raw, ratio, rollout, upd, share, peak, via = rows[key]
        assert task == "`--map 2s3z`" and envs == "4 x 5"
        assert float(sps) == pytest.approx(batch / (0.1 + update), abs=0.6), table  # warm-up iterations left out
        assert (float(rollout), float(upd)) == pytest.approx((0.1, update)), table
        assert share == f"{update / (0.1 + update):.0%}"
        assert 0 < float(raw) <= 4 / 0.002 and via == "script's SMAX wrapper", table  # 4 envs per 2 ms sleep at most
        megabytes = (150 if key[0] == "fp3o_smac.py" else 100) * (2 if key[1] == "none" else 1)
        assert megabytes < float(peak) < megabytes + 600, table
    peak = {k: float(v[10]) for k, v in rows.items()}
    assert peak["fp3o_smac.py", "none"] - peak["fp3o_smac.py", "full"] == pytest.approx(150, abs=40)
    assert "| smac | full | FP3O / MAPPO | 2.00 |" in table  # (0.1 + 0.3) / (0.1 + 0.1)
    assert "| smac | none | FP3O / MAPPO | 2.33 |" in table  # 0.7 / 0.3
    assert "| smac | fp3o | none / full | 1.75 |" in table and "| smac | mappo | none / full | 1.50 |" in table
    assert "`no_such_mpe.py`: not in this checkout yet, not measured" in table


@pytest.mark.parametrize("script, raw, via", [("fp3o_mamujoco", "raw_mamujoco", "script's MaMuJoCoEnvs"),
                                              ("ippo_mpe", "raw_mpe", "script's MpeEnvs"),
                                              ("mappo_smac", "raw_smac", "script's SMAX wrapper")])  # fmt: skip
def test_raw_stepping_goes_through_each_scripts_own_wrapper(script, raw, via):
    sps, how = getattr(throughput, raw)(importlib.import_module(script), "", 2, 5)
    assert sps > 0 and how == via


def test_throughput_reports_a_failing_run(tmp_path):
    broken = tmp_path / "broken_smac.py"
    main = 'if __name__ == "__main__":'
    broken.write_text(FAKE_SMAC.format(UPDATE=0.1, MEGABYTES=1).replace(main, main + '\n    sys.exit("error: boom")'))
    out = tmp_path / "t.md"
    throughput.main(throughput.Args(scripts=[str(broken)], sharing=["full"], iterations=3, skip=1, raw_steps=5, out=str(out)))
    table = out.read_text()
    assert "| broken_smac.py | `--map 2s3z` | full | 4 x 5 | failed |" in table
    assert "`broken_smac.py` sharing full: run failed (exit 1): error: boom" in table


# ---------------------------------------------------------------------------------------------------------------------
# recipes (dry runs: the commands only)
# ---------------------------------------------------------------------------------------------------------------------
def recipe_commands(recipe, *flags, env=None):
    proc = subprocess.run(["bash", str(ROOT / "benchmark" / "recipes" / recipe), "--dry-run", *flags], env=script_env(env),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    return [line for line in proc.stdout.splitlines() if line.startswith(("[run ]", "[done]"))]


def test_recipe_table2_smac_budgets():
    quick = recipe_commands("fp3o_table2_smac.sh", "--quick")
    assert len(quick) == 3 * 3 * 3 and all("--map 2s3z" in c and "--total-timesteps 640000" in c for c in quick)
    assert {re.search(r"/(\w+)_smac\.py", c).group(1) for c in quick} == {"fp3o", "mappo", "happo"}
    full = recipe_commands("fp3o_table2_smac.sh")
    assert len(full) == 3 * 3 * 3 * 5  # maps x sharing modes x algorithms x seeds
    # the scripts take table E.5's steps, clip and actor for these maps: the recipe passes none of them
    assert not any(flag in c for c in full for flag in ("--total-timesteps", "--clip-coef", "--actor"))
    assert {re.search(r"--map (\w+) ", c).group(1) for c in full} == {"3s5z", "5m_vs_6m", "6h_vs_8z"}


def test_recipe_smax_3s5z_study():
    runs = recipe_commands("smax_3s5z_study.sh")
    assert len(runs) == 3 * 2 * 3 + 3 and all("--map 3s5z" in c and "--total-timesteps 1500000" in c for c in runs)
    assert {re.search(r"--sharing (\w+) ", c).group(1) for c in runs} == {"partial", "none"}
    matched = [c for c in runs if "--update-epochs 10" in c]  # compute-matched MAPPO, partial sharing, 3 seeds
    assert len(matched) == 3 and all("/mappo-e10__3s5z__partial__" in c and "mappo_smac.py" in c for c in matched)


def test_recipe_smax_6h_vs_8z_study():
    runs = recipe_commands("smax_6h_vs_8z_study.sh")
    assert len(runs) == 5 * 3 + 3 * 3 and all("--map 6h_vs_8z" in c and "--total-timesteps 3000000" in c for c in runs)
    # the scripts take table E.5's clip and actor for the map: the recipe passes neither
    assert not any(flag in c for c in runs for flag in ("--clip-coef", "--actor"))
    rows = {(re.search(r"/([\w-]+)__6h_vs_8z__(\w+)__\d", c).groups()) for c in runs}
    assert rows == {(a, "partial") for a in ("fp3o", "mappo", "happo", "fp3o-indep", "mappo-e10")} | {
        (a, "none") for a in ("fp3o", "mappo", "happo")}
    assert all("--no-dependent-step" in c for c in runs if "/fp3o-indep__" in c)
    assert all("--update-epochs 10" in c for c in runs if "/mappo-e10__" in c)
    assert len(recipe_commands("smax_6h_vs_8z_study.sh", env={"SEEDS": "1 2 3 4 5"})) == 8 * 5


@pytest.mark.parametrize("recipe, results", [("smax_3s5z_study.sh", "smax_3s5z"), ("smax_6h_vs_8z_study.sh", "smax_6h_vs_8z")])
def test_a_study_recipe_continues_from_its_committed_runs_in_an_empty_sweep_folder(recipe, results, tmp_path):
    """A fresh clone has no sweep folder: the runs that the committed runs.csv lists as finished are skipped ([done]),
    every other run of the recipe is to run."""
    finished = {r["run"] for r in csv.DictReader(open(ROOT / "benchmark" / "results" / results / "runs.csv"))
                if r["status"] == "0"}
    assert finished  # the studies have committed runs
    runs = recipe_commands(recipe, env={"OUT": str(tmp_path / "sweep")})
    done = {re.search(r"/([\w-]+__\w+__\w+__\d+) ", c).group(1) for c in runs if c.startswith("[done]")}
    assert done == finished and len(runs) > len(done)


def test_recipe_table1_mamujoco_tasks():
    if not (ROOT / "fp3o_mamujoco.py").exists():
        pytest.skip("fp3o_mamujoco.py is not in this checkout")
    full = recipe_commands("fp3o_table1_mamujoco.sh")
    assert len(full) % (6 * 3 * 5) == 0 and all("--total-timesteps 10000000" in c for c in full)
    for scenario, conf, clip in (("Walker2d", "2x3", "0.05"), ("Hopper", "3x1", "0.05"), ("ManySegmentSwimmer", "8x2", "0.2")):
        assert any(f"--scenario {scenario} --agent-conf {conf} --clip-coef {clip} " in c for c in full)


def test_a_study_continues_from_its_committed_results_on_a_new_machine(fake, tmp_path):
    """Part 1 runs 2 seeds and is reported; its sweep folder is then lost (a replaced machine). Part 2 skips the runs
    that the committed runs.csv lists as finished with the same command, and its report keeps part 1's runs."""
    common = ["--scripts", fake, "--tasks", "2s3z", "--sharing", "full", "--out", tmp_path / "sweep1",
              "--args=--total-timesteps 1000"]  # fmt: skip
    proc = run_tool("sweep.py", *common, "--seeds", "1", "2", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    results = tmp_path / "results"
    report.main(report.Args(sweeps=[str(tmp_path / "sweep1")], out_dir=str(results), bootstrap_reps=50))
    for row in csv.DictReader(open(results / "runs.csv")):  # as typed from a checkout, not this machine's paths
        assert row["command"].startswith(f"python {fake.name} --map 2s3z --sharing full --seed "), row
        assert row["logdir"].startswith(f"benchmark/sweeps/sweep1/{row['run']}/runs/2s3z__"), row
    assert "`python benchmark/report.py benchmark/sweeps/sweep1`" in (results / "table.md").read_text()
    step_seconds = {(r["run"], r["tag"]): r["seconds"] for r in csv.DictReader(open(results / "scalars.csv"))}
    assert all(s != "" for s in step_seconds.values())  # the wall-clock seconds travel with the compact results

    moved = tmp_path / "new_checkout" / fake.name  # the same script in another folder
    moved.parent.mkdir()
    moved.write_text(fake.read_text())
    part2 = ["--scripts", moved, *common[2:-3], "--out", tmp_path / "sweep2", "--args=--total-timesteps 1000",
             "--seeds", "1", "2", "3", "--finished-in", results / "runs.csv"]  # fmt: skip
    proc = run_tool("sweep.py", *part2, cwd=tmp_path)
    assert proc.returncode == 0 and "2 finished before, 1 to run" in proc.stdout, describe(proc)
    assert sorted(records(tmp_path / "sweep2")) == ["fake__2s3z__full__3"]
    changed = [a if not str(a).startswith("--args") else "--args=--total-timesteps 2000" for a in part2]
    proc = run_tool("sweep.py", *changed, "--dry-run", cwd=tmp_path)  # another budget: nothing counts as finished
    assert "0 finished before, 3 to run" in proc.stdout, describe(proc)

    merged = tmp_path / "merged"
    report.main(report.Args(sweeps=[str(tmp_path / "sweep2")], previous=[str(results)], out_dir=str(merged),
                            bootstrap_reps=50))  # fmt: skip
    rows = list(csv.DictReader(open(merged / "runs.csv")))
    assert sorted(r["run"] for r in rows) == [f"fake__2s3z__full__{s}" for s in (1, 2, 3)]
    first = [r for r in csv.DictReader(open(results / "scalars.csv")) if r["run"] == "fake__2s3z__full__1"]
    again = [r for r in csv.DictReader(open(merged / "scalars.csv")) if r["run"] == "fake__2s3z__full__1"]
    assert first == again and first  # part 1's scalars, seconds included, unchanged


def test_report_per_seed_curves_keep_every_seed_apart(synthetic, tmp_path):
    runs = report.find_runs([str(synthetic)])
    panels = report.seed_panels([r for r in runs if r.task == "2s3z"], "eval/win_rate", ["fp3o", "mappo"])
    assert list(panels) == [(s, a) for s in ("full", "none") for a in ("fp3o", "mappo")]
    for (sharing, alg), curves in panels.items():
        assert [seed for seed, _, _ in curves] == [1, 2, 3]  # mappo/none's seed 3 crashed at 40k: its curve stays
        for seed, steps, values in curves:
            run = next(r for r in runs if r.run == f"{alg}__2s3z__{sharing}__{seed}")
            np.testing.assert_array_equal(values, run.scalars["eval/win_rate"][:, 1])  # the seed's own values, not a mean
            np.testing.assert_array_equal(steps, run.scalars["eval/win_rate"][:, 0])
    report.main(report.Args(sweeps=[str(synthetic)], out_dir=str(tmp_path), per_seed=["eval/win_rate"], bootstrap_reps=10))
    assert (tmp_path / "seeds_2s3z__eval_win_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "seeds_HalfCheetah-6x1__eval_win_rate.png").exists()  # no such tag there
