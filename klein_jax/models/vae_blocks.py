"""Building blocks of the FLUX.2 VAE, channels-last (NHWC).

Ports of diffusers ResnetBlock2D (resnet.py), Downsample2D (downsampling.py), Upsample2D (upsampling.py),
the mid-block Attention with AttnProcessor2_0 (attention_processor.py), UNetMidBlock2D, DownEncoderBlock2D,
UpDecoderBlock2D (unets/unet_2d_blocks.py) and Encoder / Decoder (autoencoders/vae.py), as configured by
AutoencoderKLFlux2: GroupNorm eps 1e-6 everywhere, SiLU, dropout 0, output_scale_factor 1, no time embedding.
Attribute names mirror diffusers so that klein_jax/loading/keymaps/vae.py is a rename table.

Masks: the encoder's blocks take an optional validity mask (B or 1, H, W, 1) bool, True on the valid region, for
an image zero-padded to a larger (bucket) shape. GroupNorm statistics then span the valid positions only, every
convolution with a spatial extent sees its input zeroed outside them (as torch's zero padding, and the stride-2
downsampler's extra bottom/right zero row, at the valid border), and the mid-block attention excludes padded
positions as keys. Valid outputs then equal the unpadded computation on the valid crop, whatever the padding holds,
when the valid region is a top-left rectangle whose sides are multiples of the encoder's downsampling factor.
With mask=None every block computes exactly the unmasked diffusers forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from klein_jax.models import cpu_conv, matmul
from klein_jax.models.attention import attention_implementation, dot_product_attention
from klein_jax.models.layers import silu

NORM_EPS = 1e-6  # diffusers Encoder/Decoder pass resnet_eps=1e-6 and GroupNorm(eps=1e-6) everywhere


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm(affine=True) over the last (channel) axis; statistics in fp32, cast back."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = NORM_EPS, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:  # (B, ..., C)
        B, C = x.shape[0], x.shape[-1]
        x32 = x.astype(jnp.float32).reshape(B, -1, C)  # (B, ..., C) -> (B, N, C)
        valid = None if mask is None else mask.reshape(mask.shape[0], -1, 1)  # (B|1, ..., 1) -> (B|1, N, 1)
        count = x32.shape[1] if valid is None else jnp.sum(valid, axis=1, keepdims=True)  # positions: N or (B|1, 1, 1)
        mean = self._group_mean(_position_sum(x32, valid), count)  # (B, 1, C)
        var = self._group_mean(_position_sum(jnp.square(x32 - mean), valid), count)  # two-pass, biased, as torch
        # x * a + c per channel, torch's CPU kernel's form: x - mean is then only the variance's, and XLA fuses it
        # into that reduction instead of writing it out for the normalisation too.
        a = jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)  # (B, 1, C)
        c = self.bias[...].astype(jnp.float32) - mean * a
        return (x32 * a + c).reshape(x.shape).astype(self.dtype)  # (B, N, C) -> (B, ..., C)

    def _group_mean(self, sums: jax.Array, count) -> jax.Array:
        """Per-channel sums (B, C) over `count` positions -> each channel's group mean (B, 1, C)."""
        B, C = sums.shape
        G = self.num_groups
        group = sums.reshape(B, G, C // G).sum(axis=-1, keepdims=True) / (count * (C // G))  # (B, G, 1)
        return jnp.broadcast_to(group, (B, G, C // G)).reshape(B, 1, C)


def _position_sum(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """(B, N, C) -> (B, C) summed over the (valid) positions.

    Channels first, then groups: a reduction over the major axis with channels contiguous vectorises on XLA CPU,
    where reducing (B, N, G, C/G) over axes (1, 3) at once ran about 1.5x slower than torch's GroupNorm.
    """
    return jnp.sum(x if valid is None else jnp.where(valid, x, 0), axis=1)


def zero_outside(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x with zeros where mask is False (the input a convolution sees; see the module docstring); x if no mask."""
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def conv2d_nhwc(cin: int, cout: int, kernel: int, *, dtype, param_dtype, rngs, strides: int = 1,
                padding=None) -> nnx.Conv:
    """torch Conv2d(cin, cout, kernel, padding=kernel // 2) in NHWC (explicit symmetric padding by default); in
    16 bits on CPU the bias is added before the one rounding, as torch does (matmul.RoundOnceConv)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return matmul.RoundOnceConv(cin, cout, (kernel, kernel), strides=strides, padding=padding, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 conv_shortcut when channels change."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(groups, cin, **kw)
        self.conv1 = conv2d_nhwc(cin, cout, 3, rngs=rngs, **kw)
        self.norm2 = GroupNorm(groups, cout, **kw)
        self.conv2 = conv2d_nhwc(cout, cout, 3, rngs=rngs, **kw)
        self.conv_shortcut = conv2d_nhwc(cin, cout, 1, rngs=rngs, **kw) if cin != cout else None

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:  # (B, H, W, Cin) -> (B, H, W, Cout)
        h = self.conv1(zero_outside(silu(self.norm1(x, mask)), mask))
        h = self.conv2(zero_outside(silu(self.norm2(h, mask)), mask))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)  # 1x1: position-wise
        return shortcut + h


class Downsample2D(nnx.Module):
    """3x3 conv, stride 2, after zero padding (bottom 1, right 1): diffusers Downsample2D with padding=0."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        # F.pad(x, (0, 1, 0, 1)) then padding=0 == asymmetric conv padding ((0, 1), (0, 1))
        self.conv = conv2d_nhwc(channels, channels, 3, strides=2, padding=((0, 1), (0, 1)), dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:  # (B, H, W, C) -> (B, H/2, W/2, C)
        return self.conv(zero_outside(x, mask))


# Nearest x2 then a 3x3 conv, per output phase a (row 2i + a): phase 0 reads upsampled rows 2i-1, 2i, 2i+1, i.e.
# input rows i-1, i, i (taps 0 | 1+2); phase 1 reads rows 2i, 2i+1, 2i+2, i.e. i, i, i+1 (taps 0+1 | 2). Columns alike.
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))  # [phase][2x2 tap][3x3 tap]


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 then 3x3 conv (diffusers Upsample2D, use_conv=True, interpolate=True).

    Computed without the upsampled image: each of the 4 output phases is a 2x2 conv of the input whose taps are
    the 3x3 taps that land on the same input pixel, summed (_PHASE_TAPS): 16 instead of 36 multiply-adds per input
    pixel and channel pair, and no 4x larger intermediate. One 2x2 conv with the 4 phases as output channels, over
    the input zero-padded by 1 (torch's padding of the upsampled image), gives every phase at a 1-pixel offset.
    """

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = conv2d_nhwc(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, 2H, 2W, C)
        B, H, W, C = x.shape
        dtype = self.conv.dtype or x.dtype
        taps = jnp.asarray(_PHASE_TAPS, jnp.float32)  # (2 phases, 2, 3)
        kernel = self.conv.kernel[...].astype(jnp.float32)  # (3, 3, C, C) HWIO
        # the taps are 0/1: summed as float32 reductions (no dot, so no backend matmul precision applies)
        by_row = jnp.sum(taps[:, :, :, None, None, None] * kernel[None, None], axis=2)  # (a, r, x, C, C)
        phases = jnp.sum(taps[None, None, :, :, :, None, None] * by_row[:, :, None, None], axis=4)  # (a, r, b, s, C, C)
        phases = phases.transpose(1, 3, 4, 0, 2, 5)  # (2, 2, C, 2, 2, C): 2x2 taps, in, phase a, phase b, out
        phases = phases.reshape(2, 2, C, 4 * C)  # output channel (2a + b) * C + o
        x = x.astype(dtype)
        if matmul.is_16_bit(dtype):
            # A summed tap is not a 16-bit number (torch multiplies by each 16-bit tap): it goes in as a high and a
            # low 16-bit part, over the input twice, so the float32 sums see it to 2^-16 of itself.
            high = phases.astype(dtype)
            low = (phases - high.astype(jnp.float32)).astype(dtype)
            x, phases = jnp.concatenate([x, x], axis=-1), jnp.concatenate([high, low], axis=2)
        phases, args = phases.astype(dtype), ((1, 1), ((1, 1), (1, 1)))
        bias = self.conv.bias[...].astype(dtype)
        y = matmul.biased_conv_on_kernel(x, phases, jnp.tile(bias, 4), *args)  # bias added and rounded there
        if y is None:
            y = matmul.wide_conv_general_dilated(x, phases, *args, dimension_numbers=cpu_conv.NHWC)  # (B, H+1, W+1, 4C)
        else:
            bias = None
        y = y.reshape(B, H + 1, W + 1, 2, 2, C)  # (..., 4C) -> (..., phase a, phase b, C)
        # phase (a, b) of input pixel (i, j) is y[i + a, j + b, a, b]
        rows = [jnp.stack([y[:, a:a + H, b:b + W, a, b] for b in (0, 1)], axis=3)  # (B, H, W, 2, C)
                for a in (0, 1)]
        out = jnp.stack(rows, axis=2).reshape(B, 2 * H, 2 * W, C)  # (B, H, 2, W, 2, C) -> (B, 2H, 2W, C)
        return out if bias is None else (out + bias).astype(dtype)  # 16 bits on CPU: float32 until here


class Attention(nnx.Module):
    """Mid-block self-attention: GroupNorm, one head of width C over the H*W tokens, biases, residual."""

    def __init__(self, channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.group_norm = GroupNorm(groups, channels, **kw)
        linear = dict(kw, rngs=rngs)  # the bias added before the rounding, as torch
        self.to_q = matmul.RoundOnceLinear(channels, channels, **linear)
        self.to_k = matmul.RoundOnceLinear(channels, channels, **linear)
        self.to_v = matmul.RoundOnceLinear(channels, channels, **linear)
        self.to_out = matmul.RoundOnceLinear(channels, channels, **linear)  # diffusers to_out.0 (to_out.1 is dropout)
        self.head_dim = channels  # one head as wide as the channels: 512 in FLUX.2, too wide for cuDNN
        self.attention_impl = attention_implementation(dtype, head_dim=channels)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:  # (B, H, W, C)
        B, H, W, C = x.shape
        h = self.group_norm(x, mask)
        q = self.to_q(h).reshape(B, H * W, 1, C)  # (B, H, W, C) -> (B, L, 1 head, C)
        k = self.to_k(h).reshape(B, H * W, 1, C)
        v = self.to_v(h).reshape(B, H * W, 1, C)
        if mask is None:
            o = dot_product_attention(q, k, v, implementation=self.attention_impl)  # (B, L, 1, C), scale 1/sqrt(C)
        else:
            key_mask = mask.reshape(mask.shape[0], 1, 1, H * W)  # (B|1, heads, queries, keys): valid keys only
            o = dot_product_attention(q, k, v, mask=key_mask)  # XLA: the other backends take no arbitrary mask
        o = self.to_out(o.reshape(B, H, W, C))  # (B, L, 1, C) -> (B, H, W, C)
        return o + x


class UNetMidBlock2D(nnx.Module):
    """resnets[0] -> attentions[0] -> resnets[1] (attention optional: mid_block_add_attention)."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, **kw)]) if add_attention else None

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:  # (B, H, W, C)
        x = self.resnets[0](x, mask)
        if self.attentions is not None:
            x = self.attentions[0](x, mask)
        return self.resnets[1](x, mask)


class DownEncoderBlock2D(nnx.Module):
    """`num_layers` resnets, then an optional stride-2 downsampler."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_downsample: bool, *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(cout, **kw)]) if add_downsample else None

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, mask)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, mask)
        return x


class UpDecoderBlock2D(nnx.Module):
    """`num_layers` resnets, then an optional nearest x2 upsampler with a conv."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_upsample: bool, *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def _check_block_types(types: tuple[str, ...], allowed: str) -> None:
    bad = [t for t in types if t != allowed]
    if bad:
        raise ValueError(f"block types {bad} are not supported; the FLUX.2 VAE uses only {allowed!r}")


class Encoder(nnx.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels), f = 2**(levels - 1)."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        _check_block_types(config.down_block_types, "DownEncoderBlock2D")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = conv2d_nhwc(config.in_channels, channels[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                               add_downsample=i < len(channels) - 1, **kw)
            for i in range(len(channels))
        ])
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(groups, channels[-1], dtype=dtype, param_dtype=param_dtype)
        self.conv_out = conv2d_nhwc(channels[-1], 2 * config.latent_channels, 3, **kw)  # double_z: mean | logvar

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:  # mask: (B|1, H, W, 1) bool
        x = self.conv_in(zero_outside(x, mask))
        for block in self.down_blocks:
            x = block(x, mask)
            if block.downsamplers is not None and mask is not None:
                mask = mask[:, ::2, ::2]  # valid rows r < h/2 of the stride-2 output, for an even valid h
        x = self.mid_block(x, mask)
        return self.conv_out(zero_outside(silu(self.conv_norm_out(x, mask)), mask))


class Decoder(nnx.Module):
    """Latent (B, h, w, latent_channels) -> image (B, f*h, f*w, out_channels); layers_per_block + 1 resnets a level."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        _check_block_types(config.up_block_types, "UpDecoderBlock2D")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels, groups = config.decoder_channels[::-1], config.norm_num_groups  # deepest level first
        self.conv_in = conv2d_nhwc(config.latent_channels, channels[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(channels[0], groups, config.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                             add_upsample=i < len(channels) - 1, **kw)
            for i in range(len(channels))
        ])
        self.conv_norm_out = GroupNorm(groups, channels[-1], dtype=dtype, param_dtype=param_dtype)
        self.conv_out = conv2d_nhwc(channels[-1], config.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))
