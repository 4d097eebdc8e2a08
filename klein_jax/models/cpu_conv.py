"""bfloat16 convolutions on the CPU's AVX512-BF16 units (cpu_conv.cc): built once per machine, registered, called.

XLA's CPU backend runs a convolution of bfloat16 operands at float32 speed or slower (one 3x3 convolution of 32
channels at 512x512: 43 ms in bfloat16, 34 in float32, torch's oneDNN 11 in bfloat16 on this project's AMD EPYC VM),
so the VAE in bfloat16 decoded about 1.9x slower than diffusers' there. The kernel computes what
matmul.wide_conv_general_dilated asks of XLA, a bfloat16 convolution with a float32 result (products exact, sums in
float32), with VDPBF16PS, for the VAE's shapes: stride 1, no dilation or groups, NHWC x HWIO, an even input channel
count and an output channel count that is a multiple of 16. Everything else stays on XLA.

Built like the attention kernel (cpu_attention.build: the host's C++ compiler, -march=native, the same cache folder
and KLEIN_JAX_CPU_KERNEL=0 to turn both off), only on a CPU that reports avx512_bf16. Gradients: a custom_vjp
through XLA's convolution.
"""

from __future__ import annotations

import functools
import pathlib
import platform

import jax
import jax.numpy as jnp

from klein_jax.models import cpu_attention


SOURCE = pathlib.Path(__file__).with_name("cpu_conv.cc")
TARGET = "klein_cpu_conv"  # the FFI target names XLA's custom calls carry: float32 result, and bias + bfloat16
BIAS_TARGET = "klein_cpu_conv_bias"
SYMBOLS = {TARGET: "KleinCpuConvolution", BIAS_TARGET: "KleinCpuConvolutionBias"}
LANES = 16  # output channels must be a multiple of this
NHWC = ("NHWC", "HWIO", "NHWC")


@functools.cache
def _load() -> str | None:
    """Builds (if needed), loads and registers the kernel once per process; None if it is available, else why not."""
    def unsupported():
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        return None if x86 and "avx512_bf16" in cpu_attention.cpu_flags() else "the CPU has no AVX512-BF16"

    return cpu_attention.load_kernel(SOURCE, SYMBOLS, "convolutions stay on XLA", unsupported)


def unavailable_reason() -> str | None:
    """None if the kernel can run in this process, else why it cannot (building it on first call)."""
    return _load()


def available() -> bool:
    return _load() is None


def explicit_padding(lhs, rhs, padding) -> tuple[tuple[int, int], ...] | None:
    """`padding` of an NHWC x HWIO stride-1 convolution as ((top, bottom), (left, right)), or None if it is not
    padding that can be applied before the call (negative)."""
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    pads = tuple((int(low), int(high)) for low, high in padding)
    return pads if len(pads) == 2 and min(min(pair) for pair in pads) >= 0 else None


def supports(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count=1, batch_group_count=1, **_) -> bool:
    """Whether the kernel takes this jax.lax.conv_general_dilated call (a CPU trace; the kernel built here)."""
    if not (lhs.ndim == 4 and rhs.ndim == 4 and lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.bfloat16):
        return False
    try:
        numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return False
    if numbers != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC):
        return False
    dilations = tuple(lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1))
    unit = all(s == 1 for s in window_strides) and all(d == 1 for d in dilations)
    return (unit and feature_group_count == 1 and batch_group_count == 1 and lhs.shape[3] == rhs.shape[2]
            and lhs.shape[3] % 2 == 0 and rhs.shape[3] % LANES == 0 and explicit_padding(lhs, rhs, padding) is not None
            and jax.default_backend() == "cpu" and available())


def _pack(w):
    """HWIO (KH, KW, Cin, Cout) -> (KH, KW, Cin/2, Cout, 2): input channel pairs innermost."""
    kh, kw, cin, cout = w.shape
    return w.reshape(kh, kw, cin // 2, 2, cout).transpose(0, 1, 2, 4, 3)


def _call(x, packed, bias=None):
    kh, kw, _, cout, _ = packed.shape
    shape = (x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1, cout)
    if bias is None:
        return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")(
            x, packed)
    return jax.ffi.ffi_call(BIAS_TARGET, jax.ShapeDtypeStruct(shape, jnp.bfloat16), vmap_method="sequential")(
        x, packed, bias.astype(jnp.float32))


def _xla(x, w, bias=None):
    """What the kernel computes, in XLA ops (the gradients' function)."""
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC,
                                     preferred_element_type=jnp.float32)
    return y if bias is None else (y + bias.astype(jnp.float32)).astype(jnp.bfloat16)


@jax.custom_vjp
def _valid_conv(x, w):
    return _call(x, _pack(w))


@jax.custom_vjp
def _valid_conv_bias(x, w, bias):
    return _call(x, _pack(w), bias)


def _backward(residuals, cotangent):
    _, pullback = jax.vjp(_xla, *residuals)
    return pullback(cotangent)


_valid_conv.defvjp(lambda x, w: (_valid_conv(x, w), (x, w)), _backward)
_valid_conv_bias.defvjp(lambda x, w, b: (_valid_conv_bias(x, w, b), (x, w, b)), _backward)


def conv(lhs, rhs, window_strides, padding, *, bias=None, **kwargs):
    """jax.lax.conv_general_dilated of bfloat16 operands with a float32 result, through the kernel (supports());
    with `bias` (Cout,), the float32 result plus the bias rounded once to bfloat16 (torch's biased convolution)."""
    if not supports(lhs, rhs, window_strides, padding, **kwargs):
        raise ValueError(f"the bfloat16 CPU convolution takes NHWC x HWIO bfloat16, stride 1, even Cin, Cout a "
                         f"multiple of {LANES}, here: got {lhs.shape} {lhs.dtype} x {rhs.shape} {rhs.dtype}")
    if bias is not None and bias.shape != (rhs.shape[3],):
        raise ValueError(f"the convolution's bias must have shape ({rhs.shape[3]},); got {bias.shape}")
    pads = explicit_padding(lhs, rhs, padding)
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0))) if any(map(any, pads)) else lhs
    return _valid_conv(x, rhs) if bias is None else _valid_conv_bias(x, rhs, bias)
