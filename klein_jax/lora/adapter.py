"""One loaded adapter: diffusers module names -> our transformer's linear layers, PEFT scaling folded in.

peft's LoRA layer adds `lora_B(lora_A(x)) * scaling` with scaling = lora_alpha / r (alpha / sqrt(r) with
use_rslora). diffusers takes (r, lora_alpha, rank_pattern, alpha_pattern, use_rslora) from the file's
`lora_adapter_metadata` when it has one, and otherwise sets alpha = r for every module (scaling 1;
peft_utils.get_peft_kwargs). The scaling is folded into `up` here, in float32.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from klein_jax.lora.formats import Factors, fit_problems

# diffusers' attn.to_out is a ModuleList (Linear, Dropout) in double-stream blocks: to_out.0 there, to_out here.
_TO_OUT = re.compile(r"(transformer_blocks\.\d+\.attn\.to_out)\.0")


@dataclasses.dataclass(frozen=True, eq=False)
class LoraAdapter:
    """An adapter: our linear layer path -> (down (in, r), up (r, out) with the PEFT scaling folded in), float32;
    a LoKr adapter has Kronecker terms instead (klein_jax/lora/lokr.py: LokrTerm and (w1, w2) per term)."""

    name: str
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str = ""
    lokr: tuple = ()
    lokr_factors: tuple = ()

    @property
    def rank(self) -> int:
        """The largest LoRA rank of any layer (0 for LoKr)."""
        return max((down.shape[1] for down, _ in self.factors.values()), default=0)


def our_path(module: str) -> str:
    """diffusers module name -> our dotted module path."""
    return _TO_OUT.sub(r"\1", module)


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """peft's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def peft_scaling(module: str, rank: int, metadata: Mapping | None) -> float:
    """lora_alpha / r of one module (diffusers module name), from the metadata's PEFT config; 1 without one."""
    if not metadata:
        return 1.0
    r = _pattern_value(metadata.get("rank_pattern"), module, metadata.get("r", rank))
    if r != rank:
        raise ValueError(f"{module}: the file's metadata says rank {r}, its lora_A has rank {rank}")
    alpha = _pattern_value(metadata.get("alpha_pattern"), module, metadata.get("lora_alpha", r))
    return alpha / math.sqrt(r) if metadata.get("use_rslora") else alpha / r


def build_adapter(name: str, modules: Mapping[str, Factors], metadata: Mapping | None,
                  targets: Mapping[str, tuple[int, int]], source: str = "") -> LoraAdapter:
    """Validates every module against `targets` (our path -> (in, out) of each linear layer) and builds the adapter.

    One ValueError lists every module the transformer lacks and every shape that does not fit.
    """
    if metadata:  # diffusers' pipeline metadata is prefixed with the component: "transformer.lora_alpha"
        metadata = {k.removeprefix("transformer."): v for k, v in metadata.items()}
    missing, bad, factors = [], [], {}
    for module, (down, up) in modules.items():
        path = our_path(module)
        if path not in targets:
            missing.append(module)
            continue
        fan_in, fan_out = targets[path]
        rank = down.shape[0]
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != fan_in or up.shape != (fan_out, rank):
            bad.append(f"{module}: lora_A {list(down.shape)}, lora_B {list(up.shape)}; the layer is "
                       f"{fan_in} -> {fan_out}, so lora_A must be [r, {fan_in}] and lora_B [{fan_out}, r]")
            continue
        scaling = peft_scaling(module, rank, metadata)
        factors[path] = (np.ascontiguousarray(down.T, np.float32), np.ascontiguousarray((up * scaling).T, np.float32))
    if problems := fit_problems(missing, bad):
        raise ValueError(f"LoRA adapter {name!r} does not fit this transformer: " + "; ".join(problems))
    return LoraAdapter(name, factors, source)
