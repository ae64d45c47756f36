"""Reading what a run leaves behind, and comparing it: TensorBoard scalars and checkpoints.

- `read_scalars(run_dir)`: {tag: [(step, value), ...]}; `assert_same_scalars(a, b)`: the same logged values.
- `find_checkpoint(cwd)`, `load_checkpoint(path)`: the run's `checkpoint.pt`.
- `assert_same_training_state(a, b, ...)`: two checkpoints hold the same training state, bit for bit (the one
  comparison of every exact-resume test); `assert_same_tree` and `assert_same_state_dict` below it.
"""
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

TIME_TAGS = {"charts/SPS", "charts/rollout_time", "charts/update_time"}  # wall-clock: differ between identical runs


def read_scalars(path) -> dict:
    """{tag: [(step, value), ...]} of every scalar in the TensorBoard event files of a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_scalars(a: dict, b: dict, tags=None):
    """The same logged values (all tags but the wall-clock ones, or just `tags`)."""
    if tags is None:
        assert a.keys() == b.keys()
        tags = set(a) - TIME_TAGS
    for tag in tags:
        assert a[tag] == b[tag], tag


def find_checkpoint(cwd, name: str = "checkpoint.pt") -> Path:
    """The single `runs/*/checkpoint.pt` under `cwd`."""
    found = sorted((Path(cwd) / "runs").glob(f"*/{name}"))
    assert len(found) == 1, f"expected one {name} under {cwd}/runs, found {found}"
    return found[0]


def load_checkpoint(path) -> dict:
    """A checkpoint file, or the single `runs/*/checkpoint.pt` under a folder."""
    path = Path(path)
    return torch.load(find_checkpoint(path) if path.is_dir() else path, map_location="cpu", weights_only=False)


def assert_same_state_dict(a: dict, b: dict, what: str = "state dict"):
    """Bit-for-bit equality of two state dicts (same keys, shapes, dtypes and values)."""
    assert a.keys() == b.keys(), f"{what}: different keys"
    for k in a:
        x, y = a[k], b[k]
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}[{k}]: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        assert x.equal(y), f"{what}[{k}] differs (max abs diff {(x.double() - y.double()).abs().max().item():.3g})"


def assert_same_tree(a, b, what: str):
    """Bit-for-bit equality of two nested values: dicts (same keys), lists and tuples (same lengths), tensors and arrays
    (same shapes, dtypes and values), and anything else by ==."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{what}: different keys"
        for k in a:
            assert_same_tree(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{what}: different lengths"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{what}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b}"
        assert a.equal(b), f"{what} differs"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b}"
        assert np.array_equal(a, b), f"{what} differs"
    else:
        assert type(a) is type(b) and a == b, f"{what}: {a!r} vs {b!r}"


def assert_same_training_state(a: dict, b: dict, iteration: Optional[int] = None, global_step: Optional[int] = None,
                               extra: Sequence[str] = ()):
    """Bit for bit: networks, optimisers (Adam's moments and step counts, the settings), value normaliser, and the
    checkpoint's `extra` fields (a script's normalisers, environment state, next observation, ...); the counters equal,
    and equal to `iteration` and `global_step` when given."""
    for key in ("actor", "critic", "value_norm", "actor_opt", "critic_opt", *extra):
        assert_same_tree(a[key], b[key], key)
    assert (a["iteration"], a["global_step"]) == (b["iteration"], b["global_step"])
    if iteration is not None:
        assert (a["iteration"], a["global_step"]) == (iteration, global_step)
