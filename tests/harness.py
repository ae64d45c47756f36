"""Running the top-level scripts from tests.

- `run_in_process(script, *args, cwd=..., monkeypatch=..., capfd=...)`: the script as `__main__` in this process, as
  `python script args...` would run it (argv, cwd and environment patched for the call), for checks that end before
  anything trains (bad input): no interpreter start and no imports of torch, jax, ... per call.
- `assert_one_clear_error(proc, mentions)`: what every bad input must give, from a subprocess or from `run_in_process`.
"""
import runpy
import subprocess
import sys
from typing import Optional

from conftest import ROOT, describe


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
    tyro's box (a few lines), which says what in the command line it could not parse. `mentions` is named in the line or the box."""
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and [line for line in lines if line.startswith("error: ")] == [lines[-1]], describe(proc)
    assert len(lines) <= 10 and all(line.startswith(TYRO_BOX) for line in lines[:-1]), describe(proc)
    if mentions is not None:
        assert mentions in proc.stderr, describe(proc)
