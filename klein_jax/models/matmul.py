"""Matrix products of 16-bit operands: accumulated in float32, rounded once to the operands' dtype.

That is what torch's bfloat16 matmul computes (oneDNN on CPU, cuBLAS on GPU) and what XLA's GPU and TPU dots do.
XLA's CPU backend runs a dot of two bfloat16 operands with a bfloat16 result by converting both to float32 first:
float32 speed, a float32 copy of every weight among the compiled program's temporaries (8.89 GiB for klein-4B's
text encoder), and about 1 in 10,000 outputs one bfloat16 step away from torch's. Asked for a float32 result, the
same dot runs on the CPU's bfloat16 units (AMX / AVX512-BF16 where present: a (1536 x 256) @ (256 x 768) product
3.4x faster on this project's VM, docs/benchmarks.md) with no copy and, rounded once, equals torch's matmul bit for
bit. So on CPU every 16-bit product is written that way; elsewhere the plain dot already is it. float32 products
are untouched.

`dot_general` has jax.lax.dot_general's signature (nnx.Linear takes it as `dot_general=`); `matmul` is `x @ w`.
Layers with a bias (the VAE's) are RoundOnceLinear / RoundOnceConv: the float32 result plus the bias, rounded once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from klein_jax.models import cpu_conv

SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_16_bit(dtype) -> bool:
    return jnp.dtype(dtype) in SIXTEEN_BIT


def accumulates_explicitly(lhs, rhs) -> bool:
    """Whether a product of these operands is written as a float32 dot rounded once: two operands of the same 16-bit
    dtype, traced for the CPU."""
    return is_16_bit(lhs.dtype) and jnp.dtype(rhs.dtype) == jnp.dtype(lhs.dtype) and jax.default_backend() == "cpu"


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """jax.lax.dot_general; a 16-bit product without an explicit result type accumulates in float32 on CPU and is
    rounded once to the operands' dtype (module docstring)."""
    out = wide_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
    return out.astype(lhs.dtype) if preferred_element_type is None and accumulates_explicitly(lhs, rhs) else out


def wide_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """jax.lax.dot_general; a 16-bit product without an explicit result type returns its float32 result on CPU, for
    a layer that adds its bias in float32 before the one rounding, as torch does (RoundOnceLinear)."""
    if preferred_element_type is None and accumulates_explicitly(lhs, rhs):
        one_row = _is_one_row(lhs, rhs, dimension_numbers)
        padded = jnp.pad(lhs, ((0, 1), (0, 0))) if one_row else lhs
        out = jax.lax.dot_general(padded, rhs, dimension_numbers, precision=precision,
                                  preferred_element_type=jnp.float32, **kwargs)
        return out[:1] if one_row else out
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def wide_conv_general_dilated(lhs, rhs, *args, preferred_element_type=None, **kwargs):
    """jax.lax.conv_general_dilated; a 16-bit convolution without an explicit result type returns its float32 result
    on CPU, for a layer that adds its bias in float32 before the one rounding, as torch does (RoundOnceConv). There
    a bfloat16 one runs on the AVX512-BF16 kernel where it takes the shapes (klein_jax/models/cpu_conv.py)."""
    if preferred_element_type is None and accumulates_explicitly(lhs, rhs):
        if cpu_conv.supports(lhs, rhs, *args, **kwargs):
            return cpu_conv.conv(lhs, rhs, *args, **kwargs)
        preferred_element_type = jnp.float32
    return jax.lax.conv_general_dilated(lhs, rhs, *args, preferred_element_type=preferred_element_type, **kwargs)


class RoundOnceLinear(nnx.Linear):
    """nnx.Linear whose 16-bit result on CPU is the float32 product plus the bias, rounded once to its dtype (torch's
    addmm order; nnx.Linear rounds the product, then adds the bias in 16 bits: one step apart in about a quarter of
    the outputs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, dot_general=wide_dot_general, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x).astype(self.dtype or x.dtype)


class RoundOnceConv(nnx.Conv):
    """nnx.Conv, the same way: torch's convolution adds its bias before the one rounding. In bfloat16 on a CPU with
    AVX512-BF16 the kernel adds it and rounds (klein_jax/models/cpu_conv.py), writing no float32 intermediate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, conv_general_dilated=wide_conv_general_dilated, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        args = self._kernel_arguments()
        if self.bias is not None and args is not None and jnp.dtype(self.dtype or x.dtype) == x.dtype:
            y = biased_conv_on_kernel(x, self.kernel[...], self.bias[...], *args)
            if y is not None:
                return y
        return super().__call__(x).astype(self.dtype or x.dtype)

    def _kernel_arguments(self):
        """(strides, padding) of this 2-d convolution for cpu_conv, or None for what it never takes (dilations,
        groups, a padding mode)."""
        if len(self.kernel_size) != 2 or self.feature_group_count != 1 or any(
                d not in (None, 1, (1, 1)) for d in (self.input_dilation, self.kernel_dilation)):
            return None
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides or (1, 1))
        padding = self.padding
        if isinstance(padding, int):
            padding = ((padding, padding),) * 2
        elif isinstance(padding, str) and padding not in ("SAME", "VALID"):
            return None
        return strides, padding


def biased_conv_on_kernel(x, kernel, bias, window_strides, padding) -> jax.Array | None:
    """An NHWC x HWIO convolution plus bias rounded once to bfloat16 by the CPU kernel (cpu_conv), or None where the
    kernel does not take it (then the caller runs XLA's): RoundOnceConv's and the VAE upsampler's one test."""
    if accumulates_explicitly(x, kernel) and cpu_conv.supports(x, kernel, window_strides, padding,
                                                               dimension_numbers=cpu_conv.NHWC):
        return cpu_conv.conv(x, kernel, window_strides, padding, dimension_numbers=cpu_conv.NHWC, bias=bias)
    return None


def _is_one_row(lhs, rhs, dimension_numbers) -> bool:
    """Whether this is a (1, K) @ (K, N) product (a modulation of one image). XLA's CPU runs those with a
    matrix-vector kernel that converts the weights to float32 first (216 MiB of temporaries and 59 ms for a
    3072 x 18432 kernel; klein-4B's modulations hold 0.64 GiB); padded to two rows: no copy, 16 ms."""
    (contracting, batch) = dimension_numbers
    return (lhs.ndim == 2 and rhs.ndim == 2 and lhs.shape[0] == 1 and tuple(map(tuple, contracting)) == ((1,), (0,))
            and not len(batch[0]))


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x (..., K) and w (K, N), through dot_general."""
    return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
