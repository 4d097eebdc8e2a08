"""Softmax attention backends: XLA's reference, XLA in query chunks (CPU), a fused float32 CPU kernel, cuDNN flash
attention (GPU) and a Pallas splash kernel (TPU).

Every backend computes the same function (torch SDPA's: scale 1/sqrt(Dh), softmax in fp32) on (B, S, H, Dh)
tensors, with `key_value_seq_lengths` (B,) masking the keys past n[b] (klein pads text and references to buckets).
A module picks its backend when it is built (`attention_implementation`) or is switched before it is compiled
(`set_attention`); the backend name rides in the module as a static string, so each backend is its own program.

- "xla": jax.nn.dot_product_attention's XLA path (materialises the (B, H, Sq, Skv) logits); every platform.
- "chunked": the same function (jax's XLA ops in flash attention's order: scaled inside the exponential,
  normalised after the values) in query chunks (chunk_queries: 64 to 512 queries), one per loop iteration, as 3-d
  batched dots, so that a chunk's logits stay in the CPU's cache instead of streaming the whole (B, H, Sq, Skv)
  array through memory several times; the default on CPU in bfloat16, and in float32 where "fused" is unavailable
  (3x faster than "xla" on the medium benchmark's attention, docs/benchmarks.md). Takes a (B, 1, Sq, Skv) mask= (the
  text encoder's); is_causal= falls back to "xla".
- "fused": "chunked"'s function in one XLA FFI custom call (cpu_attention.py / cpu_attention.cc, built on first use
  with the host's C++ compiler): each block of queries' logits stays in the core's cache from the first product to the
  last; the default on CPU for float32 when it builds. Takes is_causal= (the text encoder's); head dims that are not
  multiples of 16, other dtypes and mask= run "chunked" instead.
- "cudnn": jax.nn.dot_product_attention(implementation="cudnn"), cuDNN flash attention: GPU, 16-bit compute,
  head dims of at most 128 (256 on Hopper) that are multiples of 8.
- "pallas": JAX's Pallas splash attention for TPU (jax.experimental.pallas.ops.tpu.splash_attention), the key
  padding as segment ids. Off TPU it runs in Pallas interpret mode: slow, only for checking its numerics.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from klein_jax.models import cpu_attention
from klein_jax.models.matmul import is_16_bit

log = logging.getLogger(__name__)

BACKENDS = ("xla", "chunked", "fused", "cudnn", "pallas")
CHUNK_QUERIES = 512  # "chunked": the most queries per chunk (and the fewest, MIN_CHUNK_QUERIES, below)
MIN_CHUNK_QUERIES = 64
LOGITS_PER_CHUNK = 1 << 22  # float32 logits per chunk over all heads (16 MiB): the fastest on this project's CPUs
CUDNN_MAX_HEAD_DIM = 128  # the bound on every cuDNN-capable GPU (Hopper takes 256; jax checks at compile time)
FILL = -0.7 * float(jnp.finfo(jnp.float32).max)  # the logit of a masked key, jax's XLA attention's
PALLAS_LANES = 128  # splash tiles are multiples of 128 positions: sequences are padded to one


def attention_implementation(dtype, head_dim: int | None = None) -> str:
    """The default backend: on CPU the fused kernel for float32 (when it builds here) and chunked XLA otherwise;
    cuDNN on GPU for 16-bit compute (and head dims it takes); XLA otherwise.

    TPU stays on XLA until the Pallas kernel has been measured there (docs/benchmarks.md).
    """
    if jax.default_backend() == "cpu":
        fused = jnp.dtype(dtype) == jnp.float32 and (head_dim is None or head_dim % cpu_attention.LANES == 0)
        return "fused" if fused and cpu_attention.available() else "chunked"
    fits = head_dim is None or (head_dim <= CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0)
    return "cudnn" if jax.default_backend() == "gpu" and is_16_bit(dtype) and fits else "xla"


def check_attention(name: str, dtype, head_dim: int | None = None) -> str:
    """`name` if that backend can run attention in `dtype` (of `head_dim`, when given) here; else a ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"attention {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "fused":
        if jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32:
            raise ValueError(f"attention 'fused' is a float32 CPU kernel; got {jnp.dtype(dtype).name} on "
                             f"{jax.default_backend()}")
        if (reason := cpu_attention.unavailable_reason()) is not None:
            raise ValueError(f"attention 'fused' is unavailable here: {reason}")
    if name == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention 'cudnn' needs a GPU; this process runs on {jax.default_backend()}")
        if not is_16_bit(dtype) or (head_dim is not None and (head_dim % 8 or head_dim > 256)):
            raise ValueError(f"attention 'cudnn' takes bfloat16/float16 and head dims that are multiples of 8 up "
                             f"to 256 (128 before Hopper); got {jnp.dtype(dtype).name}, head dim {head_dim}")
    return name


def set_attention(module, name: str, dtype) -> int:
    """Switches every attention of `module` (submodules with `attention_impl` and `head_dim`) to backend `name`.

    Call before the module is split for compilation. Returns how many attentions were switched; a module without
    any is a ValueError, and so is a backend that cannot run one of them (check_attention).
    """
    attentions = [sub for _, sub in nnx.iter_modules(module) if hasattr(sub, "attention_impl")]
    if not attentions:
        raise ValueError(f"{type(module).__name__} has no attention to switch")
    for head_dim in sorted({sub.head_dim for sub in attentions}):
        check_attention(name, dtype, head_dim)
    if name == "pallas" and jax.default_backend() != "tpu":
        log.warning("attention 'pallas' is a TPU kernel: on %s it runs in Pallas interpret mode (slow)",
                    jax.default_backend())
    for sub in attentions:
        sub.attention_impl = name
    return len(attentions)


def dot_product_attention(q, k, v, *, mask=None, is_causal: bool = False, implementation: str | None = None,
                          key_value_seq_lengths=None):
    """Softmax attention on (B, S, H, Dh) tensors, scale 1/sqrt(Dh); softmax in fp32 as SDPA does.

    key_value_seq_lengths (B,) int32: only the first n keys of row b are attended (padding at the end).
    implementation: one of BACKENDS, or None for "xla". The Pallas kernel takes no explicit mask and no causal mask.
    """
    if implementation == "pallas":
        if mask is not None or is_causal:
            raise ValueError("attention 'pallas' takes key_value_seq_lengths only, not mask= or is_causal=")
        return pallas_attention(q, k, v, key_value_seq_lengths)
    if implementation == "fused" and mask is None and cpu_attention.supports(q, k):
        return cpu_attention.fused_attention(q, k, v, key_value_seq_lengths, is_causal=is_causal)
    if implementation in ("chunked", "fused") and not is_causal:
        return chunked_attention(q, k, v, key_value_seq_lengths, mask=mask)
    xla_or_cudnn = None if implementation in (None, "xla", "chunked", "fused") else implementation
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=xla_or_cudnn,
                                        key_value_seq_lengths=key_value_seq_lengths)


def chunk_queries(heads: int, keys: int) -> int:
    """Queries per chunk for `heads` (batch x query heads) over `keys` keys: LOGITS_PER_CHUNK logits, within
    [MIN_CHUNK_QUERIES, CHUNK_QUERIES]. Measured on a 2-core AVX-512/AMX VM: 4 heads x 1536 keys (the medium
    benchmark) fastest at 512; klein-4B's 24 heads x 1536 keys 1.8x faster (bfloat16) and 1.4x (float32) at 128
    than at 512, and 24 x 4608 (1024x1024) fastest at 64 (docs/benchmarks.md)."""
    return max(MIN_CHUNK_QUERIES, min(CHUNK_QUERIES, LOGITS_PER_CHUNK // (heads * keys)))


def chunked_attention(q, k, v, key_value_seq_lengths=None, *, mask=None, chunk: int | None = None):
    """dot_product_attention one chunk of queries at a time; q (B, Sq, H, Dh), k and v (B, Skv, K, Dh) with K
    dividing H (query head n reads key/value head n // (H / K), as jax and transformers' repeat_kv).

    mask: an optional boolean (B or 1, 1, Sq, Skv) of the keys each query may attend (the text encoder's causal and
    padding mask); key_value_seq_lengths (B,) masks the keys past n[b]. Every dtype runs in flash attention's
    order, as torch's CPU and cuDNN flash kernels do: logits in float32 (masked with jax's large negative number),
    the scale applied inside the exponential, the unnormalised weights times the values (16-bit: the weights rounded to
    the values' dtype, products accumulated in float32), then divided by the weights' float32 sum and rounded once;
    two passes less over each chunk's logits than a softmax first. Float32: within a few 1e-7 of "xla". 16-bit:
    closer to torch's SDPA and to the exact result than jax's XLA order (normalised probabilities rounded to 16 bits
    before the values; tests/test_attention.py), and on CPUs with bfloat16 units both products run on them.

    chunk: queries per chunk, None for chunk_queries(B * H, Skv). The queries are split into n = ceil(Sq / chunk)
    equal chunks, padded by fewer than n rows (dropped at the end). Every dot is a 3-d batched matmul over the B * K
    key/value heads, the G query heads of a group and a chunk's queries side by side: XLA's CPU dots take that layout
    without a copy of the logits.
    """
    B, Sq, H, Dh = q.shape
    Skv, K = k.shape[1], k.shape[2]
    G = H // K
    n = -(-Sq // (chunk or chunk_queries(B * H, Skv)))
    size = -(-Sq // n)
    queries = jnp.pad(q, ((0, 0), (0, n * size - Sq), (0, 0), (0, 0))).reshape(B, n, size, K, G, Dh)
    queries = queries.transpose(1, 0, 3, 4, 2, 5).reshape(n, B * K, G * size, Dh)  # chunk, key head, (group, query)
    keys, values = (x.transpose(0, 2, 1, 3).reshape(B * K, Skv, Dh) for x in (k, v))
    valid = None  # (B or 1, 1, 1 or Sq, Skv): the keys each query may attend
    if key_value_seq_lengths is not None:  # the keys before n[b]
        valid = (jnp.arange(Skv)[None, :] < key_value_seq_lengths[:, None])[:, None, None, :]
    if mask is not None:
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"attention 'chunked' takes a (B, 1, Sq, Skv) mask; got shape {mask.shape}")
        valid = mask if valid is None else valid & mask
    per_query = None  # a mask that differs per query, split into chunks with the queries: (n, B or 1, 1, c, Skv)
    if valid is not None and valid.shape[2] > 1:
        per_query = jnp.pad(valid, ((0, 0), (0, 0), (0, n * size - Sq), (0, 0)))
        per_query = jnp.moveaxis(per_query.reshape(valid.shape[0], 1, n, size, Skv), 2, 0)
    precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                 jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(q.dtype))
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = jnp.asarray(Dh ** -0.5, logits_dtype)

    def masked(logits, keep):  # keep (B or 1, 1, c or 1, Skv) over the logits' (B, K, G, c, Skv)
        if keep is None:
            return logits
        grouped = logits.reshape(B, K, G, size, Skv)
        return jnp.where(keep[:, :, None], grouped, jnp.asarray(FILL, logits.dtype)).reshape(logits.shape)

    def one_chunk(qc, keep):  # (B * K, G * c, Dh) -> the same
        logits = jnp.einsum("bqd,bsd->bqs", qc, keys, precision=precision, preferred_element_type=logits_dtype)
        logits = masked(logits, keep)  # a row of no key weighs every key alike, as "xla" does
        weights = jnp.exp((logits - logits.max(-1, keepdims=True)) * scale)  # float32
        numerators = jnp.einsum("bqs,bsd->bqd", weights.astype(v.dtype), values, precision=precision,
                                preferred_element_type=logits_dtype)
        return (numerators / weights.sum(-1, keepdims=True)).astype(q.dtype)

    def step(xs):  # one chunk of queries and, if any, its rows of the mask
        qc, rows = xs
        return one_chunk(qc, valid if rows is None else rows)

    if n == 1:
        out = step((queries[0], None if per_query is None else per_query[0]))[None]
    else:
        out = jax.lax.map(step, (queries, per_query))  # (n, B * K, G * c, Dh)
    out = out.reshape(n, B, K, G, size, Dh).transpose(1, 0, 4, 2, 3, 5).reshape(B, n * size, H, Dh)
    return out[:, :Sq]


def _block(length: int) -> int:
    """The largest splash tile (512, 256 or 128 positions) dividing `length` (a multiple of 128)."""
    return next(b for b in (512, 256, PALLAS_LANES) if length % b == 0)


def pallas_attention(q, k, v, key_value_seq_lengths=None, *, interpret: bool | None = None):
    """dot_product_attention through Pallas splash attention; q (B, Sq, H, Dh), k and v (B, Skv, H, Dh).

    Both sequences are zero-padded to a multiple of 128; the keys past n[b] (padding, or the lengths' padding) get
    segment id 0 and every query segment 1, so they are never attended. interpret: None = off TPU only.
    """
    B, Sq, H, Dh = q.shape
    Skv = k.shape[1]
    pad_q, pad_kv = -Sq % PALLAS_LANES, -Skv % PALLAS_LANES
    lengths = jnp.full((B,), Skv, jnp.int32) if key_value_seq_lengths is None else key_value_seq_lengths
    segments = None
    if key_value_seq_lengths is not None or pad_kv:
        kv_ids = (jnp.arange(Skv + pad_kv)[None, :] < lengths[:, None]).astype(jnp.int32)  # (B, Skv')
        segments = splash.SegmentIds(q=jnp.ones((B, Sq + pad_q), jnp.int32), kv=kv_ids)

    def heads_first(x, pad):  # (B, S, H, Dh) -> (B, H, S + pad, Dh)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q_len, kv_len = Sq + pad_q, Skv + pad_kv
    blocks = splash.BlockSizes(block_q=_block(q_len), block_kv=_block(kv_len), block_kv_compute=_block(kv_len))
    kernel = splash.make_splash_mha_single_device(
        splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * H), block_sizes=blocks,
        interpret=jax.default_backend() != "tpu" if interpret is None else interpret,
    )
    scaled = q * jnp.asarray(Dh ** -0.5, q.dtype)  # splash does not scale the logits
    args = (heads_first(scaled, pad_q), heads_first(k, pad_kv), heads_first(v, pad_kv))
    out = jax.vmap(kernel)(*args) if segments is None else jax.vmap(kernel)(*args, segment_ids=segments)
    return out.transpose(0, 2, 1, 3)[:, :Sq]  # (B, H, Sq', Dh) -> (B, Sq, H, Dh)
