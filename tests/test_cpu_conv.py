"""The bfloat16 CPU convolution kernel (klein_jax/models/cpu_conv.{py,cc}): against exact float64 convolutions beside
XLA's, for the VAE's shapes (taps, paddings, channel counts, widths off its 12-pixel blocks); which calls it takes;
gradients; the bfloat16 VAE's programs calling it and decoding as they did on XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klein_jax.configs import TINY_VAE
from klein_jax.models import cpu_conv, matmul
from klein_jax.models.vae import Flux2VAE

pytestmark = pytest.mark.skipif(not cpu_conv.available(), reason=f"no kernel: {cpu_conv.unavailable_reason()}")

NHWC = ("NHWC", "HWIO", "NHWC")


def exact_conv(x, w, pads):
    """The convolution in float64 numpy: x (B, H, W, Cin), w (KH, KW, Cin, Cout), pads ((top, bottom), (left,
    right))."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
    w = np.asarray(w, np.float64)
    kh, kw = w.shape[:2]
    height, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return sum(np.einsum("bhwc,co->bhwo", x[:, dy:dy + height, dx:dx + width], w[dy, dx])
               for dy in range(kh) for dx in range(kw))


def operands(rng, batch, height, width, cin, cout, kh=3, kw=3):
    x = jnp.asarray(rng.standard_normal((batch, height, width, cin)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)) / np.sqrt(kh * kw * cin), jnp.bfloat16)
    return x, w


CASES = [  # batch, height, width, cin, cout, taps, padding
    (1, 16, 16, 32, 32, (3, 3), ((1, 1), (1, 1))),  # the VAE's 3x3 convolution
    (2, 9, 30, 6, 48, (3, 3), "SAME"),  # two images, 2 x 12 + 6 pixels a row, 32 + 16 output channels
    (1, 8, 11, 64, 256, (2, 2), ((1, 1), (1, 1))),  # the upsampler's phase convolution (4 phases x 64)
    (1, 5, 7, 2, 16, (1, 1), "VALID"),  # one channel pair, rows shorter than a block
    (1, 12, 25, 128, 64, (3, 3), ((2, 0), (0, 1))),  # uneven padding
    (3, 4, 4, 16, 16, (3, 3), ((1, 1), (1, 1))),
]


@pytest.mark.parametrize("batch, height, width, cin, cout, taps, padding", CASES)
def test_matches_exact_convolution_as_closely_as_xla(batch, height, width, cin, cout, taps, padding):
    x, w = operands(np.random.default_rng(cin + cout), batch, height, width, cin, cout, *taps)
    args = ((1, 1), padding)
    assert cpu_conv.supports(x, w, *args, dimension_numbers=NHWC)
    got = np.asarray(jax.jit(lambda x, w: cpu_conv.conv(x, w, *args, dimension_numbers=NHWC))(x, w))
    xla = np.asarray(jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, *args, dimension_numbers=NHWC, preferred_element_type=jnp.float32))(x, w))
    want = exact_conv(x, w, cpu_conv.explicit_padding(x, w, padding))
    assert got.dtype == np.float32 and got.shape == want.shape == xla.shape
    scale = np.abs(want).max()
    error, xla_error = np.abs(got - want).max() / scale, np.abs(xla - want).max() / scale
    assert error <= max(3 * xla_error, 1e-6), (error, xla_error)  # float32 sums: bfloat16 products are exact


def test_every_tap_channel_and_pixel_counts():
    """A change of one input value, one weight or one output channel's weights moves exactly the outputs it should."""
    rng = np.random.default_rng(3)
    x, w = operands(rng, 1, 6, 14, 4, 32)
    run = jax.jit(lambda x, w: cpu_conv.conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC))
    base = np.asarray(run(x, w))
    moved = np.asarray(run(x.at[0, 2, 13, 3].add(1.0), w)) != base  # the last pixel of a row, the last channel
    rows, columns = moved.any(axis=-1)[0].nonzero()
    assert rows.tolist() == [1, 1, 2, 2, 3, 3] and columns.tolist() == [12, 13] * 3  # its 3x3 neighbourhood
    assert moved[0, 2, 13].all()  # every output channel
    moved = np.asarray(run(x, w.at[2, 0, 1, 31].add(1.0))) != base  # the bottom-left tap, the last output channel
    assert moved[..., :31].sum() == 0 and moved[..., 31].sum() > 0


@pytest.mark.parametrize("kwargs", [
    dict(window_strides=(2, 2)),
    dict(lhs_dilation=(2, 2)),
    dict(rhs_dilation=(2, 2)),
    dict(feature_group_count=2),
])
def test_other_convolutions_stay_on_xla(kwargs):
    x, w = operands(np.random.default_rng(0), 1, 8, 8, 32, 32)
    if "feature_group_count" in kwargs:
        w = w[:, :, :16]
    strides = kwargs.pop("window_strides", (1, 1))
    assert not cpu_conv.supports(x, w, strides, "SAME", dimension_numbers=NHWC, **kwargs)


def test_shapes_and_dtypes_it_does_not_take():
    x, w = operands(np.random.default_rng(0), 1, 8, 8, 32, 32)
    assert cpu_conv.supports(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    assert not cpu_conv.supports(x, w[..., :3], (1, 1), "SAME", dimension_numbers=NHWC)  # 3 output channels
    assert not cpu_conv.supports(x[..., :3], w[:, :, :3], (1, 1), "SAME", dimension_numbers=NHWC)  # odd Cin
    assert not cpu_conv.supports(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), "SAME",
                                 dimension_numbers=NHWC)
    assert not cpu_conv.supports(x.astype(jnp.float16), w.astype(jnp.float16), (1, 1), "SAME",
                                 dimension_numbers=NHWC)
    assert not cpu_conv.supports(x, w, (1, 1), ((-1, 0), (0, 0)), dimension_numbers=NHWC)  # cropping
    nchw = jnp.transpose(x, (0, 3, 1, 2))
    assert not cpu_conv.supports(nchw, w, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NHWC"))
    with pytest.raises(ValueError, match="stride 1"):
        cpu_conv.conv(x, w, (2, 2), "SAME", dimension_numbers=NHWC)


def test_gradients_are_xlas():
    x, w = operands(np.random.default_rng(5), 1, 6, 10, 8, 16)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC)))

    xla = lambda x, w, *a, **k: jax.lax.conv_general_dilated(x, w, *a, **k, preferred_element_type=jnp.float32)
    got = jax.grad(loss(cpu_conv.conv), argnums=(0, 1))(x, w)
    want = jax.grad(loss(xla), argnums=(0, 1))(x, w)
    for g, h in zip(got, want):
        assert g.dtype == h.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32), rtol=2e-2, atol=2e-2)


def test_the_bfloat16_vae_calls_it_and_decodes_as_closely_as_on_xla(monkeypatch):
    """The VAE's convolutions (RoundOnceConv and the upsampler's phases) take the kernel in bfloat16 on this CPU, and
    its decode is as close to the float32 decode of the same weights as with XLA's convolutions. (The two bfloat16
    decodes differ from each other by about as much: float32 sums in another order round some bfloat16
    activations the other way, and the random VAE carries that through its layers.)"""
    graph, state = nnx.split(Flux2VAE(TINY_VAE, rngs=nnx.Rngs(0)))
    latents = jax.random.normal(jax.random.key(1), (1, 16, 16, TINY_VAE.latent_channels), jnp.float32)
    reference = np.asarray(jax.jit(lambda state, z: nnx.merge(graph, state).decode(z))(state, latents))
    graph16, _ = nnx.split(Flux2VAE(TINY_VAE, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    state16, latents16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (state, latents))

    def decode():
        program = jax.jit(lambda state, z: nnx.merge(graph16, state).decode(z))
        return program.lower(state16, latents16).as_text(), np.asarray(program(state16, latents16), np.float32)

    text, got = decode()
    assert text.count(cpu_conv.TARGET) >= 8, text.count(cpu_conv.TARGET)
    monkeypatch.setattr(matmul.cpu_conv, "supports", lambda *args, **kwargs: False)
    text, xla = decode()
    assert cpu_conv.TARGET not in text
    assert got.shape == xla.shape == reference.shape == (1, 32, 32, 3) and np.isfinite(got).all()
    error, xla_error = np.abs(got - reference), np.abs(xla - reference)
    assert error.mean() <= 1.25 * xla_error.mean() and error.max() <= 2 * xla_error.max(), (
        error.mean(), xla_error.mean(), error.max(), xla_error.max())
    assert xla_error.mean() < 0.01 * np.abs(reference).max()  # bfloat16's own distance, not a broken decode


def test_the_biased_form_adds_the_bias_and_rounds_once():
    """bias=: the float32 sums plus the bias, rounded once to bfloat16 (what RoundOnceConv computes on XLA); equal to
    that but where the float32 sums' order moves a value across a rounding boundary."""
    x, w = operands(np.random.default_rng(11), 2, 9, 30, 64, 48)
    bias = jnp.asarray(np.random.default_rng(12).standard_normal(48), jnp.bfloat16)
    got = jax.jit(lambda x, w, b: cpu_conv.conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC, bias=b))(x, w, bias)
    exact = exact_conv(x, w, ((1, 1), (1, 1))) + np.asarray(bias, np.float64)
    want = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16), np.float32)
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    got = np.asarray(got, np.float32)
    steps = np.abs(got - want) / (np.abs(want) * 2.0**-7)
    assert np.mean(got == want) > 0.999 and steps.max() <= 1, (np.mean(got == want), steps.max())
    unbiased = np.asarray(jnp.asarray(exact_conv(x, w, ((1, 1), (1, 1))), jnp.float32).astype(jnp.bfloat16))
    assert np.mean(got == np.asarray(unbiased, np.float32)) < 0.5  # the bias is there
    with pytest.raises(ValueError, match="bias must have shape"):
        cpu_conv.conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC, bias=bias[:16])


def test_round_once_conv_takes_the_biased_kernel_and_its_gradients_are_xlas():
    conv = matmul.RoundOnceConv(32, 32, (3, 3), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16,
                                param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.asarray(np.random.default_rng(2).standard_normal(32), jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 8, 13, 32)), jnp.bfloat16)
    graph, state = nnx.split(conv)
    loss = jax.jit(lambda state, x: jnp.sum(jnp.sin(nnx.merge(graph, state)(x).astype(jnp.float32))))
    assert cpu_conv.BIAS_TARGET in jax.jit(lambda s, x: nnx.merge(graph, s)(x)).lower(state, x).as_text()
    grads = jax.grad(loss, argnums=(0, 1))(state, x)
    xla_loss = lambda state, x: jnp.sum(jnp.sin(cpu_conv._xla(  # noqa: E731
        jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), state["kernel"][...], state["bias"][...]).astype(jnp.float32)))
    want = jax.grad(xla_loss, argnums=(0, 1))(state, x)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32), rtol=2e-2, atol=2e-2)
