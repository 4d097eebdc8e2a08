"""Port of transformers Qwen3ForCausalLM (models/qwen3/modeling_qwen3.py) as the klein text-feature extractor.

Only what Flux2KleinPipeline._get_qwen3_prompt_embeds reads is built: the token embedding and decoder layers
0..max(out_layers)-1 (plus the final norm only if the last hidden state is read, which transformers returns normed).
Attribute names mirror transformers' `model.*` names so that the key map is a rename.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klein_jax.configs import TextEncoderConfig
from klein_jax.models import matmul
from klein_jax.models.layers import RMSNorm, attention_implementation, dot_product_attention, rms_normalize, silu


def rope_cos_sin(num_tokens: int, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """Qwen3RotaryEmbedding for positions arange(T): cos, sin (T, Dh), angles in fp32, cast to `dtype` as torch."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))  # (Dh/2,)
    positions = jnp.arange(num_tokens, dtype=jnp.float32)
    freqs = positions[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]  # (T, Dh/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (T, Dh): rotate-half layout
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """(x1, x2) -> (-x2, x1) over the last axis (Llama / Qwen layout, not the DiT's interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, H, Dh) rotated by per-position cos/sin (T, Dh), in x's dtype as transformers' apply_rotary_pos_emb."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (T, Dh) -> (1, T, 1, Dh)
    return x * cos + rotate_half(x) * sin


def attention_mask_4d(attention_mask: jax.Array) -> jax.Array:
    """Causal AND key-padding, (B, T) 0/1 -> (B, 1, T, T) bool, as transformers' sdpa_mask (True = attend)."""
    T = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))  # (T_q, T_k)
    return (causal[None, :, :] & (attention_mask[:, None, :] != 0))[:, None]  # (B, 1, T, T)


class TextMask(NamedTuple):
    """The attention mask of a batch of token rows, in the forms the attention backends take."""

    dense: jax.Array  # (B, 1, T, T) bool: causal AND key padding (attention_mask_4d)
    has_key: jax.Array  # (B, T) bool: the query attends at least one key
    lengths: jax.Array  # (B,) int32: the tokens of each row (its ones)
    padding_at_end: jax.Array  # () bool: every row is ones then zeros, with at least one 1: dense == causal + lengths


def text_mask(attention_mask: jax.Array) -> TextMask:
    """(B, T) 0/1 -> TextMask (the tokenizer pads at the end; any 0/1 mask is honoured through `dense`)."""
    T = attention_mask.shape[1]
    dense = attention_mask_4d(attention_mask)
    lengths = jnp.sum(attention_mask != 0, axis=1, dtype=jnp.int32)
    prefix = (attention_mask != 0) == (jnp.arange(T)[None, :] < lengths[:, None])
    return TextMask(dense, dense[:, 0].any(axis=-1), lengths, jnp.all(prefix) & jnp.all(lengths > 0))


def text_attention_implementation(dtype, head_dim: int) -> str:
    """The text encoder's backend: off the CPU XLA's (its explicit causal + padding mask; cuDNN and Pallas take none);
    on the CPU the default (attention_implementation): "fused" takes the mask as is_causal + lengths when the padding
    is at the end (the tokenizer's), "chunked" any mask."""
    return attention_implementation(dtype, head_dim) if jax.default_backend() == "cpu" else "xla"


class Qwen3RMSNorm(RMSNorm):
    """Qwen3RMSNorm: normalised in fp32 and cast to the input dtype *before* the weight multiplies it.

    In bf16 that is two roundings where torch.nn.RMSNorm (layers.RMSNorm, the flow transformer's) has one.
    """

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., D)
        return self.scale[...] * rms_normalize(x, self.eps).astype(x.dtype)  # weight * hidden.to(input_dtype)


class Qwen3Attention(nnx.Module):
    """GQA self-attention with per-head q/k RMSNorm before RoPE (Qwen3Attention)."""

    def __init__(self, config: TextEncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        D, H, K, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        linear = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, dot_general=matmul.dot_general, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, Dh
        self.mask_attention = text_attention_implementation(dtype, Dh)  # not switched by set_attention
        self.q_proj = nnx.Linear(D, H * Dh, **linear)
        self.k_proj = nnx.Linear(D, K * Dh, **linear)
        self.v_proj = nnx.Linear(D, K * Dh, **linear)
        self.o_proj = nnx.Linear(H * Dh, D, **linear)
        self.q_norm = Qwen3RMSNorm(Dh, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = Qwen3RMSNorm(Dh, eps=config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: TextMask) -> jax.Array:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim))  # (B, T, D) -> (B, T, H, Dh)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim))  # (B, T, K, Dh)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)  # (B, T, K, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # The explicit mask: any 0/1 attention_mask is honoured exactly; query head n reads kv head n // (H // K),
        # as transformers' repeat_kv.
        if self.mask_attention == "fused":  # one branch runs: the kernel for padding at the end, else the dense mask
            out = jax.lax.cond(
                mask.padding_at_end,
                lambda: dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=mask.lengths,
                                              implementation="fused"),
                lambda: dot_product_attention(q, k, v, mask=mask.dense, implementation="chunked"))
        else:
            out = dot_product_attention(q, k, v, mask=mask.dense, implementation=self.mask_attention)  # (B, T, H, Dh)
        # A query that sees no key gives 0, as torch SDPA does (only reachable with left padding or empty rows).
        out = jnp.where(mask.has_key[:, :, None, None], out, jnp.zeros((), out.dtype))
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))  # (B, T, H, Dh) -> (B, T, H*Dh)


class Qwen3MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextEncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        D, I = config.hidden_size, config.intermediate_size
        linear = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, dot_general=matmul.dot_general, rngs=rngs)
        self.gate_proj = nnx.Linear(D, I, **linear)
        self.up_proj = nnx.Linear(D, I, **linear)
        self.down_proj = nnx.Linear(I, D, **linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: TextEncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Qwen3Attention(config, **kw)
        self.mlp = Qwen3MLP(config, **kw)
        norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, **norm)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, **norm)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: TextMask) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3TextEncoder(nnx.Module):
    """input_ids, attention_mask (B, T) -> prompt_embeds (B, T, len(out_layers) * hidden_size).

    Feature index = slot * hidden_size + channel, slot = position in `config.out_layers`, where hidden state k is the
    embedding (k = 0) or the output of decoder layer k-1, as Flux2KleinPipeline._get_qwen3_prompt_embeds stacks them.
    """

    def __init__(self, config: TextEncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        self.layers = nnx.List([Qwen3DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_layers_run)])
        # transformers returns the last hidden state after model.norm; every other one is pre-norm.
        self.norm = (Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
                     if config.num_layers_run == config.num_hidden_layers else None)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
        B, T = input_ids.shape
        cos, sin = rope_cos_sin(T, self.config.head_dim, self.config.rope_theta, self.dtype)  # (T, Dh) each
        mask = text_mask(attention_mask)
        x = self.embed_tokens(input_ids).astype(self.dtype)  # (B, T, D)
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
            hidden_states.append(x)
        if self.norm is not None:
            hidden_states[-1] = self.norm(x)
        out = jnp.stack([hidden_states[k] for k in self.config.out_layers], axis=2)  # (B, T, S, D)
        return out.reshape(B, T, len(self.config.out_layers) * self.config.hidden_size)  # (B, T, S, D) -> (B, T, S*D)
