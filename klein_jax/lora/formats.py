"""Adapter-file namings -> diffusers module names (port of diffusers' Flux2LoraLoaderMixin.lora_state_dict and
the Flux2 converters of lora_conversion_utils.py).

Accepted layouts, detected as diffusers detects them:
- kohya (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` + `.alpha`): alpha / rank is baked into the
  factors as `_convert_kohya_flux2_lora_to_diffusers` does;
- Black Forest Labs / ai-toolkit / ComfyUI (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`, or
  `lora_down`/`lora_up`), and raw PEFT (`base_model.model.` + either naming);
- diffusers/PEFT (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`; bare names without `transformer.`
  are accepted too, where diffusers would load nothing).
A fused BFL qkv projection becomes three diffusers projections sharing lora_A, lora_B split in three rows blocks.
Every key is used or reported: `to_diffusers_modules` raises one ValueError naming every key it cannot place.
DoRA magnitudes and LoRA biases are refused by name (diffusers' `dora_scale` keys are dropped, as diffusers does,
with a warning); LoKr files are read by lokr.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np

from klein_jax.loading.keymap import first_ten

log = logging.getLogger(__name__)

Factors = tuple[np.ndarray, np.ndarray]  # (lora_A (r, in), lora_B (out, r)): torch layout

# BFL module name (regex, full match) -> diffusers module name(s); several names: a fused qkv split in three.
_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
BFL_MODULES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    (r"double_blocks\.(\d+)\.img_attn\.qkv", tuple(rf"transformer_blocks.\1.attn.{p}" for p in _QKV)),
    (r"double_blocks\.(\d+)\.txt_attn\.qkv", tuple(rf"transformer_blocks.\1.attn.{p}" for p in _ADD_QKV)),
    (r"double_blocks\.(\d+)\.img_attn\.proj", r"transformer_blocks.\1.attn.to_out.0"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", r"transformer_blocks.\1.attn.to_add_out"),
    (r"double_blocks\.(\d+)\.img_mlp\.0", r"transformer_blocks.\1.ff.linear_in"),
    (r"double_blocks\.(\d+)\.img_mlp\.2", r"transformer_blocks.\1.ff.linear_out"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", r"transformer_blocks.\1.ff_context.linear_in"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", r"transformer_blocks.\1.ff_context.linear_out"),
    (r"single_blocks\.(\d+)\.linear1", r"single_transformer_blocks.\1.attn.to_qkv_mlp_proj"),
    (r"single_blocks\.(\d+)\.linear2", r"single_transformer_blocks.\1.attn.to_out"),
    (r"img_in", "x_embedder"),
    (r"txt_in", "context_embedder"),
    (r"time_in\.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    (r"time_in\.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    (r"guidance_in\.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    (r"guidance_in\.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    (r"final_layer\.linear", "proj_out"),
    (r"final_layer\.adaLN_modulation\.1", "norm_out.linear"),
    (r"(single_stream_modulation|double_stream_modulation_img|double_stream_modulation_txt)\.lin", r"\1.linear"),
    (r"sformer_blocks\.(.+)", r"transformer_blocks.\1"),  # an alias some exports use
)  # any other name is taken as a diffusers module name already (expanded block names)
# kohya module name -> BFL module name (the names kohya's sd-scripts derive from BFL's by replacing "." with "_").
KOHYA_MODULES: tuple[tuple[str, str], ...] = (
    (r"lora_unet_double_blocks_(\d+)_(img|txt)_attn_(qkv|proj)", r"double_blocks.\1.\2_attn.\3"),
    (r"lora_unet_double_blocks_(\d+)_(img|txt)_mlp_([02])", r"double_blocks.\1.\2_mlp.\3"),
    (r"lora_unet_single_blocks_(\d+)_(linear[12])", r"single_blocks.\1.\2"),
    (r"lora_unet_(img_in|txt_in)", r"\1"),
    (r"lora_unet_time_in_(in|out)_layer", r"time_in.\1_layer"),
    (r"lora_unet_final_layer_linear", "final_layer.linear"),
)
_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B|lora_down|lora_up)\.weight")
_REFUSED = {"lora_magnitude_vector": "DoRA", "lora_B.bias": "LoRA bias (lora_bias=True)"}


def fit_problems(missing: list[str], bad: list[str]) -> list[str]:
    """The parts of an adapter's does-not-fit error: the layers the transformer lacks and the shape mismatches."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} layers the transformer does not have: {', '.join(sorted(missing)[:10])}")
    if bad:
        problems.append(f"{len(bad)} shape mismatches: {'; '.join(bad[:10])}")
    return problems


def _rename(name: str, table) -> str | tuple[str, ...] | None:
    for pattern, target in table:
        if m := re.fullmatch(pattern, name):
            return m.expand(target) if isinstance(target, str) else tuple(m.expand(t) for t in target)
    return None


def _pairs(tensors: Mapping[str, np.ndarray], unknown: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """module -> {"down": lora_A, "up": lora_B, "alpha"?}; keys that are neither go to `unknown`."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if m := _LORA_KEY.fullmatch(key):
            part = "down" if m.group(2) in ("lora_A", "lora_down") else "up"
            modules.setdefault(m.group(1), {})[part] = value
        elif key.endswith(".alpha"):
            modules.setdefault(key[: -len(".alpha")], {})["alpha"] = value
        else:
            unknown.append(key)
    for module, parts in modules.items():
        for part in ("down", "up"):
            if part not in parts:
                unknown.append(f"{module} (has no {'lora_A/lora_down' if part == 'down' else 'lora_B/lora_up'})")
    return {m: p for m, p in modules.items() if "down" in p and "up" in p}


def _kohya_scale(parts: dict[str, np.ndarray]) -> Factors:
    """alpha / rank split between the factors as diffusers' kohya converter splits it (powers of two)."""
    down, up = parts["down"], parts["up"]
    rank = down.shape[0]
    scale = float(np.asarray(parts.get("alpha", rank))) / rank
    scale_down, scale_up = scale, 1.0
    while scale_down * 2 < scale_up:
        scale_down *= 2
        scale_up /= 2
    return down * np.float32(scale_down), up * np.float32(scale_up)


def _split(target: str | tuple[str, ...], factors: Factors) -> dict[str, Factors]:
    """One module, or a fused qkv -> three modules sharing lora_A, lora_B split in three row blocks."""
    down, up = factors
    if isinstance(target, str):
        return {target: (down, up)}
    if up.shape[0] % len(target):
        raise ValueError(f"fused lora_B of {target} has {up.shape[0]} rows, not divisible by {len(target)}")
    return {name: (down, block) for name, block in zip(target, np.split(up, len(target), axis=0))}


def _convert(modules: dict[str, dict], table, unknown: list[str], *, kohya: bool) -> dict[str, Factors]:
    out: dict[str, Factors] = {}
    for name, parts in modules.items():
        bfl = _rename(name, KOHYA_MODULES) if kohya else name
        target = None if bfl is None else _rename(bfl, table) or bfl
        if target is None or ("alpha" in parts and not kohya):
            unknown.append(f"{name} (no FLUX.2 module of that name)" if target is None else f"{name}.alpha")
            continue
        out.update(_split(target, _kohya_scale(parts) if kohya else (parts["down"], parts["up"])))
    return out


def _check_refused(keys) -> None:
    for marker, what in _REFUSED.items():
        found = [k for k in keys if marker in k]
        if found:
            raise ValueError(f"{what} adapters are not supported (diffusers' LoRA layers only); keys: "
                             f"{', '.join(found[:5])}{' ...' if len(found) > 5 else ''}")


def to_diffusers_modules(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, Factors], str]:
    """Adapter tensors in any accepted layout -> ({diffusers module name: (lora_A, lora_B)}, layout name)."""
    _check_refused(tensors)
    dora = [k for k in tensors if "dora_scale" in k]
    if dora:
        log.warning("dropping %d dora_scale keys: DoRA is not supported (diffusers drops them too)", len(dora))
    tensors = {k: v for k, v in tensors.items() if "dora_scale" not in k}
    unknown: list[str] = []
    if any(k.endswith(".lora_down.weight") and k.startswith("lora_unet_") for k in tensors):
        layout = "kohya"
        out = _convert(_pairs(tensors, unknown), BFL_MODULES, unknown, kohya=True)
    elif any(k.startswith(("diffusion_model.", "base_model.model.")) for k in tensors):
        layout = "bfl"
        stripped = {re.sub(r"^(diffusion_model|base_model\.model)\.", "", k): v for k, v in tensors.items()}
        out = _convert(_pairs(stripped, unknown), BFL_MODULES, unknown, kohya=False)
    else:
        layout = "diffusers"
        stripped = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        modules = _pairs(stripped, unknown)
        unknown += [f"{m}.alpha" for m, p in modules.items() if "alpha" in p]
        out = {m: (p["down"], p["up"]) for m, p in modules.items()}
    if unknown:
        raise ValueError(f"LoRA file ({layout} layout) has {len(unknown)} keys that fit no transformer layer: "
                         f"{first_ten(unknown)}")
    if not out:
        raise ValueError("LoRA file holds no LoRA factors (no lora_A/lora_B or lora_down/lora_up weights)")
    return out, layout
