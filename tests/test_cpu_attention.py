"""The fused float32 CPU attention kernel (klein_jax/models/cpu_attention.{py,cc}): against exact float64 attention
and the "chunked" backend, with grouped heads and key lengths; gradients; the build cache and its failures; the
default CPU program really calling it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
from klein_jax.configs import TINY_TRANSFORMER
from klein_jax.loading.modules import random_module
from klein_jax.models import cpu_attention
from klein_jax.models.attention import attention_implementation, chunked_attention, dot_product_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason=f"no kernel: {cpu_attention._load()}")


def exact_attention(q, k, v, lengths=None, causal=False):
    """Softmax attention in float64 numpy: (B, Sq, H, Dh), k and v (B, Skv, K, Dh); keys past n[b] masked (a row of
    none weighs every key alike, as jax's XLA attention), and with causal=True the keys after the query's index."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Sq, H, Dh = q.shape
    group = H // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(Dh)
    keep = np.ones((B, 1, Sq, k.shape[1]), bool)
    if lengths is not None:
        keep = keep & (np.arange(k.shape[1])[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    if causal:
        keep = keep & np.tri(Sq, k.shape[1], dtype=bool)
    logits = np.where(keep, logits, np.where(keep.any(-1, keepdims=True), -np.inf, 0.0))
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


def operands(rng, B, Sq, H, K, Dh, Skv, spread=2.0):
    q = spread * rng.standard_normal((B, Sq, H, Dh))
    k = spread * rng.standard_normal((B, Skv, K, Dh))
    v = rng.standard_normal((B, Skv, K, Dh))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


@pytest.mark.parametrize("B,Sq,H,K,Dh,Skv,lengths,causal", [
    (1, 1536, 4, 4, 64, 1536, None, False),  # the medium benchmark's attention
    (2, 300, 8, 2, 32, 257, (257, 85), False),  # grouped heads, keys not a multiple of the 32-key tile, a row padded
    (2, 37, 4, 4, 16, 70, (0, 3), False),  # a row of no key, a row of three; odd queries (a partial block of 8 rows)
    (1, 50, 1, 1, 128, 4100, None, False),  # one wide head (the VAE's), more keys than one logits block holds rows for
    (2, 512, 4, 2, 16, 512, (37, 512), True),  # the text encoder's: causal, padding at the end, grouped heads
    (1, 200, 2, 1, 64, 200, (130,), True),  # rows of one block see different tiles; rows past 130 see 130 keys
])
def test_matches_exact_attention_as_closely_as_chunked(B, Sq, H, K, Dh, Skv, lengths, causal):
    rng = np.random.default_rng(Sq + Skv)
    q, k, v = operands(rng, B, Sq, H, K, Dh, Skv)
    n = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    exact = exact_attention(q, k, v, lengths, causal)
    fused = jax.jit(lambda q, k, v, n: cpu_attention.fused_attention(q, k, v, n, is_causal=causal))(q, k, v, n)
    mask = jnp.tril(jnp.ones((Sq, Skv), bool))[None, None] if causal else None
    chunked = jax.jit(lambda q, k, v, n: chunked_attention(q, k, v, n, mask=mask))(q, k, v, n)
    xla = jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=n,
                                                                  is_causal=causal))(q, k, v, n)
    scale = np.abs(exact).max()
    errors = [np.abs(np.asarray(x, np.float64) - exact).max() / scale for x in (fused, chunked, xla)]
    # float32 error, as XLA's own: (peaked softmaxes of logits ~50 amplify the logits' rounding to ~1e-6)
    assert errors[0] <= 5e-6 and errors[0] <= 3 * max(errors[1:]), errors
    assert_close(fused, chunked, rel=5e-6, name="fused vs chunked")
    if lengths is not None:  # the lengths matter: the unmasked result is far from it
        unmasked = exact_attention(q, k, v, causal=causal)
        assert np.abs(unmasked - exact).max() > 100 * 2e-6 * scale
    if causal:  # and so does the causal mask
        assert np.abs(exact_attention(q, k, v, lengths) - exact).max() > 100 * 2e-6 * scale


def test_masked_keys_do_not_leak():
    """Changing the keys and values past n[b] does not move the output at all."""
    rng = np.random.default_rng(0)
    q, k, v = operands(rng, 2, 40, 4, 2, 32, 96)
    n = jnp.asarray([50, 96], jnp.int32)
    changed_k, changed_v = k.at[0, 50:].set(100.0), v.at[0, 50:].set(-100.0)
    before = cpu_attention.fused_attention(q, k, v, n)
    after = cpu_attention.fused_attention(q, changed_k, changed_v, n)
    np.testing.assert_array_equal(np.asarray(before[0]), np.asarray(after[0]))
    assert np.abs(np.asarray(before[1] - after[1])).max() == 0.0  # row 1 has no masked keys and no changed ones


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_are_chunked_attentions(causal):
    rng = np.random.default_rng(1)
    q, k, v = operands(rng, 1, 64, 4, 2, 32, 80)
    n = jnp.asarray([70], jnp.int32)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    mask = jnp.tril(jnp.ones((64, 80), bool))[None, None] if causal else None

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    fused = loss(lambda q, k, v: cpu_attention.fused_attention(q, k, v, n, is_causal=causal))
    got = jax.grad(fused, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: chunked_attention(q, k, v, n, mask=mask)), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, rel=1e-6, name=f"d{name}")


def test_default_float32_cpu_program_calls_the_kernel():
    """The transformer built for float32 on this CPU compiles to the kernel's custom call, and its output equals the
    same module on "chunked"."""
    assert attention_implementation(jnp.float32) == "fused"
    model = random_module("transformer", TINY_TRANSFORMER, np.random.default_rng(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    tokens, text = 16, 8
    image = rng.standard_normal((1, tokens, TINY_TRANSFORMER.in_channels))
    prompt = rng.standard_normal((1, text, TINY_TRANSFORMER.joint_attention_dim))
    inputs = dict(hidden_states=jnp.asarray(image, jnp.float32), encoder_hidden_states=jnp.asarray(prompt, jnp.float32),
                  timestep=jnp.ones((1,)), img_ids=jnp.zeros((tokens, 4), jnp.int32),
                  txt_ids=jnp.zeros((text, 4), jnp.int32))
    forward = jax.jit(lambda s: nnx.merge(graphdef, s)(**inputs))
    assert cpu_attention.TARGET in forward.lower(state).as_text()
    fused = forward(state)
    for _, sub in nnx.iter_modules(model):
        if hasattr(sub, "attention_impl"):
            sub.attention_impl = "chunked"
    graphdef, state = nnx.split(model)
    chunked = jax.jit(lambda s: nnx.merge(graphdef, s)(**inputs))(state)
    assert_close(fused, chunked, rel=2e-6)


def test_dispatch_falls_back_for_what_the_kernel_does_not_take():
    rng = np.random.default_rng(2)
    q, k, v = operands(rng, 1, 20, 2, 2, 24, 20)  # Dh 24: not a multiple of 16
    assert_close(dot_product_attention(q, k, v, implementation="fused"), exact_attention(q, k, v), rel=2e-6)
    mask = jnp.tril(jnp.ones((20, 20), bool))[None, None]
    q, k, v = operands(rng, 1, 20, 2, 2, 32, 20)
    got = dot_product_attention(q, k, v, implementation="fused", mask=mask)  # mask=: chunked
    assert_close(got, dot_product_attention(q, k, v, mask=mask), rel=2e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_attention.fused_attention(*operands(rng, 1, 8, 2, 2, 24, 8))


def test_build_is_cached_and_failures_are_clear(tmp_path, monkeypatch):
    compiler = cpu_attention.find_compiler()
    first = cpu_attention.build(compiler, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_attention.build(compiler, tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch left behind
    broken = tmp_path / "broken"
    broken.write_text("int main( {\n")
    monkeypatch.setattr(cpu_attention, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="failed"):
        cpu_attention.build(compiler, tmp_path / "other")


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KLEIN_JAX_KERNEL_CACHE", str(tmp_path / "k"))
    assert cpu_attention.cache_folder() == tmp_path / "k"
    monkeypatch.delenv("KLEIN_JAX_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu_attention.cache_folder() == tmp_path / "klein-jax" / "kernels"
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cpu_attention.find_compiler() is None
