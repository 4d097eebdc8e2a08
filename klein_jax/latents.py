"""Latent layout helpers of Flux2KleinPipeline (pipeline_flux2_klein.py), channels-last.

diffusers works on (B, C, h, w); here every latent is NHWC: VAE latents (B, h, w, 32) at 1/8 of the
pixels, patchified latents (B, h/2, w/2, 128) at 1/16, packed tokens (B, h/2 * w/2, 128) in row-major
order. Position ids are 4-tuples (t, h, w, l), as integers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PATCH = 2  # the pipeline's 2x2 patchify (VAEConfig.patch_size)


def patchify(latents: jax.Array) -> jax.Array:
    """(B, h, w, C) -> (B, h/2, w/2, 4C), channel c*4 + pi*2 + pj (diffusers _patchify_latents)."""
    B, h, w, C = latents.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"latent grid {h}x{w} is not a multiple of the {PATCH}x{PATCH} patch")
    x = latents.reshape(B, h // PATCH, PATCH, w // PATCH, PATCH, C)  # (B, h/2, pi, w/2, pj, C)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, h/2, w/2, C, pi, pj)
    return x.reshape(B, h // PATCH, w // PATCH, C * PATCH * PATCH)  # (B, h/2, w/2, 4C)


def unpatchify(latents: jax.Array) -> jax.Array:
    """(B, h, w, 4C) -> (B, 2h, 2w, C); the exact inverse of `patchify` (diffusers _unpatchify_latents)."""
    B, h, w, C4 = latents.shape
    if C4 % (PATCH * PATCH):
        raise ValueError(f"{C4} channels cannot be unpatchified: not a multiple of {PATCH * PATCH}")
    C = C4 // (PATCH * PATCH)
    x = latents.reshape(B, h, w, C, PATCH, PATCH)  # (B, h, w, C, pi, pj)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, h, pi, w, pj, C)
    return x.reshape(B, h * PATCH, w * PATCH, C)  # (B, 2h, 2w, C)


def pack_latents(latents: jax.Array) -> jax.Array:
    """(B, h, w, C) -> (B, h*w, C), token index r*w + c (diffusers _pack_latents)."""
    B, h, w, C = latents.shape
    return latents.reshape(B, h * w, C)  # (B, h, w, C) -> (B, L, C)


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """(B, h*w, C) -> (B, h, w, C); inverse of `pack_latents` (= _unpack_latents_with_ids for row-major ids)."""
    B, L, C = tokens.shape
    if L != height * width:
        raise ValueError(f"{L} tokens cannot be unpacked to a {height}x{width} grid ({height * width} tokens)")
    return tokens.reshape(B, height, width, C)  # (B, L, C) -> (B, h, w, C)


def _bn_std(running_var: jax.Array, eps: float, dtype) -> jax.Array:
    # diffusers: torch.sqrt(running_var + eps) in the stats' dtype, then .to(latents.dtype)
    return jnp.sqrt(running_var + eps).astype(dtype)


def normalize(latents: jax.Array, running_mean: jax.Array, running_var: jax.Array, eps: float) -> jax.Array:
    """(z - mean) / sqrt(var + eps) over the last (channel) axis, as Flux2KleinPipeline._encode_vae_image."""
    mean = running_mean.astype(latents.dtype)
    return (latents - mean) / _bn_std(running_var, eps, latents.dtype)


def denormalize(latents: jax.Array, running_mean: jax.Array, running_var: jax.Array, eps: float) -> jax.Array:
    """z * sqrt(var + eps) + mean over the last (channel) axis, as the end of Flux2KleinPipeline.__call__."""
    mean = running_mean.astype(latents.dtype)
    return latents * _bn_std(running_var, eps, latents.dtype) + mean


def latent_ids(height: int, width: int, t: int = 0) -> np.ndarray:
    """int32 (h*w, 4) rows (t, r, c, 0) in row-major order (_prepare_latent_ids; t=10+10k: _prepare_image_ids)."""
    if height < 1 or width < 1:
        raise ValueError(f"latent grid {height}x{width} must be at least 1x1")
    r, c = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")  # (h, w) each
    ids = np.zeros((height * width, 4), np.int32)
    ids[:, 0] = t
    ids[:, 1] = r.reshape(-1)
    ids[:, 2] = c.reshape(-1)
    return ids


def image_ids(grids: list[tuple[int, int]], scale: int = 10) -> np.ndarray:
    """int32 (sum h_k*w_k, 4): reference k's grid with t = scale + scale*k, concatenated (_prepare_image_ids)."""
    if not grids:
        raise ValueError("image_ids needs at least one (height, width) grid")
    return np.concatenate([latent_ids(h, w, t=scale + scale * k) for k, (h, w) in enumerate(grids)])


def text_ids(length: int) -> np.ndarray:
    """int32 (T, 4) rows (0, 0, 0, j) for text token j (_prepare_text_ids)."""
    if length < 1:
        raise ValueError(f"text length {length} must be at least 1")
    ids = np.zeros((length, 4), np.int32)
    ids[:, 3] = np.arange(length)
    return ids
