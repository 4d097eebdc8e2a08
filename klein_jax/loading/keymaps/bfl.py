"""Black Forest Labs single-file transformer names (`flux-2-klein-4b.safetensors`) -> diffusers names.

Port of diffusers `convert_flux2_transformer_checkpoint_to_diffusers` (loaders/single_file_utils.py) as a table
(klein.md §6.2-6.3): fused double-block qkv rows are split in three (q | k | v), RMSNorm `.scale` becomes
`.weight`, and the final layer's adaLN rows (shift, scale) are swapped to diffusers' (scale, shift). The shared
modulation weights and the fused single-block linears keep their layout. The result is fed to
`transformer_rules` like any diffusers checkpoint, so every transformer enters the model by the same path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from klein_jax.loading.keymap import KeyRule

COMFY_PREFIX = "model.diffusion_model."  # ComfyUI-style files nest the transformer under this prefix


def split_qkv(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused (3D, D) qkv rows -> q, k, v (D, D) each (views, no copy)."""
    q, k, v = np.split(w, 3, axis=0)  # (3D, D) -> 3 x (D, D)
    return q, k, v


def swap_halves(w: np.ndarray) -> np.ndarray:
    """BFL final-layer adaLN rows (shift, scale) -> diffusers (scale, shift)."""
    shift, scale = np.split(w, 2, axis=0)  # (2D, D) -> 2 x (D, D)
    return np.concatenate([scale, shift], axis=0)


_D = r"double_blocks\.(\d+)\."
_S = r"single_blocks\.(\d+)\."
_TD = r"transformer_blocks.\1."
_TS = r"single_transformer_blocks.\1."

BFL_RULES: tuple[KeyRule, ...] = (
    KeyRule(r"img_in\.weight", "x_embedder.weight"),
    KeyRule(r"txt_in\.weight", "context_embedder.weight"),
    KeyRule(r"time_in\.in_layer\.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
    KeyRule(r"time_in\.out_layer\.weight", "time_guidance_embed.timestep_embedder.linear_2.weight"),
    KeyRule(r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.lin\.weight",
            r"\1.linear.weight"),
    # double-stream blocks
    KeyRule(_D + r"img_attn\.qkv\.weight", tuple(_TD + f"attn.to_{x}.weight" for x in "qkv"), split_qkv),
    KeyRule(_D + r"txt_attn\.qkv\.weight", tuple(_TD + f"attn.add_{x}_proj.weight" for x in "qkv"), split_qkv),
    KeyRule(_D + r"img_attn\.norm\.query_norm\.scale", _TD + "attn.norm_q.weight"),
    KeyRule(_D + r"img_attn\.norm\.key_norm\.scale", _TD + "attn.norm_k.weight"),
    KeyRule(_D + r"txt_attn\.norm\.query_norm\.scale", _TD + "attn.norm_added_q.weight"),
    KeyRule(_D + r"txt_attn\.norm\.key_norm\.scale", _TD + "attn.norm_added_k.weight"),
    KeyRule(_D + r"img_attn\.proj\.weight", _TD + "attn.to_out.0.weight"),
    KeyRule(_D + r"txt_attn\.proj\.weight", _TD + "attn.to_add_out.weight"),
    KeyRule(_D + r"img_mlp\.0\.weight", _TD + "ff.linear_in.weight"),
    KeyRule(_D + r"img_mlp\.2\.weight", _TD + "ff.linear_out.weight"),
    KeyRule(_D + r"txt_mlp\.0\.weight", _TD + "ff_context.linear_in.weight"),
    KeyRule(_D + r"txt_mlp\.2\.weight", _TD + "ff_context.linear_out.weight"),
    # single-stream blocks: fused linears are identical in both layouts
    KeyRule(_S + r"linear1\.weight", _TS + "attn.to_qkv_mlp_proj.weight"),
    KeyRule(_S + r"linear2\.weight", _TS + "attn.to_out.weight"),
    KeyRule(_S + r"norm\.query_norm\.scale", _TS + "attn.norm_q.weight"),
    KeyRule(_S + r"norm\.key_norm\.scale", _TS + "attn.norm_k.weight"),
    # output
    KeyRule(r"final_layer\.linear\.weight", "proj_out.weight"),
    KeyRule(r"final_layer\.adaLN_modulation\.1\.weight", "norm_out.linear.weight", swap_halves),
)


def is_bfl_layout(names: Iterable[str]) -> bool:
    """True if the tensor names are BFL flux2 names (with or without the ComfyUI prefix)."""
    return any(n.removeprefix(COMFY_PREFIX) in ("img_in.weight", "single_stream_modulation.lin.weight") for n in names)


class BFLTransformer(Mapping[str, np.ndarray]):
    """A lazy view of a BFL checkpoint under diffusers names; reads (and splits) a tensor only when asked.

    Names no rule knows are passed through unchanged, so that the model's key map lists them as unexpected.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], rules: tuple[KeyRule, ...] = BFL_RULES):
        self._tensors = tensors
        # diffusers name -> (source name, rule or None for pass-through, index among the rule's targets)
        self._sources: dict[str, tuple[str, KeyRule | None, int]] = {}
        for key in tensors:
            name = key.removeprefix(COMFY_PREFIX)
            matches = [(r, m) for r in rules if (m := r._regex.fullmatch(name))]
            if len(matches) > 1:
                raise ValueError(f"BFL key {key!r} matches several rename rules: {[r.source for r, _ in matches]}")
            if not matches:
                self._add(name, (key, None, 0))
                continue
            rule, m = matches[0]
            targets = (rule.target,) if isinstance(rule.target, str) else rule.target
            for i, template in enumerate(targets):
                self._add(m.expand(template), (key, rule, i))

    def _add(self, name: str, source: tuple[str, KeyRule | None, int]) -> None:
        if name in self._sources:
            raise ValueError(f"BFL keys {self._sources[name][0]!r} and {source[0]!r} both map to {name!r}")
        self._sources[name] = source

    def source_name(self, name: str) -> str:
        """The BFL key that a diffusers name is read from."""
        return self._sources[name][0]

    def annotate(self, message: str) -> str:
        """Adds the BFL name after every renamed diffusers name in an error message."""
        def add_source(m: re.Match) -> str:
            name = m.group(0)
            source = self._sources.get(name)
            return f"{name} (BFL {source[0]})" if source is not None and source[1] is not None else name
        return re.sub(r"(?<![\w.])[A-Za-z_][\w.]*\.weight(?![\w.])", add_source, message)

    def __getitem__(self, name: str) -> np.ndarray:
        key, rule, index = self._sources[name]
        tensor = self._tensors[key]
        if rule is None:
            return tensor
        out = rule.transform(tensor)
        return out if isinstance(rule.target, str) else out[index]

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def bfl_to_diffusers(tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """diffusers-named view of a transformer checkpoint in BFL layout (identity for diffusers layout)."""
    if is_bfl_layout(tensors):
        return BFLTransformer(tensors)
    return tensors

