"""Latent layout helpers of Flux2KleinPipeline (pipeline_flux2_klein.py), channels-last.

diffusers works on (B, C, h, w); here every latent is NHWC: VAE latents (B, h, w, 32) at 1/8 of the
pixels, patchified latents (B, h/2, w/2, 128) at 1/16, packed tokens (B, h/2 * w/2, 128) in row-major
order (a reshape: diffusers _pack_latents). Position ids are 4-tuples (t, h, w, l), as integers.
"""

from __future__ import annotations

import jax
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
