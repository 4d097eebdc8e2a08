"""Applying low-rank factors inside a compiled program: y = x @ W + ((x @ down) * weights) @ up.

The factors are program inputs, so one program serves every adapter of a `LoraLayout`. `apply_lora` swaps each
target nnx.Linear of a transformer merged inside the traced function for a `LoraLinear` around it: the module code
is untouched, and a program without a layout never calls this (its numerics are those of the plain model).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from klein_jax.lora.lokr import LokrLinear
from klein_jax.models.fused import wrap_part
from klein_jax.models.matmul import matmul


class LoraLayout(NamedTuple):
    """The static shape of a program's LoRA inputs: target layers (path, in, out) and the padded rank."""

    targets: tuple[tuple[str, int, int], ...]
    rank: int
    lokr: tuple = ()  # LokrTerm per Kronecker delta (klein_jax/lora/lokr.py)

    def describe(self) -> str:
        return f"lora rank={self.rank} layers={len(self.targets)}" + (f" lokr={len(self.lokr)}" if self.lokr else "")


class LoraLinear:
    """A linear layer plus the low-rank term; `weights` (R,) scales each rank column (its adapter's weight)."""

    def __init__(self, base, down: jax.Array, up: jax.Array, weights: jax.Array):
        self.base, self.down, self.up, self.weights = base, down, up, weights

    def __call__(self, x: jax.Array) -> jax.Array:
        low = matmul(x, self.down.astype(x.dtype)) * self.weights.astype(x.dtype)  # (..., in) -> (..., R)
        return self.base(x) + matmul(low, self.up.astype(x.dtype))  # (..., R) -> (..., out)


def _parent(module, path: str):
    *parents, name = path.split(".")
    for part in parents:
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module, name


def apply_lora(transformer, layout: LoraLayout, inputs: dict) -> None:
    """Wraps each target layer of `transformer` (a module merged inside the traced function) in place.

    inputs: {"down": (in, R) per target, "up": (R, out) per target, "weights": (R,)}, in layout order;
    with LoKr terms also {"lokr": (w1, w2) per term, "lokr_weights": (terms,)}.
    """
    for (path, _, _), down, up in zip(layout.targets, inputs["down"], inputs["up"], strict=True):
        parent, name = _parent(transformer, path)  # a part of a fused projection takes its delta (models/fused.py)
        wrap_part(parent, name, lambda layer: LoraLinear(layer, down, up, inputs["weights"]))
    for i, (term, (w1, w2)) in enumerate(zip(layout.lokr, inputs.get("lokr", ()), strict=True)):
        parent, name = _parent(transformer, term.path)
        wrap_part(parent, name, lambda layer: LokrLinear(layer, term, w1, w2, inputs["lokr_weights"][i]))
