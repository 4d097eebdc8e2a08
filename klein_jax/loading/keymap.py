"""The one applier of key-map tables: source tensors (torch layout) -> flat Flax parameter dict.

A table is a tuple of `KeyRule`s (see klein_jax/loading/keymaps/). Every source key must match exactly one rule,
every target must exist in the model with the right shape, and every model parameter must be set.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

Path = tuple[Any, ...]  # a path into an nnx state, e.g. ("transformer_blocks", 0, "attn", "to_q", "kernel")


class WeightMappingError(ValueError):
    """Weights that do not fit the model: unknown, missing or mis-shaped keys, each listed."""


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> flax (in, out)."""
    return w.T


def conv2d(w: np.ndarray) -> np.ndarray:
    """torch Conv2d OIHW -> flax HWIO."""
    return w.transpose(2, 3, 1, 0)


def same(w: np.ndarray) -> np.ndarray:
    return w


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One tensor family: `source` regex (full match) -> `target` dotted path template(s).

    `target` may use regex back-references (\\1). With several targets, `transform` returns one array
    per target (a split). A rule whose target is None drops the tensor on purpose (unused weights).
    """

    source: str
    target: str | tuple[str, ...] | None
    transform: Callable[[np.ndarray], Any] = same

    def __post_init__(self):
        object.__setattr__(self, "_regex", re.compile(self.source))


def _to_path(dotted: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def _format(path: Path) -> str:
    return ".".join(str(p) for p in path)


def first_ten(items: list[str]) -> str:
    """The first ten items joined by "; ", then how many more there are (for errors that list keys)."""
    return "; ".join(items[:10]) + (f"; ... ({len(items) - 10} more)" if len(items) > 10 else "")


def _raise(kind: str, items: list[str]) -> None:
    raise WeightMappingError(f"{kind} ({len(items)}): {first_ten(items)}")


def map_weights(
    tensors: Mapping[str, np.ndarray],
    rules: Iterable[KeyRule],
    expected: Mapping[Path, tuple[tuple[int, ...], Any]],
    *,
    dtype: Any = None,
    on_tensor: Callable[[str], None] | None = None,
    place: Callable[[Path, np.ndarray, Any], Any] | None = None,
) -> dict[Path, np.ndarray]:
    """Applies `rules` to `tensors`, tensor by tensor; returns {path: array} covering `expected` exactly.

    Args:
      tensors: source name -> array (torch layout); read lazily, one at a time.
      expected: path -> (shape, dtype) of every model parameter (from `expected_params`).
      dtype: cast each tensor to this dtype as soon as it is read (None keeps the model's dtype).
      on_tensor: called with each source key after it is mapped (progress).
      place: place(path, array, dtype) -> the stored value instead of a host copy cast to dtype (e.g. device
        shards sliced from the memory-mapped tensor, klein_jax.sharding.put).
    """
    rules = tuple(rules)
    out: dict[Path, np.ndarray] = {}
    unexpected, ambiguous, bad_shape, duplicate = [], [], [], []
    for key in tensors:
        matches = [(r, m) for r in rules if (m := r._regex.fullmatch(key))]
        if not matches:
            unexpected.append(key)
            continue
        if len(matches) > 1:
            ambiguous.append(f"{key} matches {[r.source for r, _ in matches]}")
            continue
        rule, m = matches[0]
        if rule.target is None:
            continue
        targets = (rule.target,) if isinstance(rule.target, str) else rule.target
        arrays = rule.transform(np.asarray(tensors[key]))
        arrays = (arrays,) if isinstance(rule.target, str) else tuple(arrays)
        for template, array in zip(targets, arrays, strict=True):
            path = _to_path(m.expand(template))
            if path not in expected:
                unexpected.append(f"{key} (-> {_format(path)}, which the model does not have)")
                continue
            want_shape, want_dtype = expected[path]
            if tuple(array.shape) != tuple(want_shape):
                bad_shape.append(f"{key}: checkpoint shape {list(array.shape)} after layout change, "
                                 f"model expects {list(want_shape)} at {_format(path)}")
                continue
            if path in out:
                duplicate.append(f"{_format(path)} (again from {key})")
                continue
            want_dtype = dtype or want_dtype
            out[path] = np.asarray(array, dtype=want_dtype) if place is None else place(path, array, want_dtype)
        if on_tensor is not None:
            on_tensor(key)
    if ambiguous:
        _raise("keys matching several rules", ambiguous)
    if unexpected:
        _raise("unexpected keys", unexpected)
    if bad_shape:
        _raise("shape mismatches", bad_shape)
    if duplicate:
        _raise("parameters set twice", duplicate)
    missing = [f"{_format(p)} (shape {list(s)})" for p, (s, _) in expected.items() if p not in out]
    if missing:
        _raise("missing weights", missing)
    return out
