"""The command line as a newcomer meets it, in every script: --help starts with what the script does and two example
commands that parse; boolean flags read once (no --no-no- pairs) and every spelling in use still parses; a run ends
with one summary line; a budget set by table E.5 comes with its duration at the speed measured. (The SMAC scripts'
summary line is checked on the runs of test_video_smac.py.)"""

import dataclasses
import importlib
import re
import shlex
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, script_env
from harness import SCRIPT_TIMEOUT, Job, run_dir, run_scripts, summary_line
from readers import read_scalars

SCRIPTS = ["fp3o_smac", "mappo_smac", "happo_smac", "a2po_smac", "fp3o_mamujoco", "ippo_mpe"]


def parse(S, *argv):
    return S.parse_args(list(argv))


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_starts_with_what_the_script_does_and_two_examples_that_parse(name, capsys):
    S = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        parse(S, "--help")
    out = capsys.readouterr().out
    assert e.value.code == 0
    usage, what, examples = out.split("\n\n")[:3]
    assert usage.startswith("usage: ") and what == S.__doc__.splitlines()[0]
    lines = examples.splitlines()
    assert lines[0] == "Examples:" and len(lines) == 3, examples
    for line in lines[1:]:
        words = shlex.split(line, comments=True)
        assert words[:2] == ["python", f"{name}.py"] and len(words) > 2, line
        assert isinstance(parse(S, *words[2:]), S.Args), line
    assert "--no-no-" not in out


@pytest.mark.parametrize("name", SCRIPTS)
def test_boolean_flags_read_once_and_every_spelling_in_use_still_parses(name, capsys):
    S = importlib.import_module(name)
    flags = [f.name for f in dataclasses.fields(S.Args) if f.type is bool or "bool" in str(f.type)]
    assert {"cuda", "progress_bar", "torch_deterministic", "track", "save_model", "eval_only", "capture_video"} <= set(flags)
    for field in flags:
        flag = "--" + field.replace("_", "-")
        assert getattr(parse(S, flag), field) is True, flag
        if field.startswith("no_"):  # an ablation named by its negation: one flag, no --no-no- twin
            with pytest.raises(SystemExit) as e:
                parse(S, "--no-" + flag[2:])
            err = capsys.readouterr().err
            assert e.value.code == 2 and "--no-no-" in err and err.strip().splitlines()[-1].startswith("error: "), err
        else:  # --cuda / --no-cuda, --progress-bar / --no-progress-bar: both kept (a resumed run may switch them)
            assert getattr(parse(S, "--no-" + flag[2:]), field) is False, flag
    if name.startswith("fp3o"):
        args = parse(S, "--no-dependent-step", "--no-condition", "--double-clip", "--no-cuda", "--no-progress-bar")
        assert args.no_dependent_step and args.no_condition and args.double_clip
        assert not (args.cuda or args.progress_bar)


def test_a_run_ends_with_one_summary_line(tmp_path):
    """IPPO with evaluations (the summary: the last one's return), MaMuJoCo without (the last training episodes')."""
    ippo = "--num-envs 4 --num-steps 25 --total-timesteps 200 --eval-interval 1 --eval-episodes 2 --no-progress-bar"
    mamujoco = "--num-envs 1 --num-steps 50 --num-minibatches 1 --total-timesteps 100 --max-episode-steps 20 --eval-interval 0"
    jobs = [
        Job("ippo", "ippo_mpe.py", ippo.split(), tmp_path / "ippo"),
        Job("mamujoco", "fp3o_mamujoco.py", [*mamujoco.split(), "--no-progress-bar"], tmp_path / "mamujoco"),
    ]
    procs = run_scripts(jobs)
    for name, tag, kind in (("ippo", "eval/episodic_return", "eval"), ("mamujoco", "charts/episodic_return", "training")):
        match, run = summary_line(procs[name]), run_dir(tmp_path / name)
        assert match.group(1, 2, 4, 5) == (kind, "return", "200" if name == "ippo" else "100", run.name)
        assert float(match.group(3)) == pytest.approx(read_scalars(run)[tag][-1][1], abs=0.005), "the last logged value"


def test_a_budget_of_table_e5_comes_with_its_duration_at_the_measured_speed(tmp_path):
    """fp3o_smac.py --map 3s5z: table E.5 sets 5M steps; after 3 iterations (when the checkpoint of the third is written,
    the line has been printed) the script says how long they take at the speed of the third."""
    args = "--map 3s5z --num-envs 8 --eval-interval 0 --no-progress-bar --save-model --checkpoint-interval 3".split()
    proc = subprocess.Popen([sys.executable, str(ROOT / "fp3o_smac.py"), *args], cwd=tmp_path, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []

    def read():  # every line as it comes
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + SCRIPT_TIMEOUT
        while not any("take about" in line for line in lines) and time.time() < deadline and proc.poll() is None:
            if list(tmp_path.glob("runs/*/checkpoint.pt")):  # the third iteration is done: its line came before
                time.sleep(1)
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
        reader.join(5)
    said = "".join(lines)
    assert "--total-timesteps 5000000" in said and "table E.5 of the paper" in said, said
    duration = [line for line in lines if "take about" in line]
    assert len(duration) == 1, said
    match = re.fullmatch(r"at ([0-9,]+) steps/s, the 5,000,000 steps of table E.5 take about ([0-9.]+) h \(.*\)\n",
                         duration[0])
    assert match, duration
    speed, hours = float(match.group(1).replace(",", "")), float(match.group(2))
    assert hours == pytest.approx(5e6 / speed / 3600, abs=0.05 + 0.01 * hours)
