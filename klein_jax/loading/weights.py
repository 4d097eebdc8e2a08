"""A diffusers-layout component's tensors -> our parameters, through its key map (klein_jax/loading/keymaps/)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jax.sharding import Sharding

from klein_jax.loading.keymap import Path, WeightMappingError, map_weights
from klein_jax.loading.keymaps.bfl import BFLTransformer
from klein_jax.loading.modules import KINDS, abstract_module, expected_params, fill_module
from klein_jax.loading.source import Source
from klein_jax.sharding import put


def _copying(transform: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], Any]:
    """`transform`, then a C-contiguous copy of each result: the memory map is released at once and the saved
    array needs no further copy (a transposed view would be copied again while writing)."""
    def copy(w: np.ndarray):
        out = transform(w)
        if isinstance(out, tuple):
            return tuple(np.array(x, order="C") for x in out)
        return np.array(out, order="C")
    return copy


def check_component(source: Source, name: str, config: Any, dtype: Any) -> int:
    """Dry run of the key map on shapes only (no data read); returns how many tensors the conversion reads."""
    expected = expected_params(abstract_module(name, config, dtype))
    count = 0

    def seen(_key: str) -> None:
        nonlocal count
        count += 1

    tensors = source.tensors(name, shapes_only=True)
    try:
        map_weights(tensors, KINDS[name].rules(config), {p: (shape, np.bool_) for p, (shape, _) in expected.items()},
                    dtype=np.bool_, on_tensor=seen)
    except WeightMappingError as e:
        message = f"{name}: {e}"
        if isinstance(tensors, BFLTransformer):
            message = tensors.annotate(message)
        raise WeightMappingError(message) from None
    return count


def component_params(name: str, config: Any, tensors: Mapping[str, np.ndarray], dtype: Any, *,
                     on_tensor: Callable[[str], None] | None = None,
                     shardings: Mapping[Path, Sharding] | None = None) -> dict[Path, Any]:
    """Diffusers-named `tensors` of component `name` -> its parameters (path -> host array in the module's dtypes),
    read and cast tensor by tensor through the component's key map.

    With `shardings` (path -> sharding) each parameter is a device array instead: every device reads and casts only
    its own slice of the memory-mapped tensor (klein_jax.sharding.put), so no weight is whole in host memory.
    """
    expected = expected_params(abstract_module(name, config, dtype))
    if shardings is None:
        rules = tuple(dataclasses.replace(r, transform=_copying(r.transform)) for r in KINDS[name].rules(config))
        return map_weights(tensors, rules, expected, on_tensor=on_tensor)

    def place(path: Path, array: np.ndarray, dtype: Any):
        return put(array, shardings[path], cast=lambda piece: np.asarray(piece, dtype=dtype))

    return map_weights(tensors, KINDS[name].rules(config), expected, on_tensor=on_tensor, place=place)


def load_component(name: str, config: Any, tensors: Mapping[str, np.ndarray], dtype: Any, *,
                   shardings: Mapping[Path, Sharding] | None = None):
    """The module of component `name`, built abstractly and filled from its diffusers-named `tensors` (placed
    shard by shard with `shardings`, see component_params)."""
    params = component_params(name, config, tensors, dtype, shardings=shardings)
    return fill_module(abstract_module(name, config, dtype), params)
