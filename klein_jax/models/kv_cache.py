"""Reference keys and values of klein-9B KV: port of diffusers' Flux2KVCache and `kv_cache_mode="extract"`
(transformer_flux2.py, used by Flux2KleinKVPipeline; klein.md §5.8).

In diffusers' first step the sequence is [text, references, target]: reference tokens are modulated at the fixed
timestep 0 (`ref_fixed_timestep`; the double-stream image and the single-stream modulations are blended per token)
and their queries attend only to reference keys, while text and target queries attend to every key. Each block
stores the references' post-RoPE keys and values; later steps run text and target only and attend to those cached
keys and values as well. A reference token therefore never sees the text, the noise or the step: its keys and
values are a function of the references alone. `reference_kv` computes them in a pass over the references only;
every step, the first one included, is then a "cached" step (Flux2Transformer's `cached_kv`), which is the same
arithmetic as diffusers' first step with the reference rows computed apart.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from klein_jax.models.transformer_blocks import KeyValues


class ReferenceKV(NamedTuple):
    """Post-RoPE reference keys and values (B, R, H, Dh) of every double-stream and single-stream block."""

    double: tuple[KeyValues, ...]
    single: tuple[KeyValues, ...]


def reference_kv(transformer, ref_tokens: jax.Array, ref_ids: jax.Array, ref_count: jax.Array, *,
                 timestep: float = 0.0) -> ReferenceKV:
    """The references' keys and values in every block of `transformer` (a Flux2Transformer).

    ref_tokens (B, R, C) packed reference latents, ref_ids (R, 4) their positions (t = 10, 20, ...), ref_count ()
    int32: rows past it are padding, never attended. The references run as the image stream of a sequence with no
    text, at `timestep` (diffusers' `ref_fixed_timestep`, 0.0 in Flux2KleinKVPipeline), so they attend only to
    each other (diffusers' `_flux2_kv_causal_attention`).
    """
    B, R, _ = ref_tokens.shape
    temb = transformer.embed_timestep(jnp.full((B,), timestep, jnp.float32))  # (B, D)
    mod_img = transformer.double_stream_modulation_img(temb)  # (B, 6D)
    mod_single = transformer.single_stream_modulation(temb)  # (B, 3D)
    img = transformer.x_embedder(ref_tokens.astype(transformer.dtype))  # (B, R, D)
    txt = jnp.zeros((B, 0, img.shape[-1]), img.dtype)  # no text token: the references attend only to each other
    cos, sin = transformer.rope(ref_ids, jnp.zeros((0, ref_ids.shape[-1]), ref_ids.dtype))  # (R, Dh/2)
    kv_lengths = jnp.broadcast_to(ref_count.astype(jnp.int32), (B,))
    double = []
    for block in transformer.transformer_blocks:
        img, txt, kv = block(img, txt, mod_img, mod_img, cos, sin, kv_lengths)  # the text modulation acts on nothing
        double.append(kv)
    single = []
    for block in transformer.single_transformer_blocks:
        img, kv = block(img, mod_single, cos, sin, kv_lengths)
        single.append(kv)
    return ReferenceKV(tuple(double), tuple(single))


def reference_kv_shapes(config, batch: int, ref_tokens: int, dtype) -> ReferenceKV:
    """Shapes and dtypes of a ReferenceKV: (batch, ref_tokens, heads, head_dim) per block (jax.ShapeDtypeStruct)."""
    spec = jax.ShapeDtypeStruct((batch, ref_tokens, config.num_attention_heads, config.attention_head_dim), dtype)
    return ReferenceKV(((spec, spec),) * config.num_layers, ((spec, spec),) * config.num_single_layers)
