"""LoKr adapters (Kronecker-product deltas) as diffusers reads them for FLUX.2: port of lora_conversion_utils.py's
`_convert_non_diffusers_flux2_lokr_to_diffusers` (BFL / ai-toolkit), `_convert_lycoris_flux2_lokr_to_diffusers`
(LyCORIS), `_convert_non_diffusers_lokr_to_diffusers` (bare diffusers names), `_bake_lokr_alpha_`, and of peft's
LoKr Linear layer (peft/tuners/lokr/layer.py).

peft adds x @ (scaling * kron(w1, w2))^T with w1 (a, c), w2 (b, d), out = a*b, in = c*d; w1 or w2 may be stored
as a low-rank pair (w1_a @ w1_b). Here the factors are program inputs and the delta is never built:
x (..., c*d) -> (..., c, d), contracted with w2 then w1 -> (..., a, b) -> (..., a*b).
BFL files put one Kronecker delta on a fused qkv projection (diffusers fuses the model's q/k/v for them): each of
our q/k/v parts (klein_jax/models/fused.py places a part's delta into the fused kernel's layout) takes its rows
of the fused delta (only w1's rows when they align, else a slice of the whole delta).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from klein_jax.lora.adapter import _pattern_value, our_path
from klein_jax.loading.keymap import first_ten
from klein_jax.lora.formats import BFL_MODULES, _rename, fit_problems

_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_KEY = re.compile(rf"(.+)\.({'|'.join(_SUFFIXES)}|alpha)")
# diffusers' fused projections (Attention.fuse_projections: rows q | k | v) -> the layers they fuse.
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
# diffusers' _LYCORIS_FLUX2_SUBPATH_MAP: LyCORIS's underscored sub-paths -> dotted ones.
LYCORIS_SUBPATHS = {
    "attn_to_q": "attn.to_q", "attn_to_k": "attn.to_k", "attn_to_v": "attn.to_v", "attn_to_out_0": "attn.to_out.0",
    "attn_to_add_out": "attn.to_add_out", "attn_add_q_proj": "attn.add_q_proj", "attn_add_k_proj": "attn.add_k_proj",
    "attn_add_v_proj": "attn.add_v_proj", "attn_to_qkv_mlp_proj": "attn.to_qkv_mlp_proj", "attn_to_out": "attn.to_out",
    "ff_linear_in": "ff.linear_in", "ff_linear_out": "ff.linear_out", "ff_context_linear_in": "ff_context.linear_in",
    "ff_context_linear_out": "ff_context.linear_out",
}
_LYCORIS = re.compile(r"lycoris_((?:single_)?transformer_blocks)_(\d+)_(.+)")

Kron = tuple[np.ndarray, np.ndarray]  # (w1 (a, c), w2 (b, d)), float32


class LokrTerm(NamedTuple):
    """The static part of one Kronecker delta on one layer: w1 (a, c), w2 (b, d); the layer takes the delta's
    columns [start, stop) (a part of a fused delta: q, k or v of a BFL qkv; else all of them)."""

    path: str
    shape: tuple[int, int, int, int]  # a, b, c, d
    start: int
    stop: int


def is_lokr(tensors: Mapping) -> bool:
    """diffusers' test: any `.lokr_` key."""
    return any(".lokr_" in k for k in tensors)


def _bake_alpha(modules: dict[str, dict[str, np.ndarray]]) -> None:
    """diffusers' _bake_lokr_alpha_: alpha / rank into w1 (or w1_a) when a factor is low-rank; else dropped."""
    for parts in modules.values():
        if "alpha" not in parts:
            continue
        alpha = float(np.asarray(parts.pop("alpha")))
        low = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        if low is not None:
            key = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
            parts[key] = parts[key] * np.float32(alpha / low.shape[0])


def _group(tensors: Mapping[str, np.ndarray], unknown: list[str]) -> dict[str, dict[str, np.ndarray]]:
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if m := _KEY.fullmatch(key):
            modules.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            unknown.append(key)
    return modules


def _bfl_name(name: str) -> str | None:
    """BFL module -> diffusers module; a fused qkv keeps one fused name (diffusers' to_qkv / to_added_qkv)."""
    target = _rename(name, BFL_MODULES)
    if isinstance(target, tuple):
        block = target[0].rsplit(".", 1)[0]
        return f"{block}.{'to_qkv' if target[0].endswith('to_q') else 'to_added_qkv'}"
    return target or name


def _lycoris_name(name: str) -> str | None:
    m = _LYCORIS.fullmatch(name)
    sub = LYCORIS_SUBPATHS.get(m.group(3)) if m else None
    return None if sub is None else f"{m.group(1)}.{m.group(2)}.{sub}"


def _kron_factors(module: str, parts: dict[str, np.ndarray], problems: list[str]) -> Kron | None:
    factors = []
    for w in ("lokr_w1", "lokr_w2"):
        if w in parts:
            factors.append(parts[w])
        elif f"{w}_a" in parts and f"{w}_b" in parts:
            factors.append(parts[f"{w}_a"] @ parts[f"{w}_b"])
        else:
            problems.append(f"{module} (has no {w} or {w}_a + {w}_b)")
            return None
    if any(f.ndim != 2 for f in factors):
        problems.append(f"{module} (LoKr factors of a convolution; FLUX.2 has only linear layers)")
        return None
    return factors[0].astype(np.float32), factors[1].astype(np.float32)


def lokr_modules(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, Kron], str]:
    """A LoKr file in any naming diffusers reads for FLUX.2 -> ({diffusers module: (w1, w2)}, naming), alpha baked.

    Namings, detected in diffusers' order: LyCORIS (`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`), BFL /
    ai-toolkit / raw PEFT (`diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1`, `base_model.model.` too),
    diffusers with `transformer.` (alpha keys refused, as diffusers refuses them), bare diffusers names (+ alpha).
    """
    tensors = {re.sub(r"^base_model\.model\.", "diffusion_model.", k): v for k, v in tensors.items()}
    unknown: list[str] = []
    if any(k.startswith("lycoris_") for k in tensors):
        naming, rename = "lycoris", _lycoris_name
    elif any(k.startswith("diffusion_model.") for k in tensors):
        naming, rename = "bfl", _bfl_name
        tensors = {k.removeprefix("diffusion_model."): v for k, v in tensors.items()}
    elif any(k.startswith("transformer.") for k in tensors):
        naming, rename = "diffusers", lambda name: name
        unknown += [k for k in tensors if k.endswith(".alpha")]
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.endswith(".alpha")}
    else:
        naming, rename = "diffusers (bare)", lambda name: name
    modules = _group(tensors, unknown)
    _bake_alpha(modules)
    out: dict[str, Kron] = {}
    for name, parts in modules.items():
        target = rename(name)
        if target is None:
            unknown.append(f"{name} (no FLUX.2 module of that name)")
        elif (factors := _kron_factors(name, parts, unknown)) is not None:
            out[target] = factors
    if unknown:
        raise ValueError(f"LoKr file ({naming} naming) has {len(unknown)} keys that fit no transformer layer: "
                         f"{first_ten(unknown)}")
    if not out:
        raise ValueError("LoKr file holds no LoKr factors")
    return out, naming


def _placements(module: str, targets: Mapping[str, tuple[int, int]]):
    """([(our path, delta columns [start, stop))], the delta's width) of a diffusers module:
    the layer itself, or the q/k/v layers a fused to_qkv / to_added_qkv stands for (None when neither fits)."""
    path = our_path(module)
    if path in targets:
        return [(path, 0, targets[path][1])], targets[path][1]
    block, _, name = path.rpartition(".")
    parts = [f"{block}.{p}" for p in FUSED.get(name, ())]
    if not parts or not all(p in targets for p in parts):
        return None, 0
    placed, start = [], 0
    for part in parts:
        placed.append((part, start, start + targets[part][1]))
        start += targets[part][1]
    return placed, start


def build_lokr_terms(modules: Mapping[str, Kron], metadata: Mapping | None,
                     targets: Mapping[str, tuple[int, int]]) -> tuple[list[LokrTerm], list[Kron]]:
    """(terms, (w1 with the scaling folded in, w2) per term); one ValueError naming every module that does not fit.

    With metadata (a PEFT LoKrConfig), scaling = alpha / r as peft sets it (rank/alpha patterns); without, 1 (diffusers
    sets alpha = r and bakes the file's alphas in)."""
    if metadata:
        metadata = {k.removeprefix("transformer."): v for k, v in metadata.items()}
    missing, bad, terms, factors = [], [], [], []
    for module, (w1, w2) in modules.items():
        (a, c), (b, d) = w1.shape, w2.shape
        placed, width = _placements(module, targets)
        if placed is None:
            missing.append(module)
            continue
        fan_in = targets[placed[0][0]][0]
        if (a * b, c * d) != (width, fan_in):
            bad.append(f"{module}: kron(lokr_w1 {[a, c]}, lokr_w2 {[b, d]}) is [{a * b}, {c * d}]; "
                       f"the layer is {fan_in} -> {width}")
            continue
        scaling = 1.0
        if metadata:
            r = _pattern_value(metadata.get("rank_pattern"), module, metadata.get("r", 8))
            scaling = _pattern_value(metadata.get("alpha_pattern"), module, metadata.get("alpha", r)) / r
        for path, start, stop in placed:
            terms.append(LokrTerm(path, (a, b, c, d), start, stop))
            factors.append((w1 * np.float32(scaling), w2))
    if problems := fit_problems(missing, bad):
        raise ValueError("; ".join(problems))
    return terms, factors


def kron_matmul(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """x @ kron(w1, w2)^T without building it: (..., c*d) -> (..., a*b)."""
    (a, c), (b, d) = w1.shape, w2.shape
    x = x.reshape(*x.shape[:-1], c, d)
    y = jnp.einsum("...cd,bd,ac->...ab", x, w2, w1)
    return y.reshape(*y.shape[:-2], a * b)


class LokrLinear:
    """A layer (or a wrapped one) plus weight * (x @ kron(w1, w2)^T)[..., start:stop]."""

    def __init__(self, base, term: LokrTerm, w1: jax.Array, w2: jax.Array, weight: jax.Array):
        self.base, self.term, self.w1, self.w2, self.weight = base, term, w1, w2, weight

    def __call__(self, x: jax.Array) -> jax.Array:
        term, w1 = self.term, self.w1.astype(x.dtype)
        b = term.shape[1]
        start, stop = term.start, term.stop
        if start % b == 0 and stop % b == 0:  # whole rows of w1: only they are computed
            w1, start, stop = w1[start // b:stop // b], 0, stop - start
        delta = kron_matmul(x, w1, self.w2.astype(x.dtype))[..., start:stop]
        return self.base(x) + delta * self.weight.astype(x.dtype)


def lokr_specs(terms, leaf, dtype) -> dict:
    """The shapes of a layout's LoKr inputs: leaf(shape, dtype) per w1 / w2, one float32 weight per term."""
    return {"lokr": tuple((leaf((t.shape[0], t.shape[2]), dtype), leaf((t.shape[1], t.shape[3]), dtype))
                          for t in terms),
            "lokr_weights": leaf((len(terms),), np.float32)}
