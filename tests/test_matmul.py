"""16-bit matrix products (klein_jax/models/matmul.py): accumulated in float32 and rounded once, torch's bfloat16
matmul bit for bit, in every layer that multiplies by a kernel; float32 and other backends untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from klein_jax.models import matmul
from klein_jax.models.fused import GroupedLinear
from klein_jax.models.transformer_blocks import bias_free_linear


def _pair(rows=384, inner=256, cols=320, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, inner)).astype(np.float32)
    w = rng.standard_normal((inner, cols)).astype(np.float32)
    return jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)


def _torch(x, w) -> np.ndarray:
    """torch's bfloat16 x @ w on the same values, as float32."""
    tx, tw = (torch.from_numpy(np.asarray(a, np.float32)).bfloat16() for a in (x, w))
    return (tx @ tw).float().numpy()


def test_bfloat16_product_is_torchs_bit_for_bit():
    x, w = _pair()
    want = _torch(x, w)
    got = jax.jit(matmul.matmul)(x, w)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    # the test can fail: XLA's CPU dot of two bfloat16 operands rounds differently in some outputs
    plain = np.asarray(jax.jit(jnp.matmul)(x, w), np.float32)
    assert (plain != want).sum() > 0


def test_layers_multiply_through_it():
    """A transformer linear, a fused projection and the VAE attention's linear (with a bias) in bf16: torch's bf16
    product (and F.linear) on the same weights, bit for bit (the text encoder's bias-free nnx.Linear is built like
    the transformer's)."""
    x, w = _pair(seed=1)
    tx = torch.from_numpy(np.asarray(x, np.float32)).bfloat16()
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    linear = bias_free_linear(w.shape[0], w.shape[1], **kw)
    linear.kernel[...] = w
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(linear, x), np.float32), _torch(x, w))

    grouped = GroupedLinear(w.shape[0], (w.shape[1],), 4, ("to_q",), **kw)
    grouped.grouped_kernel[...] = w.reshape(w.shape[0], 4, -1)
    got = nnx.jit(lambda m, x: m(x))(grouped, x).reshape(x.shape[0], -1)
    np.testing.assert_array_equal(np.asarray(got, np.float32), _torch(x, w))

    from klein_jax.models.vae_blocks import Attention
    attention = Attention(w.shape[0], 8, **kw)
    bias = jnp.asarray(np.random.default_rng(2).standard_normal(w.shape[0]), jnp.bfloat16)
    attention.to_q.kernel[...] = w[:, :w.shape[0]]
    attention.to_q.bias[...] = bias
    got = np.asarray(nnx.jit(lambda m, x: m(x))(attention.to_q, x), np.float32)
    tw, tb = (torch.from_numpy(np.asarray(a, np.float32)).bfloat16() for a in (w[:, :w.shape[0]], bias))
    np.testing.assert_array_equal(got, torch.nn.functional.linear(tx, tw.T, tb).float().numpy())  # bias, then round


def test_float32_and_other_backends_are_untouched(monkeypatch):
    rng = np.random.default_rng(3)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((64, 96), (96, 48)))
    assert not matmul.accumulates_explicitly(x, w)
    np.testing.assert_array_equal(np.asarray(jax.jit(matmul.matmul)(x, w)), np.asarray(jax.jit(jnp.matmul)(x, w)))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert matmul.accumulates_explicitly(xb, wb)
    assert not matmul.accumulates_explicitly(xb, w)  # mixed dtypes: jax's promotion rules, as before
    # an explicit result type is the caller's; the dot is left as asked
    out = matmul.dot_general(xb, wb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # XLA's GPU and TPU dots already accumulate so
    assert not matmul.accumulates_explicitly(xb, wb)
    assert "f32[" not in jax.jit(matmul.matmul).lower(xb, wb).as_text().split("dot_general")[1].split("\n")[0]


def test_bfloat16_programs_do_not_hold_float32_copies_of_the_weights():
    """XLA's CPU dot of two bfloat16 operands converts them to float32 first: a compiled klein-4B forward held a
    float32 copy of every weight as temporaries (text encoder 8.89 GiB, transformer 14.61 GiB at 512x512, and the
    real 4B did not fit a 24 GiB host). Two Qwen3-4B layers with abstract bfloat16 weights: the temporaries stay a
    small fraction of the weights."""
    import dataclasses

    from klein_jax.configs import QWEN3_4B
    from klein_jax.loading import abstract_module

    config = dataclasses.replace(QWEN3_4B, num_hidden_layers=2, out_layers=(1, 2))
    graphdef, state = nnx.split(abstract_module("text_encoder", config, "bfloat16"))
    ids = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    compiled = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask)).lower(state, ids, ids).compile()
    memory = compiled.memory_analysis()
    weights = memory.argument_size_in_bytes
    assert weights > 2 * 2**28  # two layers and the embedding: ~0.9 GB of bfloat16
    print(f"weights {weights / 2**30:.2f} GiB, temporaries {memory.temp_size_in_bytes / 2**30:.3f} GiB")
    assert memory.temp_size_in_bytes < 0.1 * weights


def test_a_product_of_one_row_is_padded_and_keeps_no_float32_weights():
    """A modulation's one row (one image): padded to two rows, so that XLA's CPU does not run its matrix-vector
    kernel, which converts the weights to float32 first; within one bfloat16 step of torch's product (the float32
    sums run in another order)."""
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((1024, 2048)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, 1024)), jnp.bfloat16)
    compiled = jax.jit(matmul.matmul).lower(x, w).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < w.size  # no float32 copy of w (8 MiB)
    got = np.asarray(compiled(x, w), np.float32)
    want = _torch(x, w)
    assert got.shape == (1, 2048) and np.all(np.abs(got - want) <= np.abs(want) * 2.0 ** -7)
    plain = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    assert plain.lower(x, w).compile().memory_analysis().temp_size_in_bytes >= 2 * w.size  # the copy avoided


def test_biased_layers_add_the_bias_before_the_one_rounding():
    """The VAE's convolutions and attention projections in bf16: torch adds the bias to the float32 result and
    rounds once; nnx.Conv / nnx.Linear round the product, then add the bias in 16 bits (one step apart in ~30 % of
    the outputs here). Ours: the linear equals torch's F.linear bit for bit, the 3x3 convolution all but ~0.02 % of
    its outputs (float32 sums in another order)."""
    from klein_jax.models.vae_blocks import conv2d_nhwc

    rng = np.random.default_rng(7)
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((1, 32, 32, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 64)) * 0.1, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(64), jnp.bfloat16)
    tx, tw, tb = (torch.from_numpy(np.asarray(a, np.float32)).bfloat16() for a in (x, w, b))
    run = nnx.jit(lambda m, x: m(x))

    conv = conv2d_nhwc(64, 64, 3, **kw)
    plain = nnx.Conv(64, 64, (3, 3), padding=((1, 1), (1, 1)), **kw)
    for module in (conv, plain):
        module.kernel[...], module.bias[...] = w, b
    want = torch.nn.functional.conv2d(tx.permute(0, 3, 1, 2), tw.permute(3, 2, 0, 1), tb, padding=1)
    want = want.float().permute(0, 2, 3, 1).numpy()
    got = np.asarray(run(conv, x), np.float32)
    assert run(conv, x).dtype == jnp.bfloat16
    assert np.mean(got == want) > 0.999
    assert np.mean(np.asarray(run(plain, x), np.float32) == want) < 0.9  # the order it replaces

    linear = matmul.RoundOnceLinear(64, 64, **kw)
    linear.kernel[...], linear.bias[...] = w[0, 0], b
    rows = x.reshape(-1, 64)
    want = torch.nn.functional.linear(tx.reshape(-1, 64), tw[0, 0].T, tb).float().numpy()
    np.testing.assert_array_equal(np.asarray(run(linear, rows), np.float32), want)


def test_silu_rounds_once_as_torch():
    """SiLU of bfloat16 values (the transformer's SwiGLU and timestep MLPs, the text encoder's MLP, the VAE): equal to
    torch's F.silu bit for bit; jax.nn.silu rounds the sigmoid and then the product, a bfloat16 step off in 37.5 %
    of these outputs (the order it replaces)."""
    from klein_jax.models.layers import silu

    x = jnp.asarray(np.random.default_rng(3).standard_normal(1 << 16) * 4, jnp.bfloat16)
    want = torch.nn.functional.silu(torch.from_numpy(np.asarray(x, np.float32)).bfloat16()).float().numpy()
    got = jax.jit(silu)(x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    assert np.mean(np.asarray(jax.jit(jax.nn.silu)(x), np.float32) != want) > 0.3
