"""benchmark/device_check.py end to end with fake SMAC scripts of known timings (a few seconds per run, no GPU): the
missing packages installed from the wheels folder and on PYTHONPATH for every run, the device tests' summary, the
throughput table with jax on the GPU and on the CPU, the aggregate SPS of runs side by side, the time to the win
rate, and one error line for bad flags. The wheel brought along also holds a stand-in `jax` whose default backend
is "gpu", so that the tool takes this machine for a GPU one and measures both jax platforms."""
import re
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT, script_env
from harness import describe

FAKE = '''
"""Fake SMAC script: iterations of ROLLOUT + UPDATE seconds (rollout x2 with JAX_PLATFORMS=cpu), logged as the real
scripts log them, after 5 s per seed above 1 (as if compiling); with --eval-interval, an evaluation win rate of
iteration / 40 (0.95 at iteration 38)."""
import argparse, os, time
import devcheck_probe  # installed by device_check.py from the wheels folder
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

p = argparse.ArgumentParser()
for flag in ("--map", "--sharing", "--seed", "--num-envs", "--num-steps", "--total-timesteps", "--eval-interval",
             "--eval-episodes", "--torch-threads"):
    p.add_argument(flag)
p.add_argument("--no-progress-bar", action="store_true")
a = p.parse_args()
ROLLOUT, UPDATE = {rollout} * (2 if os.environ.get("JAX_PLATFORMS") == "cpu" else 1), {update}
batch = int(a.num_envs or 128) * int(a.num_steps or 25)
w = EventFileWriter(f"runs/{{a.map}}__fake__{{a.sharing}}__{{a.seed}}__0")
time.sleep(5 * (int(a.seed) - 1))


def log(tag, value, step):
    v = summary_pb2.Summary.Value(tag=tag, simple_value=value)
    w.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[v])))


for i in range(1, int(a.total_timesteps or 10**9) // batch + 1):
    time.sleep(ROLLOUT + UPDATE)
    log("charts/rollout_time", ROLLOUT, i * batch), log("charts/update_time", UPDATE, i * batch)
    log("charts/SPS", batch / (ROLLOUT + UPDATE), i * batch)
    if a.eval_interval and int(a.eval_interval) > 0 and i % int(a.eval_interval) == 0:
        log("eval/win_rate", min(1.0, i / 40), i * batch)
    w.flush()
w.close()
'''
FAKE_TESTS = '''
import pytest


def test_on_the_device():
    pass


@pytest.mark.skip(reason="no GPU in this fake")
def test_skipped():
    pass
'''
STAND_IN_JAX = """__version__ = "0.0"


def default_backend():
    return "gpu"


def devices():
    return ["FakeGpu 0"]
"""


def make_wheel(folder, name, files: dict):
    """A minimal pure-Python wheel `name`-1.0 holding `files` ({path in the wheel: text})."""
    dist = f"{name}-1.0.dist-info"
    entries = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
               f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as whl:
        for path, text in entries.items():
            whl.writestr(path, text)
        whl.writestr(f"{dist}/RECORD", "".join(f"{path},,\n" for path in [*entries, f"{dist}/RECORD"]))


def device_check(*args, cwd, timeout=180):
    cmd = [sys.executable, str(ROOT / "benchmark" / "device_check.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=timeout)


def rows(table: str, first: str) -> list:
    """The cells of the Markdown rows whose first cell is `first`."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    return [c for c in cells if c[0] == first]


def test_tiny_device_check_with_fake_scripts(tmp_path):
    scripts = {"fp3o_smac.py": 0.03, "mappo_smac.py": 0.01}  # update seconds per iteration; rollout 0.02 (0.04 on jax cpu)
    for name, update in scripts.items():
        (tmp_path / name).write_text(FAKE.format(rollout=0.02, update=update))
    (tmp_path / "test_fake_device.py").write_text(FAKE_TESTS)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "devcheck_probe", {"devcheck_probe.py": "", "jax/__init__.py": STAND_IN_JAX})
    out, site = tmp_path / "gpu.md", tmp_path / "site"
    flags = ["--budget-s", 60, "--out", out, "--wheels", wheels, "--site", site, "--modules", "devcheck_probe",
             "--tests", tmp_path / "test_fake_device.py", "--scripts", *(tmp_path / s for s in scripts)]
    proc = device_check("--tiny", *flags, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    report = out.read_text()
    assert report.startswith("# Device check (tiny sizes): ") and "jax's default backend: gpu" in report, report
    assert "Missing: devcheck_probe." in report and f"into `{site}` (on PYTHONPATH" in report, report
    assert "Still missing" not in report and (site / "devcheck_probe.py").is_file()
    assert re.search(r"test_fake_device\.py` \(\d+ s of \d+\): 1 passed, 1 skipped", report), report

    batch = 8 * 8  # --tiny: 8 environments x 8 steps
    for name, update in scripts.items():
        for jax, rollout in (("gpu", 0.02), ("cpu", 0.04)):
            (row,) = [r for r in rows(report, name) if r[1] == jax]
            _, _, envs, sps, roll, upd, share, peak = row
            assert envs == "8" and float(sps) == pytest.approx(batch / (rollout + update), abs=1), report
            assert (float(roll), float(upd)) == pytest.approx((rollout, update))
            assert share == f"{update / (rollout + update):.0%}"
            assert float(peak) > 10

    (side,) = rows(report, "2")  # two fp3o runs, the second 5 s late: each 64 steps per 0.05 s while both train
    aggregate, per_run, ratio, window = float(side[1]), float(side[2]), float(side[3].rstrip("x")), float(side[4])
    assert 2 * batch / 0.05 * 0.7 < aggregate <= 2 * batch / 0.05 * 1.05 and per_run == pytest.approx(aggregate / 2, abs=1)
    assert ratio == pytest.approx(aggregate / (batch / 0.05), abs=0.01) and window > 1, report

    for name in scripts:  # eval every iteration: the win rate is 38 / 40 >= 0.95 first at iteration 38
        (win,) = rows(report, name)[-1:]
        assert win[1] == str(38 * batch) and 38 * (0.02 + scripts[name]) < float(win[2]) < 30, report
        assert win[3] == f"0.950 ({38 * batch})"


BAD_FLAGS = [(["--iterations", 2, "--skip", 2], "--iterations (2) must exceed --skip (2)"),
             (["--scripts", "no_such_smac.py"], "no_such_smac.py"), (["--envs", 0], "must be positive")]


@pytest.mark.parametrize("flags, says", BAD_FLAGS)
def test_device_check_bad_flags_give_one_error_line(tmp_path, flags, says):
    proc = device_check("--tiny", "--out", tmp_path / "gpu.md", *flags, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and says in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr and not (tmp_path / "gpu.md").exists()
