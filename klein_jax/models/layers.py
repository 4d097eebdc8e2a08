"""Layers shared by the flow transformer and the Qwen3 text encoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# the attention backends live in attention.py; these names stay importable from here for the call sites
from klein_jax.models.attention import attention_implementation, dot_product_attention  # noqa: F401


def silu(x: jax.Array) -> jax.Array:
    """SiLU computed in float32 and rounded once to x's dtype, as torch's F.silu. jax.nn.silu of a 16-bit x rounds
    the sigmoid, then the product: tests/test_vae.py's bfloat16 decode had 1.06x diffusers' mean error against the
    float32 decode that way, 0.96x rounded once."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in fp32 (a bf16 mean of squares drifts from torch)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """torch.nn.RMSNorm: normalised and scaled in fp32, rounded once to the input dtype.

    (The text encoder's Qwen3RMSNorm rounds before the scale: text_encoder.Qwen3RMSNorm.)
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., D)
        return (rms_normalize(x, self.eps) * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, statistics in fp32 (torch LayerNorm(elementwise_affine=False))."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
