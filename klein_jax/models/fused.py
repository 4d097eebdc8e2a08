"""Fused, shard-aligned projections of the FLUX.2 transformer (docs/sharding.md, "Fused projections").

A `GroupedLinear` stands for one or more diffusers linear layers ("parts") whose outputs (or inputs) are segments
of one axis: q | k | v, gate | value, q | k | v | gate | value, attn | mlp. Its kernel holds that axis as (G, C):
group g holds the g-th G-th of every segment side by side, so one matmul computes all parts and splitting the
group axis over the `model` mesh axis gives every device whole heads and whole MLP units of every segment (one
all-reduce per block, no all-to-all). Numerically it is the parts' matmul with its output columns (input rows)
permuted: every output element is the same dot product.

Parameters at rest (checkpoints, key maps, klein-convert's Orbax folders, exports, random init) keep the parts'
own 2-D kernels; `storage_shapes`, `from_storage` and `to_storage` convert at load and export
(klein_jax/loading/modules.py), so no on-disk format changes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, MutableMapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from klein_jax.models import matmul

Path = tuple
OUTPUT, INPUT = "output", "input"


def groups(num_heads: int, mlp_hidden_dim: int) -> int:
    """The group count of a transformer's fused kernels: it divides the heads and the MLP width, so any model axis
    that divides both (klein_jax.sharding.check_model_axis) divides it."""
    return math.gcd(num_heads, mlp_hidden_dim)


def grouped_order(segments: tuple[int, ...], num_groups: int) -> np.ndarray:
    """(G, C) int array: the parts' (concatenated) index of each grouped position."""
    offsets = np.cumsum((0, *segments[:-1]))
    return np.concatenate([np.arange(o, o + s).reshape(num_groups, s // num_groups)
                           for o, s in zip(offsets, segments)], axis=1)


class GroupedLinear(nnx.Module):
    """A bias-free linear layer whose output (side=OUTPUT: kernel (in, G, C)) or input (side=INPUT: kernel
    (G, C, out)) axis is the grouped concatenation of `segments`; `parts` name the diffusers layers it replaces
    (one segment each, or one part spanning all segments)."""

    def __init__(self, features: int, segments: tuple[int, ...], num_groups: int, parts: tuple[str, ...], *,
                 side: str = OUTPUT, dtype, param_dtype, rngs: nnx.Rngs):
        if any(s % num_groups for s in segments):
            raise ValueError(f"segments {segments} do not split into {num_groups} groups")
        if len(parts) not in (1, len(segments)):
            raise ValueError(f"{len(parts)} parts for {len(segments)} segments")
        self.features, self.segments, self.num_groups, self.parts = features, segments, num_groups, parts
        self.side, self.dtype = side, dtype
        width = sum(segments) // num_groups
        shape = (features, num_groups, width) if side == OUTPUT else (num_groups, width, features)
        fan_in = features if side == OUTPUT else sum(segments)
        self.grouped_kernel = nnx.Param(
            jax.random.normal(rngs.params(), shape, param_dtype) / np.sqrt(fan_in).astype(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """OUTPUT: (..., features) -> (..., G, C); INPUT: (..., G, C) -> (..., features)."""
        kernel = self.grouped_kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        contract = (x.ndim - 1,) if self.side == OUTPUT else (x.ndim - 2, x.ndim - 1)
        return matmul.dot_general(x, kernel, ((contract, tuple(range(len(contract)))), ((), ())))

    def split(self, y: jax.Array) -> tuple[jax.Array, ...]:
        """An OUTPUT layer's (..., G, C) -> one (..., G, segment/G) per segment."""
        return tuple(jnp.split(y, np.cumsum([s // self.num_groups for s in self.segments[:-1]]), axis=-1))

    # ------------------------------------------------------------------ the parts (diffusers layers)

    def part_features(self) -> dict[str, tuple[int, int]]:
        """part name -> (in, out) of the diffusers linear layer it stands for."""
        widths = self.segments if len(self.parts) > 1 else (sum(self.segments),)
        if self.side == OUTPUT:
            return {p: (self.features, w) for p, w in zip(self.parts, widths)}
        return {p: (w, self.features) for p, w in zip(self.parts, widths)}

    def _order(self) -> np.ndarray:
        return grouped_order(self.segments, self.num_groups).reshape(-1)

    def to_grouped(self, flat: jax.Array) -> jax.Array:
        """Activations on the grouped side in the parts' order (..., sum(segments)) -> (..., G, C)."""
        return jnp.take(flat, self._order(), axis=-1).reshape(*flat.shape[:-1], self.num_groups,
                                                               flat.shape[-1] // self.num_groups)

    def to_flat(self, grouped: jax.Array) -> jax.Array:
        """The inverse of to_grouped."""
        flat = grouped.reshape(*grouped.shape[:-2], grouped.shape[-2] * grouped.shape[-1])
        return jnp.take(flat, np.argsort(self._order()), axis=-1)

    # ------------------------------------------------------------------ storage (the parts' 2-D kernels)

    def storage_shapes(self) -> dict[str, tuple[int, int]]:
        """part name -> the shape of its flax kernel (in, out)."""
        return self.part_features()

    def fuse(self, kernels: list) -> jax.Array | np.ndarray:
        """The parts' kernels (numpy or jax arrays, in `parts` order) -> the grouped kernel (the same kind).

        Parts placed on a mesh split along their ungrouped side (the rows of OUTPUT parts, the columns of an INPUT
        part: klein_jax/sharding.py's storage rows) are fused shard by shard, each device its own rows, and the
        result moved onto its group split by one all-to-all, in one program per layer shape: no device ever
        holds a whole kernel."""
        layout = (self.features, self.segments, self.num_groups, self.side)
        if not any(isinstance(k, jax.Array) for k in kernels):
            return _fuse(kernels, *layout, np)
        sharding = kernels[0].sharding
        axis = self._ungrouped_split(sharding)
        if axis is None:
            return _fuser(*layout)(kernels)
        # One layer's all-to-all at a time: with dozens of collective programs in flight, CPU devices (which share
        # one thread pool) deadlock in the rendezvous (seen with 8 fake devices); a load waits on reading anyway.
        return _sharded_fuser(*layout, sharding.mesh, axis)(kernels).block_until_ready()

    def _ungrouped_split(self, sharding) -> str | None:
        """The mesh axis the parts' ungrouped side is split over (placed by the table, even of one device), else None."""
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
        axis = spec[0] if self.side == OUTPUT else spec[1]
        return axis if isinstance(axis, str) else None

    def unfuse(self, kernel) -> list:
        """The inverse of fuse: the parts' kernels."""
        inverse = np.argsort(self._order())
        if self.side == OUTPUT:
            flat = kernel.reshape(self.features, -1)[:, inverse]
        else:
            flat = kernel.reshape(-1, self.features)[inverse]
        if len(self.parts) == 1:
            return [flat]
        cuts = np.cumsum(self.segments[:-1])
        xp = jnp if isinstance(kernel, jax.Array) else np
        return list(xp.split(flat, cuts, axis=1 if self.side == OUTPUT else 0))


def _fuse(kernels: list, features: int, segments: tuple[int, ...], num_groups: int, side: str, xp):
    order = grouped_order(segments, num_groups).reshape(-1)
    flat = kernels[0] if len(kernels) == 1 else xp.concatenate(kernels, axis=1 if side == OUTPUT else 0)
    if side == OUTPUT:
        return flat[:, order].reshape(features, num_groups, -1)
    return flat[order].reshape(num_groups, -1, features)


@functools.lru_cache(maxsize=None)
def _fuser(features: int, segments: tuple[int, ...], num_groups: int, side: str):
    """One compiled fusion per layer shape (blocks share them); XLA places the result."""
    return jax.jit(lambda kernels: _fuse(kernels, features, segments, num_groups, side, jnp))


@functools.lru_cache(maxsize=None)
def _sharded_fuser(features: int, segments: tuple[int, ...], num_groups: int, side: str, mesh, axis: str):
    """The fusion of parts split along their ungrouped side over `axis`: each device permutes the columns (rows) of
    its own rows (columns), then the kernel is resharded from that side to the group axis."""
    n = mesh.shape[axis]
    local = functools.partial(_fuse, features=features // n, segments=segments, num_groups=num_groups, side=side,
                              xp=jnp)
    if side == OUTPUT:  # (in, out) split on in -> (in, G, C) split on in -> split on G
        parts, fused, target = P(axis, None), P(axis, None, None), P(None, axis, None)
    else:  # (in, out) split on out -> (G, C, out) split on out -> split on G
        parts, fused, target = P(None, axis), P(None, None, axis), P(axis, None, None)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(parts,), out_specs=fused)
    return jax.jit(mapped, out_shardings=jax.sharding.NamedSharding(mesh, target))


def grouped_layers(module) -> list[tuple[Path, GroupedLinear]]:
    """Every GroupedLinear of a module with its path."""
    return [(tuple(path), node) for path, node in nnx.iter_graph(module) if isinstance(node, GroupedLinear)]


def _storage_paths(path: Path, layer: GroupedLinear) -> list[Path]:
    return [(*path[:-1], part, "kernel") for part in layer.parts]


def _path_key(path: Path) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in path)


def _sorted(params: dict) -> dict:
    """In nnx's flat-state order (ints before names, each sorted), so that storage paths keep the order they had
    as separate layers (random_params draws in this order)."""
    return dict(sorted(params.items(), key=lambda item: _path_key(item[0])))


def storage_shapes(module, shapes: dict[Path, tuple]) -> dict[Path, tuple]:
    """path -> (shape, dtype) of a module's variables with every grouped kernel replaced by its parts' kernels."""
    layers = grouped_layers(module)
    for path, layer in layers:
        _, dtype = shapes.pop((*path, "grouped_kernel"))
        for part_path, shape in zip(_storage_paths(path, layer), layer.storage_shapes().values()):
            shapes[part_path] = (shape, dtype)
    return _sorted(shapes) if layers else shapes


def from_storage(module, params: MutableMapping[Path, object],
                 after_each: Callable[[], object] | None = None) -> MutableMapping[Path, object]:
    """Pops every grouped layer's parts' kernels from `params` and puts its grouped kernel in (fused at load);
    calls `after_each()` once each layer's parts are freed."""
    for path, layer in grouped_layers(module):
        parts = _storage_paths(path, layer)
        missing = [".".join(map(str, p)) for p in parts if p not in params]
        if missing:
            raise KeyError(f"no value for {', '.join(missing)}")
        params[(*path, "grouped_kernel")] = layer.fuse([params.pop(p) for p in parts])
        if after_each is not None:
            after_each()
    return params


def to_storage(module, params: MutableMapping[Path, object]) -> MutableMapping[Path, object]:
    """The inverse of from_storage (export), in storage order."""
    layers = grouped_layers(module)
    for path, layer in layers:
        for part_path, kernel in zip(_storage_paths(path, layer), layer.unfuse(params.pop((*path, "grouped_kernel")))):
            params[part_path] = kernel
    return _sorted(params) if layers else params


# ---------------------------------------------------------------------- adapters on a part


class GroupedDeltas:
    """A GroupedLinear plus deltas on its parts (LoRA / LoKr wrappers of a zero layer: each maps the part's input
    in diffusers order to its output in diffusers order), placed into the grouped layout."""

    def __init__(self, layer: GroupedLinear):
        self.layer, self.deltas = layer, {}

    def wrap(self, part: str, wrap: Callable) -> None:
        self.deltas[part] = wrap(self.deltas.get(part, _zero))

    def split(self, y: jax.Array) -> tuple[jax.Array, ...]:
        return self.layer.split(y)

    def __call__(self, x: jax.Array) -> jax.Array:
        layer = self.layer
        y = layer(x)
        if layer.side == INPUT:
            return y + self.deltas[layer.parts[0]](layer.to_flat(x))
        widths = layer.part_features()
        pieces = [self.deltas[p](x) if p in self.deltas else jnp.zeros((*x.shape[:-1], widths[p][1]), y.dtype)
                  for p in layer.parts]
        return y + layer.to_grouped(jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0])


def _zero(x: jax.Array) -> jax.Array:
    return jnp.zeros((), x.dtype)


def wrap_part(parent, name: str, wrap: Callable) -> None:
    """Replaces the linear layer `name` of `parent` by wrap(layer); a part of a GroupedLinear of `parent` (e.g. to_q of
    to_qkv) gets wrap(zero layer) as a delta placed into the grouped output."""
    layer = getattr(parent, name, None)
    if layer is not None and not isinstance(layer, (GroupedLinear, GroupedDeltas)):
        setattr(parent, name, wrap(layer))
        return
    for attr, value in vars(parent).items():
        grouped = value.layer if isinstance(value, GroupedDeltas) else value
        if isinstance(grouped, GroupedLinear) and name in grouped.parts:
            if not isinstance(value, GroupedDeltas):
                value = GroupedDeltas(grouped)
                setattr(parent, attr, value)
            value.wrap(name, wrap)
            return
    raise AttributeError(f"{type(parent).__name__} has no linear layer {name!r}")
