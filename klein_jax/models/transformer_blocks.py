"""Double- and single-stream blocks of the FLUX.2 flow transformer.

Port of diffusers Flux2TransformerBlock, Flux2Attention, Flux2FeedForward, Flux2SingleTransformerBlock and
Flux2ParallelSelfAttention (transformer_flux2.py; klein.md §2.5-2.6). Class and attribute names mirror diffusers so
the key map is a rename table; diffusers' attn.to_out.0 is plain `to_out` here. No layer has a bias.

Projections that share an input are one shard-aligned GroupedLinear (klein_jax/models/fused.py): to_q|to_k|to_v as
`to_qkv`, add_q_proj|add_k_proj|add_v_proj as `to_added_qkv`, the MLP's gate|value `linear_in`, the single block's
q|k|v|gate|value `to_qkv_mlp_proj` and its attn|mlp `to_out`; checkpoints keep diffusers' layers (fused at load).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from klein_jax.models import matmul
from klein_jax.models.fused import INPUT, GroupedLinear, groups
from klein_jax.models.layers import RMSNorm, dot_product_attention, layer_norm, silu
from klein_jax.models.rope import apply_rope

KeyValues = tuple[jax.Array, jax.Array]  # post-RoPE keys and values (B, S, H, Dh) of one attention layer


def with_cached(k: jax.Array, v: jax.Array, cached_kv: KeyValues | None) -> KeyValues:
    """Keys and values with cached ones (diffusers Flux2KVCache, klein-9B KV) appended after the sequence's own.

    diffusers puts them between text and image ([txt, ref, img]); key order does not change attention, and at the
    end their padding is masked by key_value_seq_lengths like any padding.
    """
    if cached_kv is None:
        return k, v
    return jnp.concatenate([k, cached_kv[0]], axis=1), jnp.concatenate([v, cached_kv[1]], axis=1)  # (B, S + R, H, Dh)


def bias_free_linear(in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear without bias: no layer of the FLUX.2 transformer has one."""
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      dot_general=matmul.dot_general, rngs=rngs)


def split_modulation(mod: jax.Array, num_sets: int) -> tuple[tuple[jax.Array, jax.Array, jax.Array], ...]:
    """(B, 3*num_sets*D) -> num_sets tuples of (shift, scale, gate), each (B, 1, D) (Flux2Modulation.split)."""
    chunks = jnp.split(mod[:, None, :], 3 * num_sets, axis=-1)  # (B, 3sD) -> 3s x (B, 1, D)
    return tuple(tuple(chunks[3 * i : 3 * i + 3]) for i in range(num_sets))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """(1 + scale) * LayerNorm(x) + shift, the LayerNorm without affine parameters."""
    return (1 + scale) * layer_norm(x, eps) + shift


def swiglu(gate: jax.Array, value: jax.Array) -> jax.Array:
    """SiLU(gate) * value (Flux2SwiGLU on the halves of diffusers' fused gate|value projection)."""
    return silu(gate) * value


class Flux2FeedForward(nnx.Module):
    """SwiGLU MLP with the gate and value projections fused in `linear_in` (diffusers Flux2FeedForward)."""

    def __init__(self, dim: int, hidden_dim: int, num_groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.linear_in = GroupedLinear(dim, (hidden_dim, hidden_dim), num_groups, ("linear_in",), dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs)
        self.linear_out = bias_free_linear(hidden_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = swiglu(*self.linear_in.split(self.linear_in(x)))  # (..., G, F/G): unit g*F/G + i
        return self.linear_out(h.reshape(*h.shape[:-2], h.shape[-2] * h.shape[-1]))  # (..., F) -> (..., D)


class Flux2Attention(nnx.Module):
    """Joint text+image attention of a double-stream block, text first (diffusers Flux2Attention + processor)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_groups: int, *, eps: float,
                 attention_impl: str | None, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attention_impl = attention_impl
        inner = num_heads * head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_qkv = GroupedLinear(dim, (inner,) * 3, num_groups, ("to_q", "to_k", "to_v"), **lin)
        self.to_added_qkv = GroupedLinear(dim, (inner,) * 3, num_groups, ("add_q_proj", "add_k_proj", "add_v_proj"),
                                          **lin)
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (
            RMSNorm(head_dim, eps=eps, param_dtype=param_dtype) for _ in range(4)
        )
        self.to_out = bias_free_linear(inner, dim, **lin)
        self.to_add_out = bias_free_linear(inner, dim, **lin)

    def _heads(self, x: jax.Array) -> jax.Array:
        B, S = x.shape[:2]
        return x.reshape(B, S, self.num_heads, self.head_dim)  # (B, S, G, H/G*Dh) -> (B, S, H, Dh)

    def __call__(self, img: jax.Array, txt: jax.Array, cos: jax.Array, sin: jax.Array,
                 kv_lengths: jax.Array | None = None,
                 cached_kv: KeyValues | None = None) -> tuple[jax.Array, jax.Array, KeyValues]:
        """img (B, L, D), txt (B, T, D), cos/sin (T+L, Dh/2) -> attention outputs (B, L, D), (B, T, D) and the
        joint sequence's post-RoPE keys and values (B, T+L, H, Dh).

        kv_lengths (B,): keys past kv_lengths[b] are not attended (padding); cached_kv: more keys and values
        (B, R, H, Dh), attended after the joint sequence's own.
        """
        B, L, _ = img.shape
        T = txt.shape[1]
        # diffusers applies the QK RMSNorm per stream before RoPE; order matters for parity
        q, k, v = (self._heads(t) for t in self.to_qkv.split(self.to_qkv(img)))
        txt_q, txt_k, txt_v = (self._heads(t) for t in self.to_added_qkv.split(self.to_added_qkv(txt)))
        q, k = self.norm_q(q), self.norm_k(k)
        txt_q, txt_k = self.norm_added_q(txt_q), self.norm_added_k(txt_k)
        q = apply_rope(jnp.concatenate([txt_q, q], axis=1), cos, sin)  # (B, T+L, H, Dh), text first
        k = apply_rope(jnp.concatenate([txt_k, k], axis=1), cos, sin)
        v = jnp.concatenate([txt_v, v], axis=1)
        out = dot_product_attention(q, *with_cached(k, v, cached_kv), implementation=self.attention_impl,
                                    key_value_seq_lengths=kv_lengths)
        out = out.reshape(B, T + L, self.num_heads * self.head_dim)  # (B, T+L, H, Dh) -> (B, T+L, D)
        return self.to_out(out[:, T:]), self.to_add_out(out[:, :T]), (k, v)


class Flux2TransformerBlock(nnx.Module):
    """Double-stream block: separate weights per stream, joint attention (diffusers Flux2TransformerBlock)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden_dim: int, *, eps: float,
                 attention_impl: str | None, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        num_groups = groups(num_heads, mlp_hidden_dim)
        self.attn = Flux2Attention(dim, num_heads, head_dim, num_groups, eps=eps, attention_impl=attention_impl, **kw)
        self.ff = Flux2FeedForward(dim, mlp_hidden_dim, num_groups, **kw)
        self.ff_context = Flux2FeedForward(dim, mlp_hidden_dim, num_groups, **kw)

    def __call__(self, img: jax.Array, txt: jax.Array, mod_img: jax.Array, mod_txt: jax.Array,
                 cos: jax.Array, sin: jax.Array, kv_lengths: jax.Array | None = None,
                 cached_kv: KeyValues | None = None) -> tuple[jax.Array, jax.Array, KeyValues]:
        """img (B, L, D), txt (B, T, D), shared modulations (B, 6D) -> updated (img, txt) and the attention's keys
        and values (Flux2Attention)."""
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = split_modulation(mod_img, 2)
        (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = split_modulation(mod_txt, 2)
        img_attn, txt_attn, kv = self.attn(
            modulate(img, shift_msa, scale_msa, self.eps), modulate(txt, c_shift_msa, c_scale_msa, self.eps), cos, sin,
            kv_lengths, cached_kv,
        )
        img = img + gate_msa * img_attn
        img = img + gate_mlp * self.ff(modulate(img, shift_mlp, scale_mlp, self.eps))
        txt = txt + c_gate_msa * txt_attn
        txt = txt + c_gate_mlp * self.ff_context(modulate(txt, c_shift_mlp, c_scale_mlp, self.eps))
        return img, txt, kv


class Flux2ParallelSelfAttention(nnx.Module):
    """Attention and SwiGLU MLP in parallel, fused input and output projections (ViT-22B style), both grouped:
    group g holds heads g*H/G.. and MLP units g*M/G.. on either side, so a model-axis shard is self-contained."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden_dim: int, *, eps: float,
                 attention_impl: str | None, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim, self.mlp_hidden_dim = num_heads, head_dim, mlp_hidden_dim
        self.attention_impl = attention_impl
        inner = num_heads * head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        num_groups = groups(num_heads, mlp_hidden_dim)
        self.to_qkv_mlp_proj = GroupedLinear(dim, (inner,) * 3 + (mlp_hidden_dim,) * 2, num_groups,
                                             ("to_qkv_mlp_proj",), **lin)  # diffusers rows: q | k | v | gate | value
        self.norm_q = RMSNorm(head_dim, eps=eps, param_dtype=param_dtype)
        self.norm_k = RMSNorm(head_dim, eps=eps, param_dtype=param_dtype)
        self.to_out = GroupedLinear(dim, (inner, mlp_hidden_dim), num_groups, ("to_out",), side=INPUT,
                                    **lin)  # diffusers columns: attn | mlp

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv_lengths: jax.Array | None = None,
                 cached_kv: KeyValues | None = None) -> tuple[jax.Array, KeyValues]:
        """x (B, S, D) (text then image), cos/sin (S, Dh/2) -> (B, S, D) and the post-RoPE keys and values
        (B, S, H, Dh); kv_lengths (B,) masks padded keys, cached_kv (B, R, H, Dh) are attended after x's own."""
        B, S, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        *qkv, gate, value = self.to_qkv_mlp_proj.split(self.to_qkv_mlp_proj(x))  # 5 x (B, S, G, segment/G)
        q, k, v = (t.reshape(B, S, H, Dh) for t in qkv)
        q = apply_rope(self.norm_q(q), cos, sin)
        k = apply_rope(self.norm_k(k), cos, sin)
        attn = dot_product_attention(q, *with_cached(k, v, cached_kv), implementation=self.attention_impl,
                                     key_value_seq_lengths=kv_lengths)
        attn = attn.reshape(*gate.shape[:3], H * Dh // gate.shape[2])  # (B, S, H, Dh) -> (B, S, G, H/G*Dh)
        return self.to_out(jnp.concatenate([attn, swiglu(gate, value)], axis=-1)), (k, v)  # (B, S, G, C) -> (B, S, D)


class Flux2SingleTransformerBlock(nnx.Module):
    """Single-stream block over the joint [text, image] sequence (diffusers Flux2SingleTransformerBlock)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden_dim: int, *, eps: float,
                 attention_impl: str | None, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.attn = Flux2ParallelSelfAttention(dim, num_heads, head_dim, mlp_hidden_dim, eps=eps,
                                               attention_impl=attention_impl, dtype=dtype,
                                               param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mod: jax.Array, cos: jax.Array, sin: jax.Array,
                 kv_lengths: jax.Array | None = None,
                 cached_kv: KeyValues | None = None) -> tuple[jax.Array, KeyValues]:
        """x (B, S, D), shared modulation (B, 3D) -> (B, S, D) and the attention's keys and values."""
        ((shift, scale, gate),) = split_modulation(mod, 1)
        attn, kv = self.attn(modulate(x, shift, scale, self.eps), cos, sin, kv_lengths, cached_kv)
        return x + gate * attn, kv
