"""Set-up and fixtures of the tests of the single-file scripts (fp3o_smac.py, mappo_smac.py, happo_smac.py, ...).

- `ROOT`: the repository root; it is put on sys.path so that tests can `import fp3o_smac` (the scripts have no
  import-time side effects) and `import harness` (this folder is on it: pytest's rootdir-relative imports). The
  `repo_root` fixture returns it too.
- The environment of the suite and of the scripts it starts (`script_env`): a persistent JAX compilation cache, CUDA
  hidden (ON_DEVICE: the devices the suite was started with), one torch thread, wandb offline.
- `smac_runs`: the short SMAX runs that the end-to-end tests of the SMAC scripts share.

The helpers live in modules named for what they are: harness.py (running scripts: subprocesses, in process, bad
input), readers.py (TensorBoard scalars, checkpoints and their comparison), references.py (reference algorithms and
hand-made batches), video.py (evaluation videos).
"""
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# JAX reads these when it is first imported (lazily, by the SMAX wrappers), so in-process tests use the cache too.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"jax-cache-pytest-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The suite tests the CPU path whatever the machine has: CUDA is hidden from this process (torch and jax initialise it
# lazily, after this) and from the scripts it starts. A test about the device gives run_script `env=ON_DEVICE`: the
# devices the suite was started with (None: CUDA_VISIBLE_DEVICES was unset, and script_env removes it).
ON_DEVICE = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (already importable: it is on sys.path)."""
    return ROOT


@pytest.fixture(scope="session")
def smac_runs(tmp_path_factory):
    """`smac_runs(script)`: the short SMAX runs of a SMAC script that the end-to-end tests share (harness.smac_jobs),
    {"base": their folder, name: (CompletedProcess, cwd)}; started on first use, two processes at a time."""
    from harness import run_scripts, smac_jobs

    done = {}

    def runs(script: str) -> dict:
        if script not in done:
            base = tmp_path_factory.mktemp(script)
            jobs = smac_jobs(script, base)
            results = run_scripts(jobs)
            print(f"{script} run times: " + ", ".join(f"{n} {p.duration:.1f}s" for n, p in results.items()), file=sys.stderr)
            done[script] = {"base": base, **{job.name: (results[job.name], job.cwd) for job in jobs}}
        return done[script]

    return runs


def script_env(extra: Optional[dict] = None) -> dict:
    """The environment of a script that a test starts: this one's, with `extra` on top (a value None unsets)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "offline")  # never reach the network, even if a test forgets
    env.setdefault("WANDB_SILENT", "true")
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)  # e.g. ON_DEVICE's unset CUDA_VISIBLE_DEVICES
        else:
            env[key] = value
    return env
