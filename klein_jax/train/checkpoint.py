"""Orbax checkpoints of a training run: the factors, the optimiser state, the step and the data order."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"


def _dir(out: pathlib.Path, step: int) -> pathlib.Path:
    return (out / CHECKPOINTS / f"step_{step:08d}").absolute()


def save_checkpoint(out: pathlib.Path, step: int, lora, opt_state, order: np.ndarray) -> pathlib.Path:
    """Writes out/checkpoints/step_<step> (the state after `step` updates)."""
    path = _dir(out, step)
    state = {"lora": lora, "opt_state": opt_state, "step": np.array(step, np.int64), "order": np.asarray(order)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state, force=True)
    return path


def latest_step(out: pathlib.Path) -> int | None:
    """The step of the newest complete checkpoint under out/checkpoints, or None."""
    steps = [int(p.name.split("_")[1]) for p in (out / CHECKPOINTS).glob("step_*") if p.name.split("_")[1].isdigit()]
    return max(steps, default=None)


def restore_checkpoint(out: pathlib.Path, step: int, lora, opt_state, order: np.ndarray) -> tuple:
    """(lora, opt_state, order) restored into the structure of the given ones."""
    target = {"lora": lora, "opt_state": opt_state, "step": np.array(step, np.int64), "order": np.asarray(order)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(_dir(out, step), abstract)
    if int(state["step"]) != step:
        raise ValueError(f"checkpoint {_dir(out, step)} holds step {int(state['step'])}")
    return state["lora"], state["opt_state"], np.asarray(state["order"])
