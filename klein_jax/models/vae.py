"""Port of diffusers AutoencoderKLFlux2 (autoencoders/autoencoder_kl_flux2.py), channels-last (NHWC).

Also holds the two latent paths of Flux2KleinPipeline: `encode_packed` (= _encode_vae_image: encode,
patchify, BN-normalise) and `decode_packed` (= the end of __call__: BN-denormalise, unpatchify, decode).
Blocks live in vae_blocks.py.
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

    def normalize(self, latents: jax.Array) -> jax.Array:  # (..., C)
        return latent_ops.normalize(latents, self.running_mean[...], self.running_var[...], self.eps)

    def denormalize(self, latents: jax.Array) -> jax.Array:  # (..., C)
        return latent_ops.denormalize(latents, self.running_mean[...], self.running_var[...], self.eps)


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

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent pixel (8 for the real VAE)."""
        return self.config.spatial_scale

    def _check(self, x: jax.Array, what: str, channels: int, multiple: int) -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be NHWC (B, H, W, {channels}); got rank {x.ndim} shape {tuple(x.shape)}")
        if x.shape[-1] != channels:
            raise ValueError(f"{what} must have {channels} channels (NHWC, last axis); got shape {tuple(x.shape)}")
        H, W = x.shape[1:3]
        if H < multiple or W < multiple or H % multiple or W % multiple:
            raise ValueError(f"{what} height and width must be positive multiples of {multiple}; got {H}x{W}")

    def encode_moments(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> (B, H/8, W/8, 64): mean | logvar, before DiagonalGaussianDistribution."""
        self._check(images, "images", self.config.in_channels, self.spatial_scale)
        moments = self.encoder(images)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> posterior mean (B, H/8, W/8, 32) (retrieve_latents(sample_mode="argmax"))."""
        return self.encode_moments(images)[..., : self.config.latent_channels]  # chunk(moments, 2)[0]

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, 32) -> images (B, 8h, 8w, 3), unclamped."""
        self._check(latents, "latents", self.config.latent_channels, 1)
        z = latents if self.post_quant_conv is None else self.post_quant_conv(latents)
        return self.decoder(z)

    def encode_packed(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> normalised patchified latents (B, H/16, W/16, 128) (_encode_vae_image)."""
        self._check(images, "images", self.config.in_channels, 2 * self.spatial_scale)
        return self.bn.normalize(latent_ops.patchify(self.encode(images)))

    def decode_packed(self, latents: jax.Array) -> jax.Array:
        """Normalised (B, H/16, W/16, 128) -> images (B, H, W, 3), unclamped (end of Flux2KleinPipeline.__call__)."""
        self._check(latents, "packed latents", self.config.packed_channels, 1)
        return self.decode(latent_ops.unpatchify(self.bn.denormalize(latents)))
