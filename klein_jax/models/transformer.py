"""Port of diffusers Flux2Transformer2DModel (transformer_flux2.py), the FLUX.2 [klein] flow transformer.

Forward pass of klein.md §2: timestep embedding -> three shared modulations -> input projections -> double-stream
blocks (joint attention, text first) -> single-stream blocks on [text, image] -> AdaLN output (scale, shift) ->
proj_out. klein has no guidance embedding. diffusers' KV-cache modes (klein-9B KV) are klein_jax/models/kv_cache.py:
`reference_kv` ("extract": the references' keys and values) and `cached_kv` here ("cached": attended after the
sequence's own keys).

Precision follows diffusers' cast order: the timestep is cast to the compute dtype and multiplied by 1000 there
(rounded explicitly, see round_to_dtype: in bf16 sigma 0.73 embeds as 732, as in diffusers), the sinusoid and RoPE
tables are float32, LayerNorm/RMSNorm statistics and RoPE rotation run in float32, everything else (matmuls,
modulation arithmetic, residuals) runs in `dtype`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klein_jax.configs import TransformerConfig
from klein_jax.models.kv_cache import ReferenceKV
from klein_jax.models.layers import attention_implementation, layer_norm, silu
from klein_jax.models.rope import rope_tables
from klein_jax.models.transformer_blocks import Flux2SingleTransformerBlock, Flux2TransformerBlock, bias_free_linear


def round_to_dtype(x: jax.Array, dtype) -> jax.Array:
    """x rounded to `dtype`'s precision (x keeps its own dtype).

    A plain astype(bfloat16) after a multiply is not enough: XLA's excess-precision rewrites may compute the multiply
    in float32 and drop the rounding, while reduce_precision is always kept.
    """
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
    """float32 (dim // 2,) frequencies exp(-ln(max_period) * i / half) of diffusers' get_timestep_embedding.

    The float32 exponent is formed as diffusers forms it; exp is taken in float64 and rounded once, which matches
    torch's float32 exp where XLA's polynomial exp can be an ulp off (and t * freq magnifies an ulp at t ~ 1000).
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(timestep: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim) in float32, cos first (diffusers Timesteps, flip_sin_to_cos=True)."""
    freqs = timestep_frequencies(dim, max_period)
    args = timestep.astype(jnp.float32)[:, None] * freqs[None, :]  # (B, 1) x (1, half) -> (B, half)
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # (B, 2*half)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_2(SiLU(linear_1(x))) without biases (diffusers TimestepEmbedding)."""

    def __init__(self, in_channels: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.linear_1 = bias_free_linear(in_channels, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = bias_free_linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(silu(self.linear_1(x)))


class Flux2TimestepGuidanceEmbeddings(nnx.Module):
    """Timestep -> temb (B, D); klein has no guidance embedder (diffusers guidance_embeds=False)."""

    def __init__(self, in_channels: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.in_channels = in_channels
        self.timestep_embedder = TimestepEmbedding(in_channels, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, timestep: jax.Array) -> jax.Array:
        """timestep (B,) already scaled by 1000, in the compute dtype."""
        proj = round_to_dtype(timestep_embedding(timestep, self.in_channels), timestep.dtype)  # diffusers .to(t.dtype)
        proj = proj.astype(timestep.dtype)
        return self.timestep_embedder(proj)


class Flux2Modulation(nnx.Module):
    """linear(SiLU(temb)) -> (B, 3*num_sets*D), shared by every block of one kind (diffusers Flux2Modulation)."""

    def __init__(self, dim: int, num_sets: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.linear = bias_free_linear(dim, 3 * num_sets * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, temb: jax.Array) -> jax.Array:
        return self.linear(silu(temb))


class AdaLayerNormContinuous(nnx.Module):
    """LayerNorm(x) * (1 + scale) + shift with (scale, shift) = linear(SiLU(temb)): diffusers order, SCALE first."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.linear = bias_free_linear(dim, 2 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """x (B, L, D), temb (B, D) -> (B, L, D)."""
        scale, shift = jnp.split(self.linear(silu(temb)), 2, axis=-1)  # (B, 2D) -> 2 x (B, D)
        return layer_norm(x, self.eps) * (1 + scale)[:, None, :] + shift[:, None, :]


class Flux2Transformer(nnx.Module):
    """The FLUX.2 flow transformer; predicts the velocity of packed image latents (klein.md §2)."""

    def __init__(self, config: TransformerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        D = config.inner_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        block_kw = dict(eps=config.eps, attention_impl=attention_implementation(dtype), **kw)
        self.time_guidance_embed = Flux2TimestepGuidanceEmbeddings(config.timestep_guidance_channels, D, **kw)
        self.double_stream_modulation_img = Flux2Modulation(D, 2, **kw)
        self.double_stream_modulation_txt = Flux2Modulation(D, 2, **kw)
        self.single_stream_modulation = Flux2Modulation(D, 1, **kw)
        self.x_embedder = bias_free_linear(config.in_channels, D, **kw)
        self.context_embedder = bias_free_linear(config.joint_attention_dim, D, **kw)
        heads = (D, config.num_attention_heads, config.attention_head_dim, config.mlp_hidden_dim)
        self.transformer_blocks = nnx.List(
            [Flux2TransformerBlock(*heads, **block_kw) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nnx.List(
            [Flux2SingleTransformerBlock(*heads, **block_kw) for _ in range(config.num_single_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(D, eps=config.eps, **kw)
        self.proj_out = bias_free_linear(D, config.output_channels, **kw)

    def rope(self, img_ids: jax.Array, txt_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos/sin tables (T+L, Dh/2) float32 for the joint [text, image] sequence."""
        ids = jnp.concatenate([txt_ids, img_ids], axis=0)  # (T, 4) + (L, 4) -> (T+L, 4)
        return rope_tables(ids, self.config.axes_dims_rope, self.config.rope_theta)

    def embed_timestep(self, timestep: jax.Array) -> jax.Array:
        """temb (B, D) from sigma (B,), scaled by 1000 in the compute dtype as diffusers does.

        In bfloat16 both sigma and sigma * 1000 are rounded: sigma 0.96738 embeds as 968 (BFL: 968.75, klein.md §8.3).
        """
        sigma = round_to_dtype(timestep.astype(jnp.float32), self.dtype)
        return self.time_guidance_embed(round_to_dtype(sigma * 1000, self.dtype).astype(self.dtype))

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, timestep: jax.Array,
                 img_ids: jax.Array, txt_ids: jax.Array, kv_lengths: jax.Array | None = None,
                 cached_kv: ReferenceKV | None = None,
                 rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """Velocity (B, L, C_out) from latents (B, L, C_in), text features (B, T, joint), sigma (B,) in [0, 1].

        img_ids (L, 4) and txt_ids (T, 4) are (t, h, w, l) positions shared by the batch; as in diffusers, 3-D ids
        (B, S, 4) are accepted and only batch row 0 is used. kv_lengths (B,) int32, optional: only the first
        kv_lengths[b] tokens of the joint [text, image] sequence are attention keys, so image tokens padded at the
        end change no other token (their own outputs are meaningless). cached_kv: reference keys and values of
        every block (models/kv_cache.py), attended after the joint sequence's own; kv_lengths then counts them too.
        rope: the cos/sin tables self.rope(img_ids, txt_ids), when the caller computed them once for several calls.
        """
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        T = encoder_hidden_states.shape[1]
        temb = self.embed_timestep(timestep)  # (B, D)
        mod_img = self.double_stream_modulation_img(temb)  # (B, 6D)
        mod_txt = self.double_stream_modulation_txt(temb)  # (B, 6D)
        mod_single = self.single_stream_modulation(temb)  # (B, 3D)
        img = self.x_embedder(hidden_states.astype(self.dtype))  # (B, L, D)
        txt = self.context_embedder(encoder_hidden_states.astype(self.dtype))  # (B, T, D)
        cos, sin = self.rope(img_ids, txt_ids) if rope is None else rope
        no_cache = ReferenceKV((None,) * len(self.transformer_blocks), (None,) * len(self.single_transformer_blocks))
        double, single = no_cache if cached_kv is None else cached_kv
        for block, cached in zip(self.transformer_blocks, double, strict=True):
            img, txt, _ = block(img, txt, mod_img, mod_txt, cos, sin, kv_lengths, cached)
        x = jnp.concatenate([txt, img], axis=1)  # (B, T+L, D), text first
        for block, cached in zip(self.single_transformer_blocks, single, strict=True):
            x, _ = block(x, mod_single, cos, sin, kv_lengths, cached)
        return self.proj_out(self.norm_out(x[:, T:], temb))  # drop text tokens -> (B, L, C_out)
