"""diffusers Flux2Transformer2DModel state-dict names -> klein_jax Flux2Transformer parameter paths.

Every torch Linear weight (out, in) is transposed to a Flax kernel (in, out); RMSNorm `weight` becomes `scale`.
diffusers' `attn.to_out.0` (a ModuleList with a Dropout) is plain `attn.to_out` here. klein has no biases and no
guidance embedder, so neither appears. BFL single-file names are renamed to these first (klein_jax/loading/keymaps/bfl.py).
"""

from __future__ import annotations

from klein_jax.loading.keymap import KeyRule, linear, same
from klein_jax.configs import TransformerConfig

_DOUBLE = r"transformer_blocks\.(\d+)"
_SINGLE = r"single_transformer_blocks\.(\d+)"


def transformer_rules(config: TransformerConfig) -> tuple[KeyRule, ...]:
    """Key map for a diffusers transformer checkpoint; block indices beyond `config`'s depth are reported unexpected."""
    del config  # the names do not depend on sizes; map_weights checks every shape against the model
    return (
        KeyRule(r"x_embedder\.weight", "x_embedder.kernel", linear),
        KeyRule(r"context_embedder\.weight", "context_embedder.kernel", linear),
        KeyRule(r"time_guidance_embed\.timestep_embedder\.(linear_[12])\.weight",
                r"time_guidance_embed.timestep_embedder.\1.kernel", linear),
        KeyRule(r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.weight",
                r"\1.linear.kernel", linear),
        # double-stream blocks
        KeyRule(_DOUBLE + r"\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_add_out)\.weight",
                r"transformer_blocks.\1.attn.\2.kernel", linear),
        KeyRule(_DOUBLE + r"\.attn\.to_out\.0\.weight", r"transformer_blocks.\1.attn.to_out.kernel", linear),
        KeyRule(_DOUBLE + r"\.attn\.(norm_q|norm_k|norm_added_q|norm_added_k)\.weight",
                r"transformer_blocks.\1.attn.\2.scale", same),
        KeyRule(_DOUBLE + r"\.(ff|ff_context)\.(linear_in|linear_out)\.weight",
                r"transformer_blocks.\1.\2.\3.kernel", linear),
        # single-stream blocks: fused q|k|v|gate|value input projection and fused attention+MLP output projection
        KeyRule(_SINGLE + r"\.attn\.(to_qkv_mlp_proj|to_out)\.weight",
                r"single_transformer_blocks.\1.attn.\2.kernel", linear),
        KeyRule(_SINGLE + r"\.attn\.(norm_q|norm_k)\.weight", r"single_transformer_blocks.\1.attn.\2.scale", same),
        # output: diffusers' norm_out.linear rows are (scale, shift), matching AdaLayerNormContinuous here
        KeyRule(r"norm_out\.linear\.weight", "norm_out.linear.kernel", linear),
        KeyRule(r"proj_out\.weight", "proj_out.kernel", linear),
    )
