"""Port of diffusers AutoencoderKLFlux2 (autoencoders/autoencoder_kl_flux2.py), channels-last (NHWC).

Also holds the two latent paths of Flux2KleinPipeline: `encode_reference_tokens` (= _encode_vae_image: encode,
patchify, BN-normalise, then _pack_latents, for references zero-padded to a bucket shape) and `decode_packed`
(= the end of __call__: BN-denormalise, unpatchify, decode). Blocks live in vae_blocks.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from klein_jax import latents as latent_ops
from klein_jax.configs import VAEConfig
from klein_jax.models.vae_blocks import Decoder, Encoder, conv2d_nhwc


class LatentBatchNorm(nnx.Module):
    """The running statistics of diffusers' `bn` (BatchNorm2d(128, affine=False)); only used to (de)normalise."""

    def __init__(self, num_features: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        # stored in the model dtype, like the torch buffers of a model loaded with torch_dtype
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))

    def _std(self, dtype) -> jax.Array:
        # diffusers: torch.sqrt(running_var + eps) in the stats' dtype, then .to(latents.dtype)
        return jnp.sqrt(self.running_var[...] + self.eps).astype(dtype)

    def normalize(self, latents: jax.Array) -> jax.Array:  # (..., C)
        """(z - mean) / sqrt(var + eps) over the last (channel) axis (Flux2KleinPipeline._encode_vae_image)."""
        return (latents - self.running_mean[...].astype(latents.dtype)) / self._std(latents.dtype)

    def denormalize(self, latents: jax.Array) -> jax.Array:  # (..., C)
        """z * sqrt(var + eps) + mean over the last (channel) axis (the end of Flux2KleinPipeline.__call__)."""
        return latents * self._std(latents.dtype) + self.running_mean[...].astype(latents.dtype)


def _valid_mask(height: int, width: int, valid_hw: jax.Array) -> jax.Array:
    """(1, height, width, 1) bool: True where row < valid_hw[0] and col < valid_hw[1]."""
    rows = jnp.arange(height)[:, None] < valid_hw[0]
    cols = jnp.arange(width)[None, :] < valid_hw[1]
    return (rows & cols)[None, :, :, None]


def _gather_valid_tokens(grid: jax.Array, valid_grid: jax.Array, slot_tokens: int) -> jax.Array:
    """(B, h, w, C) padded grid -> (B, slot_tokens, C): the valid (rows, cols) tokens row-major first, zeros after."""
    B, h, w, C = grid.shape
    rows, cols = valid_grid[0], valid_grid[1]
    k = jnp.arange(slot_tokens)
    index = (k // cols) * w + k % cols  # compact row-major index -> padded flat index
    valid = k < rows * cols
    tokens = jnp.take(grid.reshape(B, h * w, C), jnp.where(valid, index, 0), axis=1)  # (B, h*w, C) -> (B, S, C)
    return jnp.where(valid[None, :, None], tokens, jnp.zeros((), tokens.dtype))


class Flux2VAE(nnx.Module):
    """AutoencoderKLFlux2 in NHWC: images (B, H, W, 3) in [-1, 1] <-> latents (B, H/8, W/8, 32)."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if len(config.decoder_channels) != len(config.block_out_channels):
            raise ValueError(f"decoder_block_out_channels={config.decoder_channels} must have as many levels as "
                             f"block_out_channels={config.block_out_channels}")
        if len(config.up_block_types) != len(config.decoder_channels):
            raise ValueError(f"up_block_types has {len(config.up_block_types)} entries, "
                             f"decoder channels {len(config.decoder_channels)}")
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        C = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = conv2d_nhwc(2 * C, 2 * C, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = conv2d_nhwc(C, C, 1, **kw) if config.use_post_quant_conv else None
        self.bn = LatentBatchNorm(math.prod(config.patch_size) * C, eps=config.batch_norm_eps,
                                  param_dtype=param_dtype)

    def _check(self, x: jax.Array, what: str, channels: int, multiple: int) -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be NHWC (B, H, W, {channels}); got rank {x.ndim} shape {tuple(x.shape)}")
        if x.shape[-1] != channels:
            raise ValueError(f"{what} must have {channels} channels (NHWC, last axis); got shape {tuple(x.shape)}")
        H, W = x.shape[1:3]
        if H < multiple or W < multiple or H % multiple or W % multiple:
            raise ValueError(f"{what} height and width must be positive multiples of {multiple}; got {H}x{W}")

    def encode(self, images: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> posterior mean (B, H/8, W/8, 32) (retrieve_latents(sample_mode="argmax")).

        valid_hw (2,) int: only the top-left valid_hw[0] x valid_hw[1] pixels are the image (multiples of 8; the
        rest is padding, masked in every block): the valid latents then equal an encode of that crop alone.
        """
        self._check(images, "images", self.config.in_channels, self.config.spatial_scale)
        mask = None if valid_hw is None else _valid_mask(*images.shape[1:3], valid_hw)
        moments = self.encoder(images, mask)
        moments = moments if self.quant_conv is None else self.quant_conv(moments)  # 1x1: position-wise
        return moments[..., : self.config.latent_channels]  # chunk(mean | logvar, 2)[0]

    def encode_reference_tokens(self, images: jax.Array, valid_hw: jax.Array, slot_tokens: int) -> jax.Array:
        """Zero-padded references (B, H, W, 3) in [-1, 1] -> normalised packed tokens (B, slot_tokens, 128).

        The valid top-left valid_hw (2,) pixels (multiples of 16, at most slot_tokens tokens) give exactly
        Flux2KleinPipeline._encode_vae_image + _pack_latents of that crop: its tokens row-major, then zeros.
        """
        pixels_per_token = 2 * self.config.spatial_scale
        self._check(images, "reference images", self.config.in_channels, pixels_per_token)
        if jnp.shape(valid_hw) != (2,):
            raise ValueError(f"valid_hw must be one (height, width) pair; got shape {jnp.shape(valid_hw)}")
        if slot_tokens < 1:
            raise ValueError(f"slot_tokens must be at least 1; got {slot_tokens}")
        packed = self.bn.normalize(latent_ops.patchify(self.encode(images, valid_hw)))  # (B, H/16, W/16, 128)
        return _gather_valid_tokens(packed, valid_hw // pixels_per_token, slot_tokens)

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, 32) -> images (B, 8h, 8w, 3), unclamped."""
        self._check(latents, "latents", self.config.latent_channels, 1)
        z = latents if self.post_quant_conv is None else self.post_quant_conv(latents)
        return self.decoder(z)

    def decode_packed(self, latents: jax.Array) -> jax.Array:
        """Normalised (B, H/16, W/16, 128) -> images (B, H, W, 3), unclamped (end of Flux2KleinPipeline.__call__)."""
        self._check(latents, "packed latents", self.config.packed_channels, 1)
        return self.decode(latent_ops.unpatchify(self.bn.denormalize(latents)))
