"""Applying low-rank factors inside a compiled program: y = x @ W + ((x @ down) * weights) @ up.

The factors are program inputs, so one program serves every adapter of a `LoraLayout`. `apply_lora` swaps each
target nnx.Linear of a transformer merged inside the traced function for a `LoraLinear` around it: the module code
is untouched, and a program without a layout never calls this (its numerics are those of the plain model).
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class LoraLayout(NamedTuple):
    """The static shape of a program's LoRA inputs: target layers (path, in, out) and the padded rank."""

    targets: tuple[tuple[str, int, int], ...]
    rank: int

    def describe(self) -> str:
        return f"lora rank={self.rank} layers={len(self.targets)}"


class LoraLinear:
    """A linear layer plus the low-rank term; `weights` (R,) scales each rank column (its adapter's weight)."""

    def __init__(self, base, down: jax.Array, up: jax.Array, weights: jax.Array):
        self.base, self.down, self.up, self.weights = base, down, up, weights

    def __call__(self, x: jax.Array) -> jax.Array:
        low = (x @ self.down.astype(x.dtype)) * self.weights.astype(x.dtype)  # (..., in) -> (..., R)
        return self.base(x) + low @ self.up.astype(x.dtype)  # (..., R) -> (..., out)


def _parent(module, path: str):
    *parents, name = path.split(".")
    for part in parents:
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module, name


def apply_lora(transformer, layout: LoraLayout, inputs: dict) -> None:
    """Wraps each target layer of `transformer` (a module merged inside the traced function) in place.

    inputs: {"down": (in, R) per target, "up": (R, out) per target, "weights": (R,)}, in layout order.
    """
    for (path, _, _), down, up in zip(layout.targets, inputs["down"], inputs["up"], strict=True):
        parent, name = _parent(transformer, path)
        setattr(parent, name, LoraLinear(getattr(parent, name), down, up, inputs["weights"]))
