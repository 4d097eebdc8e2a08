"""The adapters a pipeline holds, which are active, and their padded device factors (one copy per adapter set).

A program's LoRA inputs have one `LoraLayout`: the union of the layers any loaded adapter targets, and a rank
padded to a power of two that holds the largest adapter (or the adapters of a `set_adapters` combination side by
side). Padding is zeros, so every adapter of a layout runs in the same compiled program; adapter weights and a
request's `lora_scale` are a (R,) input, so changing them copies nothing. Loading an adapter that targets new
layers or has a larger rank changes the layout: programs for it compile on first use (`KleinPipeline.compile`
compiles them ahead of time for the adapters loaded by then). A LoKr adapter's Kronecker factors (lokr.py) are in
the layouts of the combinations that use it only: LoKr adapters of the same factor shapes share a program.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from klein_jax.lora.adapter import LoraAdapter, build_adapter
from klein_jax.lora.apply import LoraLayout
from klein_jax.lora.files import read_lora_file
from klein_jax.lora.formats import to_diffusers_modules
from klein_jax.lora.lokr import build_lokr_terms, is_lokr, lokr_modules
from klein_jax.models.fused import GroupedLinear
from klein_jax.request import check_lora_scale

log = logging.getLogger(__name__)

Combination = tuple[tuple[str, float], ...]  # (adapter name, weight) pairs; () is no adapter


def linear_targets(transformer) -> dict[str, tuple[int, int]]:
    """Every nnx.Linear of a transformer and every diffusers layer a fused projection stands for (its parts,
    klein_jax/models/fused.py): dotted path -> (in, out), in module order."""
    targets = {}
    for path, node in nnx.iter_graph(transformer):
        if isinstance(node, nnx.Linear):
            targets[".".join(map(str, path))] = (node.in_features, node.out_features)
        elif isinstance(node, GroupedLinear):
            targets.update({".".join(map(str, (*path[:-1], part))): shape
                            for part, shape in node.part_features().items()})
    return targets


def _rank_bucket(rank: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(rank, 1))))


class LoraAdapters:
    """Loaded adapters by name, the active combination, and device inputs per adapter set (cached)."""

    def __init__(self, targets: Mapping[str, tuple[int, int]], dtype, placement=None):
        """placement: where the factors live (the programs' replicated sharding); None: the default device."""
        self.targets = dict(targets)
        self.dtype = dtype
        self.placement = placement
        self.adapters: dict[str, LoraAdapter] = {}
        self.active: Combination = ()
        self.default_scales: dict[str, float] = {}  # a request's lora_scale when it gives none
        self._device: dict[tuple[str, ...], tuple[LoraLayout, dict]] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def load(self, source: str | os.PathLike, adapter_name: str | None = None, *,
             weight_name: str | None = None, default_scale: float = 1.0) -> str:
        """Reads, converts and checks an adapter file; returns its name (diffusers' default: default_<n>).

        default_scale: the lora_scale of a request that names this adapter without one (`--lora NAME=PATH:SCALE`).
        """
        default_scale = check_lora_scale(default_scale)
        name = f"default_{len(self.adapters)}" if adapter_name is None else adapter_name
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} is already in use; pick another or unload_lora_weights() first")
        file = read_lora_file(source, weight_name)
        try:
            if is_lokr(file.tensors):
                modules, layout = lokr_modules(file.tensors)
                try:
                    terms, factors = build_lokr_terms(modules, file.metadata, self.targets)
                except ValueError as e:
                    raise ValueError(f"LoKr adapter {name!r} does not fit this transformer: {e}") from None
                adapter = LoraAdapter(name, {}, str(file.path), tuple(terms), tuple(factors))
                layout = f"LoKr, {layout}"
            else:
                modules, layout = to_diffusers_modules(file.tensors)
                adapter = build_adapter(name, modules, file.metadata, self.targets, source=str(file.path))
        except ValueError as e:
            raise ValueError(f"{file.path}: {e}") from None
        self.adapters[name] = adapter
        self.default_scales[name] = default_scale
        self.active = ((name, 1.0),)  # as diffusers: the adapter just loaded is the active one
        self._device.clear()  # the layout (union of layers, rank) may have changed
        log.info("loaded LoRA adapter %r (%s layout, %d layers, rank %d) from %s", name, layout,
                 len(adapter.factors) + len(adapter.lokr), adapter.rank, file.path)
        return name

    def combination(self, names: str | Sequence[str], weights=None) -> Combination:
        """Checked (name, weight) pairs (diffusers' set_adapters arguments: one weight, or one per name)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"unknown LoRA adapter {', '.join(map(repr, unknown))}; loaded: "
                             f"{', '.join(self.adapters) or 'none'}")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat: {names}")
        if weights is None or isinstance(weights, (int, float)):
            weights = [1.0 if weights is None else weights] * len(names)
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} adapter weights given for {len(names)} adapters")
        return tuple((n, 1.0 if w is None else check_lora_scale(w, limit=None)) for n, w in zip(names, weights))

    def choose(self, name: str | None, scale=None) -> Combination:
        """A request's adapters: `name` at `scale` (default: the adapter's default scale; checked as the API's
        lora_scale), or the active ones when name is None."""
        if name is None:
            if scale is not None:
                raise ValueError("lora_scale was given without lora; name an adapter or leave lora_scale out")
            return self.active
        if not isinstance(name, str) or name not in self.adapters:
            raise ValueError(f"lora {name!r} is not a loaded adapter; available: {', '.join(self.adapters) or 'none'}")
        return ((name, self.default_scales[name] if scale is None else check_lora_scale(scale)),)

    def set_active(self, names: str | Sequence[str], weights=None) -> None:
        self.active = self.combination(names, weights)

    def unload(self) -> None:
        self.adapters.clear()
        self.default_scales.clear()
        self.active = ()
        self._device.clear()

    # ----------------------------------------------------------------------------------- program inputs

    def layout(self, names: Sequence[str] = ()) -> LoraLayout:
        """The layout of a set of adapters: every loaded adapter's layers; rank >= the largest adapter's."""
        used = {path for adapter in self.adapters.values() for path in adapter.factors}
        targets = tuple((path, *shape) for path, shape in self.targets.items() if path in used)
        largest = max((a.rank for a in self.adapters.values()), default=1)
        lokr = tuple(term for n in names for term in self.adapters[n].lokr)  # LoKr: the combination's own terms
        return LoraLayout(targets, _rank_bucket(max(largest, sum(self.adapters[n].rank for n in names))), lokr)

    def inputs(self, combination: Combination) -> tuple[LoraLayout, dict]:
        """(layout, program inputs) of a combination: adapter k owns columns [offset_k, offset_k + rank_k)."""
        names = tuple(n for n, _ in combination)
        if names not in self._device:
            self._device[names] = self._factors(names)
        layout, factors = self._device[names]
        weights = np.zeros(layout.rank, np.float32)
        offset = 0
        for name, weight in combination:
            rank = self.adapters[name].rank
            weights[offset:offset + rank] = weight
            offset += rank
        if layout.lokr:
            factors = {**factors, "lokr_weights": np.array([w for n, w in combination
                                                            for _ in self.adapters[n].lokr], np.float32)}
        return layout, {**factors, "weights": weights}

    def _factors(self, names: tuple[str, ...]) -> tuple[LoraLayout, dict]:
        layout = self.layout(names)
        downs, ups = [], []
        for path, fan_in, fan_out in layout.targets:
            down = np.zeros((fan_in, layout.rank), np.float32)
            up = np.zeros((layout.rank, fan_out), np.float32)
            offset = 0
            for name in names:
                adapter = self.adapters[name]
                if path in adapter.factors:
                    d, u = adapter.factors[path]
                    down[:, offset:offset + d.shape[1]] = d
                    up[offset:offset + d.shape[1]] = u
                offset += adapter.rank
            downs.append(down.astype(self.dtype))
            ups.append(up.astype(self.dtype))
        factors = {"down": tuple(downs), "up": tuple(ups)}
        if layout.lokr:
            factors["lokr"] = tuple((w1.astype(self.dtype), w2.astype(self.dtype))
                                    for n in names for w1, w2 in self.adapters[n].lokr_factors)
        return layout, jax.device_put(factors, self.placement)
