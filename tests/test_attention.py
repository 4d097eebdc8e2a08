"""Attention backends (klein_jax/models/attention.py): the chunked CPU path, the Pallas splash kernel in interpret
mode and cuDNN (GPU) against XLA attention, with key padding; backend choice and switching."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close
from klein_jax.configs import TINY_TRANSFORMER
from klein_jax.loading.modules import random_module
from klein_jax.models import attention
from klein_jax.models.attention import (attention_implementation, check_attention, chunked_attention,
                                        dot_product_attention, pallas_attention, set_attention)


def _qkv(batch, q_len, kv_len, heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, q_len, heads, head_dim)] + 2 * [(batch, kv_len, heads, head_dim)]
    return [jnp.asarray(2 * rng.standard_normal(s), dtype) for s in shapes]


def _xla_float32(q, k, v, lengths):
    """XLA attention in float32 on the same (possibly bf16-rounded) inputs."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)


# (batch, queries, keys, heads, head dim, key lengths): sequences off the 128-position tiles, key padding of very
# different lengths per row, keys longer than queries (cached reference keys), and an unpadded tile-sized case.
# Interpret mode compiles slowly: the cases are few and small.
CASES = {
    "odd_lengths_padded": (2, 130, 300, 2, 32, (300, 131)),
    "tile_sized_no_mask": (1, 128, 128, 1, 16, None),
}


# (chunk, queries, keys, key lengths): 130 queries in chunks of at most 64 -> 3 chunks of 44 (2 padding rows);
# keys longer than queries; one chunk; a row of a single key.
CHUNKED_CASES = {
    "three_chunks_padded_keys": (64, 130, 300, (300, 131)),
    "one_chunk_no_mask": (512, 100, 100, None),
    "exact_chunks_single_key": (32, 96, 96, (96, 1)),
}


@pytest.mark.parametrize("case", CHUNKED_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_matches_xla(case, dtype):
    """jax's XLA attention one query chunk at a time: equal to it (float32 to 1e-6; bfloat16, in flash attention's
    order, to one rounding step of the output), masks included."""
    chunk, q_len, kv_len, lengths = CHUNKED_CASES[case]
    q, k, v = _qkv(2, q_len, kv_len, 3, 16, dtype, seed=2)
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    got = jax.jit(lambda q, k, v, n: chunked_attention(q, k, v, n, chunk=chunk))(q, k, v, lengths)
    want = jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=n))(q, k, v,
                                                                                                     lengths)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == jnp.float32:
        assert_close(got, want, rel=1e-6, name=case)
    else:
        step = np.abs(np.asarray(want, np.float32)).max() * 2.0 ** -7
        assert np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max() <= step
    if lengths is not None:  # the mask matters: attending every key gives a different answer
        unmasked = chunked_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), None,
                                     chunk=chunk)
        assert np.abs(np.asarray(unmasked) - np.asarray(want, np.float32)).max() > 1e-2


@pytest.mark.parametrize("chunk", [512, 48])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_with_grouped_heads_and_a_causal_padding_mask(chunk, dtype):
    """The text encoder's case: 4 query heads on 2 key/value heads, an explicit (B, 1, T, T) causal mask with padded
    keys per row (a row of no valid key included), in one chunk and in 3 chunks (split with the queries)."""
    B, T = 2, 130
    rng = np.random.default_rng(4)
    q = jnp.asarray(2 * rng.standard_normal((B, T, 4, 16)), dtype)
    k, v = (jnp.asarray(2 * rng.standard_normal((B, T, 2, 16)), dtype) for _ in range(2))
    valid_keys = jnp.arange(T)[None, :] < jnp.asarray([[T], [70]])  # (B, T)
    mask = (jnp.tril(jnp.ones((T, T), bool))[None] & valid_keys[:, None, :])[:, None]  # (B, 1, T, T)
    mask = mask.at[1, 0, 5].set(False)  # a query that sees no key
    got = jax.jit(lambda q, k, v, m: chunked_attention(q, k, v, mask=m, chunk=chunk))(q, k, v, mask)
    want = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m))(q, k, v, mask)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == jnp.float32:
        assert_close(got, want, rel=1e-6, name=f"chunk {chunk}")
    else:
        step = np.abs(np.asarray(want, np.float32)).max() * 2.0 ** -7
        assert np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max() <= step
    # the mask and the head grouping matter: without the mask, or with kv heads repeated the other way, it differs
    unmasked = jax.nn.dot_product_attention(q, k, v)
    assert np.abs(np.asarray(unmasked, np.float32) - np.asarray(want, np.float32)).max() > 1e-2
    tiled = jax.nn.dot_product_attention(q, jnp.tile(k, (1, 1, 2, 1)), jnp.tile(v, (1, 1, 2, 1)), mask=mask)
    assert np.abs(np.asarray(tiled, np.float32) - np.asarray(want, np.float32)).max() > 1e-2


def test_chunked_is_the_backend_of_dot_product_attention():
    """implementation="chunked" runs chunked_attention (key lengths or an explicit mask); is_causal falls back to
    XLA; a per-head mask is refused."""
    q, k, v = _qkv(1, 600, 600, 2, 16, jnp.float32, seed=3)
    lengths = jnp.asarray([500], jnp.int32)
    got = dot_product_attention(q, k, v, implementation="chunked", key_value_seq_lengths=lengths)
    assert_close(got, chunked_attention(q, k, v, lengths), rel=1e-7, name="dispatch")
    mask = jnp.tril(jnp.ones((600, 600), bool))[None, None]
    got = dot_product_attention(q, k, v, implementation="chunked", mask=mask)
    assert_close(got, chunked_attention(q, k, v, mask=mask), rel=1e-7, name="dispatch with a mask")
    causal = dot_product_attention(q, k, v, implementation="chunked", is_causal=True)
    assert_close(causal, jax.nn.dot_product_attention(q, k, v, is_causal=True), rel=1e-7, name="causal fallback")
    with pytest.raises(ValueError, match=r"takes a \(B, 1, Sq, Skv\) mask"):
        chunked_attention(q, k, v, mask=jnp.ones((1, 2, 600, 600), bool))


@pytest.mark.parametrize("case", CASES)
def test_pallas_matches_xla_float32(case):
    batch, q_len, kv_len, heads, head_dim, lengths = CASES[case]
    q, k, v = _qkv(batch, q_len, kv_len, heads, head_dim, jnp.float32)
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    got = jax.jit(pallas_attention)(q, k, v, lengths)
    want = _xla_float32(q, k, v, lengths)
    assert got.dtype == jnp.float32
    assert_close(got, want, rel=1e-5, name=case)
    if lengths is not None:  # the mask matters: attending every key gives a different answer
        unmasked = _xla_float32(q, k, v, None)
        assert np.abs(np.asarray(unmasked - want)).max() > 1e-2


def test_pallas_matches_xla_bfloat16():
    q, k, v = _qkv(2, 200, 200, 3, 64, jnp.bfloat16, seed=1)  # several heads, padded to 256 positions
    lengths = jnp.asarray([200, 77], jnp.int32)
    got = jax.jit(lambda q, k, v, n: dot_product_attention(q, k, v, implementation="pallas",
                                                           key_value_seq_lengths=n))(q, k, v, lengths)
    want = _xla_float32(q, k, v, lengths)
    xla_bf16 = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
    assert got.dtype == jnp.bfloat16
    # bf16 output rounding (2^-9) plus q * 1/sqrt(Dh) rounded to bf16 before the kernel's logits
    assert_close(got, want, rel=1.5e-2, name="pallas bf16 vs float32")
    assert_close(xla_bf16, want, rel=1.5e-2, name="xla bf16 vs float32")


def test_pallas_rejects_masks():
    q, k, v = _qkv(1, 8, 8, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="key_value_seq_lengths only"):
        dot_product_attention(q, k, v, implementation="pallas", is_causal=True)


def test_transformer_with_pallas_equals_xla():
    """set_attention reaches every block: the tiny transformer with padded keys gives XLA's velocity."""
    model = random_module("transformer", TINY_TRANSFORMER, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    B, L, T = 2, 24, 8
    inputs = dict(
        hidden_states=jnp.asarray(rng.standard_normal((B, L, TINY_TRANSFORMER.in_channels)), jnp.float32),
        encoder_hidden_states=jnp.asarray(rng.standard_normal((B, T, TINY_TRANSFORMER.joint_attention_dim)),
                                          jnp.float32),
        timestep=jnp.asarray([0.3, 0.9], jnp.float32),
        img_ids=jnp.asarray(rng.integers(0, 8, (L, 4)), jnp.int32),
        txt_ids=jnp.asarray(rng.integers(0, 8, (T, 4)), jnp.int32),
        kv_lengths=jnp.asarray([T + L, T + 13], jnp.int32),
    )

    def run(module):
        graphdef, state = nnx.split(module)
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))(state, inputs)

    set_attention(model, "xla", jnp.float32)  # this CPU's float32 default is "fused"
    want = run(model)
    switched = set_attention(model, "pallas", jnp.float32)
    assert switched == TINY_TRANSFORMER.num_layers + TINY_TRANSFORMER.num_single_layers
    got = run(model)
    assert_close(got[0], want[0], rel=1e-5, name="unpadded row")
    assert_close(got[1, :13], want[1, :13], rel=1e-5, name="valid tokens of the padded row")


def test_defaults_per_platform(monkeypatch):
    assert attention_implementation(jnp.bfloat16) == "chunked"  # this CPU: 16-bit stays on XLA
    assert attention_implementation(jnp.float32, head_dim=512) == "fused"  # the kernel builds here (CI has g++)
    assert attention_implementation(jnp.float32, head_dim=24) == "chunked"  # not a multiple of 16 lanes
    monkeypatch.setenv("KLEIN_JAX_CPU_KERNEL", "0")
    monkeypatch.setattr(attention.cpu_attention, "_load", functools.cache(attention.cpu_attention._load.__wrapped__))
    assert attention_implementation(jnp.float32) == "chunked"  # no kernel: XLA's chunks
    with pytest.raises(ValueError, match="unavailable here: disabled by KLEIN_JAX_CPU_KERNEL=0"):
        check_attention("fused", jnp.float32)
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    assert attention_implementation(jnp.bfloat16, head_dim=128) == "cudnn"
    assert attention_implementation(jnp.float16) == "cudnn"
    assert attention_implementation(jnp.float32, head_dim=128) == "xla"
    assert attention_implementation(jnp.bfloat16, head_dim=512) == "xla"  # the VAE's one 512-wide head
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "tpu")
    assert attention_implementation(jnp.bfloat16, head_dim=128) == "xla"


def test_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="is not one of xla, chunked, fused, cudnn, pallas"):
        check_attention("flash", jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a GPU"):
        check_attention("cudnn", jnp.bfloat16)
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="got float32"):
        check_attention("cudnn", jnp.float32, 128)
    with pytest.raises(ValueError, match="head dim 512"):
        check_attention("cudnn", jnp.bfloat16, 512)
    with pytest.raises(ValueError, match="has no attention"):
        set_attention(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "xla", jnp.float32)


def test_pipeline_and_cli_take_attention(tmp_path):
    from klein_jax.cli import build_parser
    from klein_jax.pipeline import KleinPipeline
    from server.__main__ import build_parser as server_parser

    with pytest.raises(ValueError, match="needs a GPU"):  # refused before anything is read
        KleinPipeline.from_pretrained(tmp_path / "no-such-model", "float32", attention="cudnn")
    assert build_parser().parse_args(["--demo", "--prompt", "x", "--attention", "pallas"]).attention == "pallas"
    assert server_parser().parse_args(["--demo", "--attention", "xla"]).attention == "xla"
    with pytest.raises(SystemExit):
        server_parser().parse_args(["--demo", "--attention", "flash"])


@pytest.mark.gpu
def test_cudnn_with_key_lengths_matches_xla():
    q, k, v = _qkv(2, 300, 300, 4, 128, jnp.bfloat16, seed=2)
    lengths = jnp.asarray([300, 45], jnp.int32)
    got = jax.jit(lambda q, k, v, n: dot_product_attention(q, k, v, implementation="cudnn",
                                                           key_value_seq_lengths=n))(q, k, v, lengths)
    assert_close(got, _xla_float32(q, k, v, lengths), rel=1.5e-2, name="cudnn bf16 vs xla float32")


def test_chunked_bfloat16_is_closer_to_torch_sdpa_than_xla_order():
    """16-bit chunked attention runs in flash attention's order, as torch's CPU SDPA kernel does: it agrees with
    torch's bfloat16 SDPA in more outputs than jax's XLA order (probabilities rounded before the values) and is no
    farther from the exact (float64) result."""
    import torch

    q, k, v = (jnp.asarray(x, jnp.float32).astype(jnp.bfloat16) for x in _qkv(1, 600, 600, 4, 64, jnp.float32, 5))
    got = np.asarray(jax.jit(lambda q, k, v: chunked_attention(q, k, v, chunk=256))(q, k, v), np.float32)
    xla = np.asarray(jax.nn.dot_product_attention(q, k, v), np.float32)
    tq, tk, tv = (torch.from_numpy(np.asarray(x, np.float32)).transpose(1, 2) for x in (q, k, v))
    torch_bf16 = torch.nn.functional.scaled_dot_product_attention(tq.bfloat16(), tk.bfloat16(), tv.bfloat16())
    torch_bf16 = torch_bf16.transpose(1, 2).float().numpy()
    exact = torch.nn.functional.scaled_dot_product_attention(tq.double(), tk.double(), tv.double())
    exact = exact.transpose(1, 2).numpy()
    same_got, same_xla = np.mean(got == torch_bf16), np.mean(xla == torch_bf16)
    errors = {name: np.abs(out - exact).max() for name, out in (("chunked", got), ("xla", xla), ("torch", torch_bf16))}
    print(f"equal to torch bf16: chunked {same_got:.3f}, xla order {same_xla:.3f}; max error vs float64: {errors}")
    assert same_got > same_xla + 0.1
    assert np.abs(got - exact).max() <= np.abs(xla - exact).max()
    assert np.abs(got - exact).mean() < np.abs(xla - exact).mean()


def test_default_chunks_shrink_with_heads_and_keys():
    """Without chunk=, the chunk holds about LOGITS_PER_CHUNK logits over all heads, within [64, 512] queries: the
    medium benchmark's 4 heads x 1536 keys keep 512, klein-4B's 24 x 1536 get 113 and 24 x 4608 the floor of 64; a
    case with several default-sized chunks still equals XLA attention."""
    assert attention.chunk_queries(4, 1536) == attention.CHUNK_QUERIES == 512
    assert attention.chunk_queries(24, 1536) == attention.LOGITS_PER_CHUNK // (24 * 1536) == 113
    assert attention.chunk_queries(24, 4608) == attention.MIN_CHUNK_QUERIES == 64
    q, k, v = _qkv(1, 200, 2048, 24, 8, jnp.float32, seed=6)  # 85 queries per chunk: 3 chunks
    assert attention.chunk_queries(24, 2048) == 85
    lengths = jnp.asarray([1500], jnp.int32)
    got = jax.jit(lambda q, k, v, n: chunked_attention(q, k, v, n))(q, k, v, lengths)
    assert_close(got, jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths), rel=1e-6, name="default")
