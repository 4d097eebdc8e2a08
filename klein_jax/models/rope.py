"""4-axis interleaved rotary position embedding of the FLUX.2 flow transformer.

Port of diffusers Flux2PosEmbed + get_1d_rotary_pos_embed(repeat_interleave_real=True, use_real=True) and
apply_rotary_emb(use_real_unbind_dim=-1) (transformer_flux2.py, embeddings.py; klein.md §2.4).

diffusers computes the angles pos * omega in float64 and casts cos/sin to float32. JAX runs without x64, so the
angle is carried as an exact sum of float32 parts and reduced modulo 2*pi before cos/sin (Cody-Waite). For integer
positions below 8192 the tables then agree with diffusers' to ~2e-7 absolute; a plain float32 product is off by up
to 2e-4 at position 4095.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Significant bits kept in the "hi" and "mid" parts: an 11-bit constant times an integer position below 2**13
# needs at most 24 bits, so those products are exact in float32.
_SPLIT_BITS = 11


def _truncate(x: np.ndarray, bits: int) -> np.ndarray:
    """x (float64) rounded toward zero to `bits` significant bits."""
    mantissa, exponent = np.frexp(x)
    return np.ldexp(np.trunc(mantissa * 2.0**bits) / 2.0**bits, exponent)


def _split3(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 x -> float32 (hi, mid, lo) with x ~= hi + mid + lo; hi and mid have _SPLIT_BITS significant bits."""
    hi = _truncate(x, _SPLIT_BITS)
    mid = _truncate(x - hi, _SPLIT_BITS)
    lo = x - hi - mid
    return hi.astype(np.float32), mid.astype(np.float32), lo.astype(np.float32)


def rope_frequencies(axes_dims: Sequence[int], theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Per rotation pair: (axis index, omega in float64), concatenated over the axes; both (Dh/2,)."""
    axes, omegas = [], []
    for axis, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"axes_dims_rope entry {dim} (axis {axis}) must be even")
        # diffusers: 1.0 / (theta ** (arange(0, dim, 2, float64) / dim))
        omegas.append(1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)))
        axes.append(np.full(dim // 2, axis))
    return np.concatenate(axes), np.concatenate(omegas)


def rope_tables(ids: jax.Array, axes_dims: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of every rotation angle, float32 (S, Dh/2), from position ids (S, len(axes_dims)).

    Pair j of the head dim rotates by ids[:, axis(j)] * omega_j; axes follow axes_dims in order (t, h, w, l).
    """
    if ids.ndim != 2 or ids.shape[-1] < len(axes_dims):
        raise ValueError(f"position ids must have shape (S, >={len(axes_dims)}), got {ids.shape}")
    axis_of_pair, omega = rope_frequencies(axes_dims, theta)
    omega_hi, omega_mid, omega_lo = _split3(omega)
    two_pi_hi, two_pi_mid, two_pi_lo = _split3(np.array(2 * np.pi))
    pos = ids.astype(jnp.float32)[:, axis_of_pair]  # (S, n_axes) -> (S, Dh/2), as diffusers' ids.float()
    angle_hi, angle_mid, angle_lo = pos * omega_hi, pos * omega_mid, pos * omega_lo  # hi, mid exact
    turns = jnp.round((angle_hi + angle_mid) * np.float32(1 / (2 * np.pi)))  # < 2**11: turns * 2pi parts exact
    reduced = (angle_hi - turns * two_pi_hi) - turns * two_pi_mid  # exact: cancellation of nearby values
    reduced = reduced + angle_mid + (angle_lo - turns * two_pi_lo)
    return jnp.cos(reduced), jnp.sin(reduced)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of x (B, S, H, Dh) in float32 and casts back to x's dtype.

    out[2i] = x[2i] cos_i - x[2i+1] sin_i ; out[2i+1] = x[2i+1] cos_i + x[2i] sin_i, with cos/sin (S, Dh/2).
    """
    B, S, H, Dh = x.shape
    pairs = x.astype(jnp.float32).reshape(B, S, H, Dh // 2, 2)  # (B, S, H, Dh) -> (B, S, H, Dh/2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]  # (S, Dh/2) -> (1, S, 1, Dh/2)
    sin = sin[None, :, None, :]
    out = jnp.stack([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
    return out.reshape(B, S, H, Dh).astype(x.dtype)  # (B, S, H, Dh/2, 2) -> (B, S, H, Dh)
