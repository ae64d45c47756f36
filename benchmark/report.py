"""Tables, learning curves and a CSV from the TensorBoard logs of a sweep (or of any folder of `runs/`).

Runs are found through the sweep's record.json files (labels, exit status; see benchmark/sweep.py) or, in a folder
without records, by their TensorBoard folder name `{task}__{exp_name}__{sharing}__{seed}__{time}`. Logs are read with
TensorBoard's EventAccumulator. Written to --out-dir:
  table.md         the paper's table: per task and sharing mode (rows) and algorithm (columns) the final evaluation
                   over seeds: SMAC (runs that log eval/win_rate) median win rate in %, otherwise mean return; +- std
                   over seeds; the best of each row in bold; (n/m seeds) where seeds are missing or incomplete;
                   with --at, rows for the values at those step budgets too; under each table, with rliable
                   (Agarwal et al., NeurIPS 2021): the interquartile mean over seeds with a 95% stratified-bootstrap
                   confidence interval, and the probability of improvement of fp3o over each other algorithm;
                   with --reach, the steps to the first value at or above a threshold (median over seeds)
  seeds_<task>__<tag>.png    with --per-seed: one panel per sharing mode (rows) and algorithm (columns), a curve per
                   seed against environment steps
  curves_<task>__<tag>.png   mean and spread over seeds per algorithm, one panel per sharing mode, against
                   environment steps; ..__seconds.png against wall-clock seconds from the run's first event;
                   ..__gradient_steps.png against the actor optimiser steps of `charts/gradient_steps`
  scalars.csv      every scalar of every run: run, algorithm, sharing, task, seed, step, tag, value
  runs.csv         every run: labels, exit status, duration, last step, command

Usage: python benchmark/report.py benchmark/sweeps/quick_smax --out-dir benchmark/results/quick_smax --at 200000 400000
"""
import csv
import glob
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

FAMILY_SUFFIXES = ("_smac", "_mamujoco", "_mpe")
SHARING_ORDER = {"full": 0, "partial": 1, "none": 2}


@dataclass
class Args:
    sweeps: tyro.conf.Positional[List[str]]
    """sweep folders (benchmark/sweep.py --out) or folders holding TensorBoard runs"""
    previous: List[str] = field(default_factory=list)
    """results folders of earlier reports (their runs.csv and scalars.csv[.gz]): their runs count too, unless a sweep
    folder holds the same run again; so a study run in parts on replaced machines keeps its finished runs"""
    out_dir: str = os.path.join("benchmark", "results", "report")
    """where table.md, the curves, scalars.csv and runs.csv go"""
    tag: Optional[str] = None
    """scalar of the table; default per task: eval/win_rate where its runs log it (SMAC), else eval/episodic_return"""
    stat: Literal["auto", "median", "mean"] = "auto"
    """statistic over seeds; auto: median for win rates (as the FP3O/MAPPO papers on SMAC), mean for returns"""
    last: int = 1
    """a run's final value: the mean of its last N values of the tag"""
    at: List[int] = field(default_factory=list)
    """step budgets for extra rows: each run's last value at or before the budget (runs short of it count as missing)"""
    reach: List[float] = field(default_factory=list)
    """thresholds of the table's tag (as logged: a win rate of 0.8 is 0.8): a table of the steps each algorithm needs to
    the first value at or above each, median over seeds, a seed that never gets there counting as infinitely many"""
    tolerance: float = 0.02
    """relative slack on steps: a run reaching (1 - tol) x the row's final step (or budget) counts as complete"""
    algorithms: List[str] = field(default_factory=list)
    """column order and selection (default: every algorithm, alphabetically)"""
    decimals: int = 1
    """decimals of the table's values"""
    plot_tags: List[str] = field(default_factory=list)
    """tags to plot (default: the table's tag of each task)"""
    per_seed: List[str] = field(default_factory=list)
    """tags to plot seed by seed (appendix F.2 of the FP3O paper): one panel per algorithm and sharing mode, each seed
    its own curve, so that a seed stuck at 0% shows instead of being averaged away"""
    band: Literal["std", "minmax", "none"] = "std"
    """the spread around the mean curve: +- std over seeds, min to max, or none"""
    csv_tags: List[str] = field(default_factory=list)
    """regular expressions of the tags written to scalars.csv (default: every tag)"""
    title: str = ""
    """a line printed above the tables (e.g. the machine and the recipe)"""
    bootstrap_reps: int = 2000
    """bootstrap samples of the confidence intervals (interquartile mean, probability of improvement)"""
    bootstrap_seed: int = 0
    """seed of the bootstrap: the same logs give the same table"""


@dataclass(eq=False)
class RunLog:
    run: str
    algorithm: str
    task: str
    sharing: str
    seed: int
    status: Optional[int] = 0
    duration_s: Optional[float] = None
    command: str = ""
    logdir: Optional[str] = None
    shown_logdir: Optional[str] = None  # logdir as runs.csv names it (portable_path)
    # tag -> [K, 3] (step, value, wall-clock seconds since the run's first event), sorted by step
    scalars: Dict[str, np.ndarray] = field(default_factory=dict)

    def last_step(self) -> int:
        return int(max((s[-1, 0] for s in self.scalars.values() if len(s)), default=0))


def algorithm_label(exp_name: str) -> str:
    for suffix in FAMILY_SUFFIXES:
        if exp_name.endswith(suffix):
            return exp_name[: -len(suffix)]
    return exp_name


def read_scalars(logdir: str) -> Dict[str, np.ndarray]:
    """{tag: array [K, 3] of (step, value, seconds since the first event)} of a TensorBoard run folder; a step logged
    twice keeps its last value."""
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        start = acc.FirstEventTimestamp()
        by_step = {e.step: (e.value, e.wall_time - start) for e in acc.Scalars(tag)}
        out[tag] = np.array([(step, *v) for step, v in sorted(by_step.items())], dtype=np.float64).reshape(-1, 3)
    return out


def tb_dirs(folder: str) -> List[str]:
    """Folders directly holding TensorBoard event files, under `folder`."""
    found = {os.path.dirname(p) for p in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)}
    return sorted(found)


def portable_path(path: str, sweep: str) -> str:
    """A path under a sweep folder as committed results name it: relative to this directory (the repository root) when
    it lies below it, else below benchmark/sweeps/ (the sweeps' place in a checkout), not this machine's absolute path."""
    path = os.path.abspath(path)
    if path.startswith(os.getcwd() + os.sep):
        return os.path.relpath(path)
    return os.path.join("benchmark", "sweeps", os.path.relpath(path, os.path.dirname(os.path.abspath(sweep.rstrip(os.sep)))))


def portable_command(command: str) -> str:
    """A run's command as a user types it from the repository root: `python script.py ...`, not this machine's
    interpreter and checkout paths (sweep.py's --finished-in compares commands the same way)."""
    words = shlex.split(command)
    return shlex.join(["python", os.path.basename(words[1]), *words[2:]]) if len(words) > 1 else command


def find_runs(folders: List[str]) -> List[RunLog]:
    runs = []
    for folder in folders:
        records = sorted(glob.glob(os.path.join(folder, "**", "record.json"), recursive=True))
        if records:
            for path in records:
                with open(path) as f:
                    rec = json.load(f)
                # the script's own TensorBoard folder(s) under the run's working directory (not earlier attempts)
                dirs = tb_dirs(os.path.join(os.path.dirname(path), "runs"))
                if len(dirs) > 1:
                    print(f"warning: {rec['id']} has {len(dirs)} TensorBoard folders; using the newest", file=sys.stderr)
                dirs.sort(key=lambda d: max(os.path.getmtime(p) for p in glob.glob(os.path.join(d, "events.out.tfevents.*"))))
                logdir = dirs[-1] if dirs else None
                shown = portable_path(logdir, folder) if logdir else None
                command = portable_command(rec.get("command_line", ""))
                labels = (rec["id"], rec["algorithm"], rec["task"], rec["sharing"], int(rec["seed"]))
                runs.append(RunLog(*labels, rec.get("status"), rec.get("duration_s"), command, logdir, shown))
        else:
            for d in tb_dirs(folder):
                parts = os.path.basename(d).split("__")
                if len(parts) != 5 or not parts[3].lstrip("-").isdigit():
                    print(f"warning: skipping {d}: not a run folder named task__exp_name__sharing__seed__time", file=sys.stderr)
                    continue
                task, exp_name, sharing, seed, _ = parts
                runs.append(RunLog(os.path.basename(d), algorithm_label(exp_name), task, sharing, int(seed), logdir=d,
                                   shown_logdir=portable_path(d, folder)))
    for r in runs:
        if r.logdir:
            r.scalars = read_scalars(r.logdir)
    return runs


def read_previous(folder: str) -> List[RunLog]:
    """The runs of an earlier report's runs.csv, with their scalars from scalars.csv (or .csv.gz); files written before
    scalars.csv had a `seconds` column give no wall-clock seconds (NaN: such runs are left out of the seconds curves)."""
    import gzip

    runs = {}
    with open(os.path.join(folder, "runs.csv"), newline="") as f:
        for row in csv.DictReader(f):
            duration = float(row["duration_s"]) if row["duration_s"] not in ("", "None") else None
            status = int(row["status"]) if row["status"] not in ("", "None") else None
            runs[row["run"]] = RunLog(row["run"], row["algorithm"], row["task"], row["sharing"], int(row["seed"]), status,
                                      duration, row["command"], row["logdir"] or None)  # fmt: skip
    path = os.path.join(folder, "scalars.csv")
    opener = (open, path) if os.path.exists(path) else (gzip.open, path + ".gz")
    values: Dict[tuple, list] = {}
    with opener[0](opener[1], "rt", newline="") as f:
        for row in csv.DictReader(f):
            if row["run"] in runs:
                seconds = float(row["seconds"]) if row.get("seconds") not in (None, "") else math.nan
                values.setdefault((row["run"], row["tag"]), []).append((float(row["step"]), float(row["value"]), seconds))
    for (run, tag), rows in values.items():
        runs[run].scalars[tag] = np.array(sorted(rows), dtype=np.float64).reshape(-1, 3)
    return list(runs.values())


def table_metric(runs: List[RunLog], tag: Optional[str], stat: str):
    """(tag, statistic) for a task's runs: win rate and median on SMAC, return and mean otherwise."""
    if tag is None:
        tag = "eval/win_rate" if any("eval/win_rate" in r.scalars for r in runs) else "eval/episodic_return"
    if stat == "auto":
        stat = "median" if "win_rate" in tag else "mean"
    return tag, stat


def final_value(series: np.ndarray, last: int) -> float:
    return float(series[-last:, 1].mean())


def value_at(series: np.ndarray, budget: float, tolerance: float) -> Optional[float]:
    """The last value at or before `budget` (with slack), or None when the run did not get that far."""
    if not len(series) or series[-1, 0] < budget * (1 - tolerance):
        return None
    before = series[series[:, 0] <= budget * (1 + tolerance)]
    return float(before[-1, 1]) if len(before) else None


def summarize(values: List[float], stat: str):
    arr = np.asarray(values, dtype=np.float64)
    centre = float(np.median(arr) if stat == "median" else np.mean(arr))
    return centre, float(np.std(arr))  # std over seeds (ddof 0, as numpy and the MARL papers' code)


def human_steps(steps: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if steps >= div:
            return f"{steps / div:g}{unit}"
    return f"{steps:g}"


def build_table(runs: List[RunLog], args: Args):
    """Markdown lines of the tables, and notes on missing / incomplete runs."""
    tasks = list(dict.fromkeys(r.task for r in runs))
    algorithms = args.algorithms or list(dict.fromkeys(r.algorithm for r in runs))
    sections, notes = {}, []
    for task in tasks:
        task_runs = [r for r in runs if r.task == task]
        tag, stat = table_metric(task_runs, args.tag, args.stat)
        percent = "win_rate" in tag
        expected = sorted({r.seed for r in task_runs})
        for sharing in sorted({r.sharing for r in task_runs}, key=lambda s: (SHARING_ORDER.get(s, 9), s)):
            row_runs = [r for r in task_runs if r.sharing == sharing and r.algorithm in algorithms]
            have = [r for r in row_runs if tag in r.scalars and len(r.scalars[tag])]
            row_final = max((r.scalars[tag][-1, 0] for r in have), default=0)
            for r in row_runs:
                if r not in have:
                    failed = f" (exit status {r.status})" if r.status not in (0, None) else ""
                    notes.append(f"{r.run}: no `{tag}` logged{failed}")
                elif r.scalars[tag][-1, 0] < row_final * (1 - args.tolerance):
                    notes.append(f"{r.run}: incomplete, last `{tag}` at step {r.scalars[tag][-1, 0]:.0f} of {row_final:.0f}")
                elif r.status not in (0, None):
                    notes.append(f"{r.run}: exit status {r.status}, but its logs reach the final step: counted")
            budgets = [(f"{human_steps(b)}", b) for b in args.at] + [(f"final ({human_steps(row_final)})", None)]
            for label, budget in budgets:
                cells, scores = {}, {}
                for alg in algorithms:
                    vals = []
                    for r in have:
                        if r.algorithm != alg:
                            continue
                        s = r.scalars[tag]
                        if budget is None:
                            v = final_value(s, args.last) if s[-1, 0] >= row_final * (1 - args.tolerance) else None
                        else:
                            v = value_at(s, budget, args.tolerance)
                        if v is not None and math.isfinite(v):
                            vals.append(v * (100 if percent else 1))
                    cells[alg] = (summarize(vals, stat), len(vals)) if vals else (None, 0)
                    scores[alg] = vals
                n_runs = {a: sum(r.algorithm == a for r in row_runs) for a in algorithms}
                sections.setdefault((tag, stat), []).append((task, sharing, label, cells, len(expected), n_runs, scores))
    lines = []
    for (tag, stat), rows in sections.items():
        what = f"{stat} over seeds ± std" + (", in %" if "win_rate" in tag else "")
        lines += [f"### `{tag}`: {what}", "", "| task | sharing | steps | " + " | ".join(algorithms) + " |",
                  "|---|---|---|" + "---|" * len(algorithms)]  # fmt: skip
        for task, sharing, label, cells, n_expected, n_runs, _ in rows:
            shown = {a: round(c[0][0], args.decimals) for a, c in cells.items() if c[0] is not None}
            best = max(shown.values()) if shown else None
            out = []
            for alg in algorithms:
                summary, n = cells[alg]
                if summary is None:
                    out.append(f"- (0/{n_expected} seeds)" if n_runs[alg] else "-")
                    continue
                text = f"{summary[0]:.{args.decimals}f} ± {summary[1]:.{args.decimals}f}"
                text = f"**{text}**" if len(shown) > 1 and shown[alg] == best else text
                out.append(text + (f" ({n}/{n_expected} seeds)" if n < n_expected else ""))
            lines.append(f"| {task} | {sharing} | {label} | " + " | ".join(out) + " |")
        lines.append("")
        lines += rliable_tables(rows, algorithms, tag, args)
    return lines, notes


def first_reach(series: np.ndarray, threshold: float) -> float:
    """The first step at which the series is at or above `threshold`; inf where it never is."""
    hit = series[series[:, 1] >= threshold]
    return float(hit[0, 0]) if len(hit) else math.inf


def reach_tables(runs: List[RunLog], args: Args) -> List[str]:
    """Markdown lines: per threshold of --reach, task and sharing mode, the median over seeds of the steps to the first
    value of the table's tag at or above it. A seed that never gets there counts as infinitely many steps (the median is
    then `> last step` once half of the seeds have not); a seed that stopped early without getting there is left out."""
    algorithms = args.algorithms or list(dict.fromkeys(r.algorithm for r in runs))
    lines = []
    for threshold in args.reach:
        for task in dict.fromkeys(r.task for r in runs):
            task_runs = [r for r in runs if r.task == task]
            tag, _ = table_metric(task_runs, args.tag, args.stat)
            n_expected = len({r.seed for r in task_runs})
            what = "median over seeds (seeds that got there / seeds: each seed's steps)"
            header = ["| task | sharing | " + " | ".join(algorithms) + " |", "|---|---|" + "---|" * len(algorithms)]
            lines += [f"### Steps to the first `{tag}` >= {threshold:g}: {what}", "", *header]
            for sharing in sorted({r.sharing for r in task_runs}, key=lambda s: (SHARING_ORDER.get(s, 9), s)):
                have = [r for r in task_runs if r.sharing == sharing and len(r.scalars.get(tag, ()))]
                row_final = max((r.scalars[tag][-1, 0] for r in have), default=0)
                cells = []
                for alg in algorithms:
                    steps = [first_reach(r.scalars[tag], threshold) for r in have if r.algorithm == alg]
                    last = [r.scalars[tag][-1, 0] for r in have if r.algorithm == alg]
                    # a run that stopped short of the row's final step without getting there tells nothing
                    steps = [s for s, end in zip(steps, last) if math.isfinite(s) or end >= row_final * (1 - args.tolerance)]
                    if not steps:
                        cells.append("-")
                        continue
                    median, reached = float(np.median(steps)), sum(map(math.isfinite, steps))
                    text = human_steps(median) if math.isfinite(median) else f"> {human_steps(row_final)}"
                    each = ", ".join(human_steps(x) if math.isfinite(x) else "never" for x in sorted(steps))
                    missing = f" ({len(steps)}/{n_expected} seeds)" if len(steps) < n_expected else ""
                    cells.append(f"{text} ({reached}/{len(steps)}: {each}){missing}")
                lines.append(f"| {task} | {sharing} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


MIN_SEEDS = 3  # fewer seeds than this: no interval estimate (the cell says so)


def interval_estimate(scores: List[List[float]], func, args: Args):
    """rliable's point estimate and 95% stratified-bootstrap confidence interval of func over the runs' scores: one
    list of seeds' scores per algorithm, each a `runs x tasks` matrix of seeds x 1; (point, low, high)."""
    from rliable import library as rly

    matrices = [np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in scores]
    # rliable 1.2's bootstraps draw their resamples from numpy's global generator (not from their random_state):
    # seed it for this estimate, then put it back as it was
    state = np.random.get_state()
    np.random.seed(args.bootstrap_seed)
    try:
        point, interval = rly.get_interval_estimates({"x": matrices if len(matrices) > 1 else matrices[0]}, func,
                                                     reps=args.bootstrap_reps)  # fmt: skip
    finally:
        np.random.set_state(state)
    return float(point["x"]), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def interval_cell(scores: List[List[float]], func, decimals: int, args: Args) -> str:
    """`point [low, high]`, or `n=2 < 3` where an algorithm of the cell has fewer seeds than MIN_SEEDS."""
    n = min(len(v) for v in scores)
    if n < MIN_SEEDS:
        return f"n={n} < {MIN_SEEDS}"
    point, low, high = interval_estimate(scores, func, args)
    return f"{point:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"


def rliable_tables(rows, algorithms: List[str], tag: str, args: Args) -> List[str]:
    """Markdown lines: the IQM [95% CI] of each algorithm and P(fp3o > baseline) [95% CI] for the rows of a table."""
    from rliable import metrics

    baselines = [a for a in algorithms if a != "fp3o"] if "fp3o" in algorithms else []
    how = f"95% stratified-bootstrap CI, rliable, {args.bootstrap_reps} samples, seed {args.bootstrap_seed}"
    percent = ", in %" if "win_rate" in tag else ""
    lines = [f"#### `{tag}`: interquartile mean over seeds [{how}]{percent}", "",
             "| task | sharing | steps | " + " | ".join(algorithms) + " |", "|---|---|---|" + "---|" * len(algorithms)]  # fmt: skip
    for task, sharing, label, _, _, n_runs, scores in rows:
        out = []
        for alg in algorithms:
            out.append(interval_cell([scores[alg]], metrics.aggregate_iqm, args.decimals, args) if n_runs[alg] else "-")
        lines.append(f"| {task} | {sharing} | {label} | " + " | ".join(out) + " |")
    lines.append("")
    if not baselines:
        return lines
    lines += [f"#### `{tag}`: probability of improvement P(fp3o > baseline) [{how}]", "",
              "| task | sharing | steps | " + " | ".join(f"P(fp3o > {b})" for b in baselines) + " |",
              "|---|---|---|" + "---|" * len(baselines)]  # fmt: skip
    for task, sharing, label, _, _, n_runs, scores in rows:
        out = []
        for b in baselines:
            pair = [scores["fp3o"], scores[b]]
            ran = n_runs["fp3o"] and n_runs[b]
            out.append(interval_cell(pair, metrics.probability_of_improvement, 2, args) if ran else "-")
        lines.append(f"| {task} | {sharing} | {label} | " + " | ".join(out) + " |")
    lines.append("")
    return lines


GRADIENT_STEPS = "charts/gradient_steps"  # cumulative actor optimiser steps, logged by the training scripts
X_AXES = {"steps": "environment steps", "seconds": "wall-clock seconds", "gradient_steps": "gradient steps"}


def x_values(run: RunLog, tag: str, x: str) -> Optional[np.ndarray]:
    """The x of each value of `tag`: its environment step, its seconds since the run's first event, or the gradient
    steps done by then (from GRADIENT_STEPS, interpolated at the tag's steps); None where the run lacks what it needs."""
    s = run.scalars[tag]
    if x == "steps":
        return s[:, 0]
    if x == "seconds":
        return None if np.isnan(s[:, 2]).any() else s[:, 2]
    grad = run.scalars.get(GRADIENT_STEPS)
    if grad is None or not len(grad):
        return None
    return np.interp(s[:, 0], grad[:, 0], grad[:, 1], left=0.0)  # no update before the first logged one


def curve(runs: List[RunLog], tag: str, x: str = "steps"):
    """x, mean, std, min, max over the runs' curves interpolated on a common grid (no extrapolation); `x`: a key of
    X_AXES."""
    series = []
    for r in runs:
        if tag in r.scalars and len(r.scalars[tag]) and (xs := x_values(r, tag, x)) is not None:
            series.append(np.stack([xs, r.scalars[tag][:, 1]], 1))
    if not series:
        return None
    steps = np.unique(np.concatenate([s[:, 0] for s in series]))
    if len(steps) > 400:
        steps = np.linspace(steps[0], steps[-1], 400)
    ys = np.full((len(series), len(steps)), np.nan)
    for i, s in enumerate(series):
        inside = (steps >= s[0, 0]) & (steps <= s[-1, 0])
        ys[i, inside] = np.interp(steps[inside], s[:, 0], s[:, 1])
    keep = ~np.isnan(ys).all(0)
    ys, steps = ys[:, keep], steps[keep]
    with np.errstate(invalid="ignore"):
        return steps, np.nanmean(ys, 0), np.nanstd(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0), len(series)


def plot_curves(runs: List[RunLog], args: Args) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    algorithms = args.algorithms or list(dict.fromkeys(r.algorithm for r in runs))
    x_axes = list(X_AXES)
    if not any(GRADIENT_STEPS in r.scalars for r in runs):
        x_axes.remove("gradient_steps")
        print(f"note: no run logs `{GRADIENT_STEPS}`: no curves against gradient steps")
    for task in dict.fromkeys(r.task for r in runs):
        task_runs = [r for r in runs if r.task == task and r.algorithm in algorithms]
        sharings = sorted({r.sharing for r in task_runs}, key=lambda s: (SHARING_ORDER.get(s, 9), s))
        for tag in args.plot_tags or [table_metric(task_runs, args.tag, args.stat)[0]]:
            for x in x_axes:
                fig, axes = plt.subplots(1, len(sharings), figsize=(4.2 * len(sharings), 3.4), sharey=True, squeeze=False)
                drawn = False
                for ax, sharing in zip(axes[0], sharings, strict=True):
                    for k, alg in enumerate(algorithms):
                        c = curve([r for r in task_runs if r.sharing == sharing and r.algorithm == alg], tag, x)
                        if c is None:
                            continue
                        steps, mean, std, lo, hi, n = c
                        line = ax.plot(steps, mean, label=f"{alg} (n={n})", color=f"C{k}")[0]
                        if args.band != "none":
                            low, high = (mean - std, mean + std) if args.band == "std" else (lo, hi)
                            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
                        drawn = True
                    ax.set_title(f"{task}, sharing {sharing}")
                    ax.set_xlabel(X_AXES[x])
                    ax.grid(alpha=0.3)
                    if ax.lines:
                        ax.legend(fontsize=8)
                axes[0][0].set_ylabel(f"{tag} (mean, {'+- std' if args.band == 'std' else args.band})")
                if drawn:
                    suffix = "" if x == "steps" else f"__{x}"
                    path = os.path.join(args.out_dir, f"curves_{task}__{re.sub(r'[^A-Za-z0-9]+', '_', tag)}{suffix}.png")
                    fig.tight_layout()
                    fig.savefig(path, dpi=110)
                    written.append(path)
                plt.close(fig)
    return written


def seed_panels(runs: List[RunLog], tag: str, algorithms: List[str]) -> Dict[tuple, List[tuple]]:
    """{(sharing, algorithm): [(seed, steps, values), ...]}: each run's own curve of `tag`, by panel, sharing modes in
    the order full, partial, none and algorithms in the given order."""
    panels = {}
    sharings = sorted({r.sharing for r in runs}, key=lambda s: (SHARING_ORDER.get(s, 9), s))
    for sharing in sharings:
        for alg in algorithms:
            curves = [(r.seed, r.scalars[tag][:, 0], r.scalars[tag][:, 1]) for r in runs
                      if r.sharing == sharing and r.algorithm == alg and len(r.scalars.get(tag, []))]
            if curves:
                panels[(sharing, alg)] = sorted(curves, key=lambda c: c[0])
    return panels


def plot_seeds(runs: List[RunLog], args: Args) -> List[str]:
    """--per-seed: every seed's own curve of each tag, one panel per sharing mode (row) and algorithm (column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    algorithms = args.algorithms or list(dict.fromkeys(r.algorithm for r in runs))
    for task in dict.fromkeys(r.task for r in runs):
        task_runs = [r for r in runs if r.task == task and r.algorithm in algorithms]
        seeds = sorted({r.seed for r in task_runs})
        for tag in args.per_seed:
            panels = seed_panels(task_runs, tag, algorithms)
            if not panels:
                continue
            rows = list(dict.fromkeys(sharing for sharing, _ in panels))
            columns = [a for a in algorithms if any(alg == a for _, alg in panels)]
            fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.2 * len(columns), 2.6 * len(rows)), sharex=True,
                                     sharey=True, squeeze=False)
            for (sharing, alg), curves in panels.items():
                ax = axes[rows.index(sharing)][columns.index(alg)]
                for seed, steps, values in curves:
                    ax.plot(steps, values, label=f"seed {seed}", color=f"C{seeds.index(seed)}", lw=1.2)
                ax.legend(fontsize=7)
            for i, sharing in enumerate(rows):
                for j, alg in enumerate(columns):
                    axes[i][j].set_title(f"{alg}, sharing {sharing}", fontsize=9)
                    axes[i][j].grid(alpha=0.3)
                axes[i][0].set_ylabel(tag)
            for ax in axes[-1]:
                ax.set_xlabel(X_AXES["steps"])
            path = os.path.join(args.out_dir, f"seeds_{task}__{re.sub(r'[^A-Za-z0-9]+', '_', tag)}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            written.append(path)
            plt.close(fig)
    return written


def write_csvs(runs: List[RunLog], args: Args):
    patterns = [re.compile(p) for p in args.csv_tags]
    with open(os.path.join(args.out_dir, "scalars.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "algorithm", "sharing", "task", "seed", "step", "tag", "value", "seconds"])
        for r in runs:
            for tag, s in sorted(r.scalars.items()):
                if patterns and not any(p.search(tag) for p in patterns):
                    continue
                for step, value, seconds in s:
                    seconds = "" if math.isnan(seconds) else f"{seconds:.1f}"
                    w.writerow([r.run, r.algorithm, r.sharing, r.task, r.seed, int(step), tag, repr(float(value)), seconds])
    with open(os.path.join(args.out_dir, "runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "algorithm", "sharing", "task", "seed", "status", "duration_s", "last_step", "logdir", "command"])
        for r in runs:
            labels = [r.run, r.algorithm, r.sharing, r.task, r.seed]
            w.writerow(labels + [r.status, r.duration_s, r.last_step(), r.shown_logdir or r.logdir, r.command])


def main(args: Args, cli: Optional[List[str]] = None):
    """`cli`: the command-line arguments, quoted in table.md."""
    if args.bootstrap_reps < 1:
        print(f"error: --bootstrap-reps must be at least 1, got {args.bootstrap_reps}", file=sys.stderr)
        sys.exit(2)
    runs = find_runs(args.sweeps)
    found = {r.run for r in runs}
    for folder in args.previous:
        if not os.path.exists(os.path.join(folder, "runs.csv")):
            print(f"error: --previous {folder} has no runs.csv", file=sys.stderr)
            sys.exit(2)
        runs += [r for r in read_previous(folder) if r.run not in found]
    if not runs:
        print(f"error: no runs found in {', '.join(args.sweeps)}", file=sys.stderr)
        sys.exit(2)
    runs.sort(key=lambda r: (r.task, SHARING_ORDER.get(r.sharing, 9), r.algorithm, r.seed))
    os.makedirs(args.out_dir, exist_ok=True)
    lines, notes = build_table(runs, args)
    lines += reach_tables(runs, args)
    header = [args.title, ""] if args.title else []
    cli = [portable_path(a, a) if a in args.sweeps else a for a in (cli if cli is not None else args.sweeps)]
    header += [f"`python benchmark/report.py {shlex.join(cli)}` on {len(runs)} runs "
               f"({sum(r.status == 0 for r in runs)} finished with exit status 0).", ""]  # fmt: skip
    footer = ["Notes:", ""] + [f"- {n}" for n in notes] + [""] if notes else []
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write("\n".join(header + lines + footer))
    write_csvs(runs, args)
    pngs = plot_curves(runs, args) + plot_seeds(runs, args)
    print("\n".join(lines + footer))
    print(f"wrote {args.out_dir}/table.md, scalars.csv, runs.csv and {len(pngs)} plots")


if __name__ == "__main__":
    main(tyro.cli(Args), sys.argv[1:])
