"""VAE encoding of references padded to a bucket shape, equal to encoding them at their own shape.

Flux2VAE.encode_packed (= diffusers' _encode_vae_image) on an image padded with zeros to a larger bucket would not
give the same latents: GroupNorm statistics and the mid-block attention span the whole image. This walks the same
modules (klein_jax/models/vae_blocks.py, same parameters) with a validity mask instead:
- every convolution input is zero outside the valid region, so a 3x3 convolution at the valid border sees the same
  zeros as torch's zero padding, and the stride-2 downsampler's extra bottom/right zero row as well;
- GroupNorm statistics are computed over the valid region only;
- the mid-block attention excludes padded positions as keys.
Valid outputs then depend only on valid inputs. The valid tokens are gathered, row-major, to the front of a
fixed-length slot, in diffusers' pack order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from klein_jax import latents as latent_ops
from klein_jax.models.vae import Flux2VAE
from klein_jax.models.vae_blocks import Attention, GroupNorm, ResnetBlock2D


def valid_mask(height: int, width: int, valid_hw: jax.Array, scale: int) -> jax.Array:
    """(1, height, width, 1) float32: 1 where row < valid_h / scale and col < valid_w / scale."""
    rows = jnp.arange(height)[:, None] < valid_hw[0] // scale
    cols = jnp.arange(width)[None, :] < valid_hw[1] // scale
    return (rows & cols).astype(jnp.float32)[None, :, :, None]


def masked_group_norm(norm: GroupNorm, x: jax.Array, mask: jax.Array) -> jax.Array:
    """GroupNorm with statistics over the valid positions only (norm's parameters, eps and output dtype)."""
    B, H, W, C = x.shape
    G = norm.num_groups
    x32 = x.astype(jnp.float32).reshape(B, H, W, G, C // G)  # (B, H, W, C) -> (B, H, W, G, C/G)
    m = mask[..., None]  # (1, H, W, 1, 1)
    count = jnp.sum(mask) * (C // G)
    mean = jnp.sum(x32 * m, axis=(1, 2, 4), keepdims=True) / count
    var = jnp.sum(jnp.square((x32 - mean) * m), axis=(1, 2, 4), keepdims=True) / count  # two-pass, biased
    y = ((x32 - mean) * jax.lax.rsqrt(var + norm.eps)).reshape(B, H, W, C)  # -> (B, H, W, C)
    y = y * norm.scale[...].astype(jnp.float32) + norm.bias[...].astype(jnp.float32)
    return y.astype(norm.dtype)


def _zero_outside(x: jax.Array, mask: jax.Array) -> jax.Array:
    return x * mask.astype(x.dtype)


def masked_resnet(block: ResnetBlock2D, x: jax.Array, mask: jax.Array) -> jax.Array:
    """ResnetBlock2D on the valid region (the input is zero outside it)."""
    h = block.conv1(_zero_outside(nnx.silu(masked_group_norm(block.norm1, x, mask)), mask))
    h = block.conv2(_zero_outside(nnx.silu(masked_group_norm(block.norm2, h, mask)), mask))
    shortcut = x if block.conv_shortcut is None else block.conv_shortcut(x)
    return _zero_outside(shortcut + h, mask)


def masked_attention(attn: Attention, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mid-block self-attention whose keys are the valid positions only."""
    B, H, W, C = x.shape
    h = masked_group_norm(attn.group_norm, x, mask)
    q = attn.to_q(h).reshape(B, H * W, 1, C)  # (B, H, W, C) -> (B, L, 1 head, C)
    k = attn.to_k(h).reshape(B, H * W, 1, C)
    v = attn.to_v(h).reshape(B, H * W, 1, C)
    key_mask = mask.reshape(1, 1, 1, H * W) > 0  # (1, heads, queries, keys), broadcast over queries
    o = jax.nn.dot_product_attention(q, k, v, mask=key_mask)  # XLA path: cuDNN takes no arbitrary mask
    o = attn.to_out(o.reshape(B, H, W, C))  # (B, L, 1, C) -> (B, H, W, C)
    return _zero_outside(o + x, mask)


def masked_encode(vae: Flux2VAE, images: jax.Array, valid_hw: jax.Array) -> jax.Array:
    """Posterior mean (B, H/8, W/8, 32) of images (B, H, W, 3) whose valid region is the top-left valid_hw (2,)."""
    encoder = vae.encoder
    H, W = images.shape[1:3]
    scale = 1
    mask = valid_mask(H, W, valid_hw, scale)
    x = encoder.conv_in(_zero_outside(images, mask))
    for block in encoder.down_blocks:
        x = _zero_outside(x, mask)
        for resnet in block.resnets:
            x = masked_resnet(resnet, x, mask)
        if block.downsamplers is not None:
            x = block.downsamplers[0](x)  # input is zero outside the valid region: the F.pad row/column is exact
            scale *= 2
            mask = valid_mask(H // scale, W // scale, valid_hw, scale)
            x = _zero_outside(x, mask)
    mid = encoder.mid_block
    x = masked_resnet(mid.resnets[0], x, mask)
    if mid.attentions is not None:
        x = masked_attention(mid.attentions[0], x, mask)
    x = masked_resnet(mid.resnets[1], x, mask)
    x = encoder.conv_out(_zero_outside(nnx.silu(masked_group_norm(encoder.conv_norm_out, x, mask)), mask))
    moments = x if vae.quant_conv is None else vae.quant_conv(x)
    return moments[..., : vae.config.latent_channels]  # mean half of (mean | logvar)


def compact_tokens(grid: jax.Array, valid_grid: jax.Array, slot_tokens: int) -> jax.Array:
    """(B, h, w, C) padded grid -> (B, slot_tokens, C): the valid (rows, cols) tokens row-major first, zeros after."""
    B, h, w, C = grid.shape
    rows, cols = valid_grid[0], valid_grid[1]
    k = jnp.arange(slot_tokens)
    index = (k // cols) * w + k % cols  # compact row-major index -> padded flat index
    valid = k < rows * cols
    tokens = jnp.take(grid.reshape(B, h * w, C), jnp.where(valid, index, 0), axis=1)  # (B, h*w, C) -> (B, S, C)
    return jnp.where(valid[None, :, None], tokens, jnp.zeros((), tokens.dtype))


def encode_reference_tokens(vae: Flux2VAE, images: jax.Array, valid_hw: jax.Array, slot_tokens: int) -> jax.Array:
    """Normalised packed reference tokens (B, slot_tokens, 128) of padded images, as _encode_vae_image + _pack."""
    mean = masked_encode(vae, images, valid_hw)
    packed = vae.bn.normalize(latent_ops.patchify(mean))  # (B, H/16, W/16, 128)
    pixels_per_token = images.shape[1] // packed.shape[1]
    return compact_tokens(packed, valid_hw // pixels_per_token, slot_tokens)
