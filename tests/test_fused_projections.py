"""Fused, shard-aligned projections (klein_jax/models/fused.py): the same arithmetic as diffusers' separate layers,
the storage layout unchanged, and a model-axis program with no all-to-all or collective-permute."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klein_jax.configs import TINY_TRANSFORMER
from klein_jax.loading import abstract_module, expected_params, fill_module, module_params, random_module
from klein_jax.models.fused import INPUT, GroupedLinear, grouped_order
from klein_jax.models.layers import dot_product_attention
from klein_jax.models.rope import apply_rope
from klein_jax.models.transformer_blocks import Flux2ParallelSelfAttention

ROOT = pathlib.Path(__file__).resolve().parents[1]
HIGHEST = jax.lax.Precision.HIGHEST


def _grouped(features, segments, groups, parts, kernels, side="output"):
    layer = nnx.eval_shape(lambda: GroupedLinear(features, segments, groups, parts, side=side, dtype=jnp.float32,
                                                 param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    layer.grouped_kernel.set_value(jnp.asarray(layer.fuse(kernels)))
    return layer


def test_grouped_order_puts_each_group_of_every_segment_side_by_side():
    assert grouped_order((4, 4, 2), 2).tolist() == [[0, 1, 4, 5, 8], [2, 3, 6, 7, 9]]


def test_a_grouped_layer_computes_its_parts():
    rng = np.random.default_rng(0)
    kernels = [rng.standard_normal((8, 12)).astype(np.float32) for _ in range(3)]
    layer = _grouped(8, (12, 12, 12), 4, ("to_q", "to_k", "to_v"), kernels)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        y = layer(jnp.asarray(x))  # (2, 5, 4, 9)
        for got, kernel in zip(layer.split(y), kernels):
            np.testing.assert_allclose(np.asarray(got).reshape(2, 5, 12), x @ kernel, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(layer.to_flat(y)), x @ np.concatenate(kernels, 1), rtol=1e-6, atol=1e-6)
    assert [k.tolist() for k in layer.unfuse(np.asarray(layer.grouped_kernel[...]))] == [k.tolist() for k in kernels]


def test_an_input_grouped_layer_computes_its_part():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((6 + 10, 8)).astype(np.float32)  # rows: attn (6) | mlp (10)
    layer = _grouped(8, (6, 10), 2, ("to_out",), [kernel], side=INPUT)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = layer(layer.to_grouped(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(got), x @ kernel, rtol=1e-6, atol=1e-6)
    assert np.array_equal(layer.unfuse(np.asarray(layer.grouped_kernel[...]))[0], kernel)


def test_the_storage_layout_is_the_separate_layers():
    """Key maps, checkpoints and exports see diffusers' layers (in the order they had as separate layers); filling
    and reading back is exact."""
    abstract = abstract_module("transformer", TINY_TRANSFORMER, "float32")
    names = [".".join(map(str, p)) for p in expected_params(abstract)]
    assert "transformer_blocks.0.attn.to_q.kernel" in names and "transformer_blocks.0.attn.add_v_proj.kernel" in names
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj.kernel" in names
    assert not any("grouped_kernel" in n for n in names)
    assert names.index("transformer_blocks.0.attn.to_k.kernel") < names.index("transformer_blocks.0.attn.to_out.kernel") \
        < names.index("transformer_blocks.0.attn.to_q.kernel")  # nnx's sorted order, as before the fusion
    params = module_params(random_module("transformer", TINY_TRANSFORMER, np.random.default_rng(0)))
    again = module_params(fill_module(abstract_module("transformer", TINY_TRANSFORMER, "float32"), dict(params)))
    assert list(again) == list(params) and all(np.array_equal(again[k], params[k]) for k in params)


def _unfused_single_attention(layer, x, cos, sin, w_in, w_out):
    """diffusers' Flux2ParallelSelfAttention on the separate (storage) kernels."""
    B, S, _ = x.shape
    H, Dh, M = layer.num_heads, layer.head_dim, layer.mlp_hidden_dim
    h = x @ w_in
    qkv, mlp = jnp.split(h, [3 * H * Dh], axis=-1)
    q, k, v = (t.reshape(B, S, H, Dh) for t in jnp.split(qkv, 3, axis=-1))
    attn = dot_product_attention(apply_rope(layer.norm_q(q), cos, sin), apply_rope(layer.norm_k(k), cos, sin), v)
    gate, value = jnp.split(mlp, [M], axis=-1)
    return jnp.concatenate([attn.reshape(B, S, H * Dh), jax.nn.silu(gate) * value], axis=-1) @ w_out


def test_the_single_block_attention_equals_the_unfused_computation():
    rng = np.random.default_rng(2)
    H, Dh, D, M = 4, 8, 32, 96  # 4 groups
    layer = nnx.eval_shape(lambda: Flux2ParallelSelfAttention(D, H, Dh, M, eps=1e-6, attention_impl=None,
                                                              dtype=jnp.float32, param_dtype=jnp.float32,
                                                              rngs=nnx.Rngs(0)))
    assert layer.to_qkv_mlp_proj.num_groups == 4
    w_in = rng.standard_normal((D, 3 * H * Dh + 2 * M)).astype(np.float32) / np.sqrt(D)
    w_out = rng.standard_normal((H * Dh + M, D)).astype(np.float32) / np.sqrt(H * Dh + M)
    layer.to_qkv_mlp_proj.grouped_kernel.set_value(jnp.asarray(layer.to_qkv_mlp_proj.fuse([w_in])))
    layer.to_out.grouped_kernel.set_value(jnp.asarray(layer.to_out.fuse([w_out])))
    for norm in (layer.norm_q, layer.norm_k):
        norm.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, Dh), jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, 6, D)), jnp.float32)
    angles = rng.uniform(0, 3, (6, Dh // 2))
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    with jax.default_matmul_precision("highest"):
        got, _ = layer(x, cos, sin)
        want = _unfused_single_attention(layer, x, cos, sin, w_in, w_out)
    assert float(jnp.abs(want).max()) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# Tiny, 8 heads (as tests/sharding_worker.py), so that model=2 splits whole groups.
SHARDABLE = dataclasses.replace(TINY_TRANSFORMER, num_attention_heads=8, attention_head_dim=8, axes_dims_rope=(2, 2, 2, 2),
                                num_single_layers=1)

_CHILD = """
import dataclasses, json, sys
sys.path.insert(0, {benchmarks!r})
import jax.numpy as jnp
import fused_projections as fp
from klein_jax.configs import TINY_TRANSFORMER
from klein_jax.sharding import make_mesh
config = dataclasses.replace(TINY_TRANSFORMER, **json.loads({config!r}))
mesh = make_mesh("model=2")
print(json.dumps({{name: fp.count_collectives(fp._program(config, jnp.bfloat16, 64, 16, mesh, misaligned=bad)
                                                  .compile().as_text())
                  for name, bad in (("aligned", False), ("misaligned", True))}}))
"""


@pytest.fixture(scope="module")
def collectives() -> dict:
    config = {k: getattr(SHARDABLE, k) for k in ("num_attention_heads", "attention_head_dim", "axes_dims_rope",
                                                  "num_single_layers")}
    code = _CHILD.format(benchmarks=str(ROOT / "benchmarks"), config=json.dumps(config))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_model_axis_program_needs_no_all_to_all_or_permute(collectives):
    """model=2: one all-reduce per row-parallel projection at most (XLA may combine them), nothing else."""
    aligned = collectives["aligned"]
    assert aligned["all-to-all"] == 0 and aligned["collective-permute"] == 0 and aligned["all-gather"] == 0
    assert 1 <= aligned["all-reduce"] <= 4 * SHARDABLE.num_layers + SHARDABLE.num_single_layers + 4


def test_a_misaligned_split_would_show(collectives):
    """The same program with the grouped kernels split inside each group (a deliberate bug) moves activations."""
    bad = collectives["misaligned"]
    assert bad["all-to-all"] + bad["collective-permute"] + bad["all-gather"] > 0


_FUSE_CHILD = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from klein_jax.models import fused
from klein_jax.sharding import make_mesh
mesh = make_mesh("model=4")
rng = np.random.default_rng(0)
out = {}
# a single block's q|k|v|gate|value (OUTPUT, one part) and attn|mlp output rows (INPUT), 8 groups; q, k, v parts
for name, segments, parts, side in (("qkv_mlp", (32, 32, 32, 96, 96), ("p",), "output"),
                                    ("out", (32, 96), ("p",), "input"), ("qkv", (32, 32, 32), ("q", "k", "v"), "output")):
    layer = nnx.eval_shape(lambda: fused.GroupedLinear(16, segments, 8, parts, side=side, dtype=jnp.float32,
                                                       param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    shapes = list(layer.storage_shapes().values())
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    stored = P("model", None) if side == "output" else P(None, "model")  # klein_jax/sharding.py's storage rows
    placed = [jax.device_put(k, NamedSharding(mesh, stored)) for k in host]
    got = layer.fuse(placed)
    axis = layer._ungrouped_split(placed[0].sharding)
    text = fused._sharded_fuser(layer.features, layer.segments, layer.num_groups, side, mesh, axis).lower(
        placed).compile().as_text()
    out[name] = {"equal": bool(np.array_equal(np.asarray(got), layer.fuse(host))), "spec": str(got.sharding.spec),
                 "shard": list(got.addressable_shards[0].data.shape), "whole": list(got.shape),
                 "all-gather": len(re.findall(r"all-gather(-start)?\\(", text))}
print(json.dumps(out))
"""


def test_sharded_parts_are_fused_per_device_without_gathering_a_kernel():
    """Parts placed as the table stores them (split along D) on model=4: the fused kernel equals the host fusion,
    lies on its group split, and the fusion program has no all-gather (no device ever holds a whole kernel)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _FUSE_CHILD], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, r in result.items():
        group_axis = 0 if name == "out" else 1
        assert r["equal"], name
        assert r["shard"][group_axis] == r["whole"][group_axis] // 4 == 2, (name, r)
        assert r["all-gather"] == 0, (name, r)
