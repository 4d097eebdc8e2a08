"""fp8 weight quantization (klein_jax/quantization.py): numerics per output channel, which kernels, bytes, placement,
and the pipeline with quantization="fp8" (alone and under a LoRA adapter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import TEST_BUCKETS
from klein_jax import sharding
from klein_jax.configs import KLEIN_4B, TINY_TRANSFORMER
from klein_jax.loading import abstract_module, random_module
from klein_jax.models.fused import INPUT, GroupedLinear
from klein_jax.pipeline import KleinPipeline
from klein_jax.quantization import (FP8_MAX, QuantizedArray, contracting_axes, parameter_bytes, quantize,
                                    quantize_module)

WIDTH, HEIGHT = 48, 32
PROMPTS = ["a watercolor fox", "a red bicycle"]
SEEDS = [3, 4]
# The tiny float32 pipeline's images (range [0, 1]) against the unquantized ones; measured 57.6 and 59.7 dB without
# LoRA, 56.2 and 56.9 dB with.
MIN_PSNR_DB = 45.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def channel_scaled_kernel(rows: int = 64, cols: int = 12, seed: int = 0) -> np.ndarray:
    """(rows, cols) float32 whose output channels (columns) span 1e-4 .. 1e+1 in magnitude."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * np.logspace(-4, 1, cols)).astype(np.float32)


def error_bound(kernel: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """e4m3 rounding: half an ulp, 2^-4 relative for normal values, 2^-10 x scale in the subnormal range."""
    return np.maximum(2.0**-4 * np.abs(kernel), 2.0**-10 * scale) * (1 + 1e-6)


# ------------------------------------------------------------------------------------------------ numerics


def test_round_trip_error_is_bounded_per_output_channel():
    kernel = channel_scaled_kernel()
    q = quantize(jnp.asarray(kernel), (0,))
    assert q.values.dtype == jnp.float8_e4m3fn and q.scale.dtype == jnp.float32 and q.scale.shape == (1, 12)
    scale = np.asarray(q.scale)
    np.testing.assert_allclose(scale[0], np.abs(kernel).max(axis=0) / FP8_MAX, rtol=1e-6)
    restored = np.asarray(q[...])
    assert restored.dtype == np.float32
    err = np.abs(restored - kernel)
    assert (err <= error_bound(kernel, scale)).all(), f"worst excess {np.max(err / error_bound(kernel, scale)):.3g}"
    # Every channel keeps its own relative accuracy: the smallest (1e-4) as well as the largest (10).
    rel = (err ** 2).sum(axis=0) ** 0.5 / (kernel ** 2).sum(axis=0) ** 0.5
    assert rel.max() < 0.04, rel
    np.testing.assert_allclose(np.abs(restored).max(axis=0), np.abs(kernel).max(axis=0), rtol=1e-6)  # amax kept


def test_a_per_tensor_or_wrong_axis_scale_fails_the_bound():
    """The bound above is not loose: one scale for the tensor, or scales per input row, break it."""
    kernel = channel_scaled_kernel()
    per_channel = np.abs(kernel).max(axis=0, keepdims=True) / FP8_MAX
    for axes in ((0, 1), (1,)):
        err = np.abs(np.asarray(quantize(jnp.asarray(kernel), axes)[...]) - kernel)
        assert (err > error_bound(kernel, per_channel)).any(), axes


def test_zero_channels_and_the_largest_value_stay_finite():
    kernel = np.zeros((8, 3), np.float32)
    kernel[:, 1] = np.linspace(-3.0, 3.0, 8)
    kernel[0, 2] = np.float32(1e30)
    q = quantize(jnp.asarray(kernel), (0,))
    restored = np.asarray(q[...])
    assert np.isfinite(restored).all() and np.asarray(q.scale)[0, 0] == 1.0
    np.testing.assert_array_equal(restored[:, 0], 0.0)
    np.testing.assert_allclose(restored[[0, 0], [1, 2]], [-3.0, 1e30], rtol=1e-6)  # each channel's amax is kept


def test_dequantizes_to_the_kernel_dtype():
    kernel = jnp.asarray(channel_scaled_kernel(), jnp.bfloat16)
    q = quantize(kernel, (0,))
    assert q[...].dtype == jnp.bfloat16 and q.dtype == jnp.float8_e4m3fn and q.shape == (64, 12)


class DeclaredAxes(nnx.Module):
    contracting_axes = (0, 1)


@pytest.mark.parametrize("module, ndim, axes", [
    (nnx.Linear(4, 6, rngs=nnx.Rngs(0)), 2, (0,)),
    (nnx.Einsum("btd,dhk->bthk", (4, 2, 3), rngs=nnx.Rngs(0)), 3, (0,)),
    (nnx.Einsum("bthk,hkd->btd", (2, 3, 4), rngs=nnx.Rngs(0)), 3, (0, 1)),
    (nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=nnx.Rngs(0)), 3, (0, 1)),
    (DeclaredAxes(), 3, (0, 1)),
    (GroupedLinear(8, (4, 4), 2, ("a", "b"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), 3, (0,)),
    (GroupedLinear(8, (4, 4), 2, ("a", "b"), side=INPUT, dtype=jnp.float32, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(0)), 3, (0, 1)),
])
def test_contracting_axes_come_from_the_module(module, ndim, axes):
    assert contracting_axes(module, ndim) == axes


def test_an_einsum_kernel_is_quantized_per_output_channel():
    layer = nnx.Einsum("btd,dhk->bthk", (16, 2, 8), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    want = layer(x)
    q = quantize(layer.kernel[...], contracting_axes(layer, 3))
    layer.kernel.set_value(q)
    assert q.scale.shape == (1, 2, 8)
    got = layer(x)
    assert 0 < float(jnp.abs(got - want).max()) < 0.05 * float(jnp.abs(want).max())


# --------------------------------------------------------------------------------------- which kernels, bytes


def _kernels(module) -> dict[str, object]:
    _, state = nnx.split(module)
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state) if str(p[-1]).endswith("kernel")}


def test_quantize_module_takes_the_block_and_modulation_kernels_only():
    module = random_module("transformer", TINY_TRANSFORMER, np.random.default_rng(0), "bfloat16")
    before = {path: np.asarray(v) for path, v in _kernels(module).items()}
    assert quantize_module(module, "transformer", "fp8") is module
    after = _kernels(module)
    quantized = {path for path, v in after.items() if isinstance(v, QuantizedArray)}
    kept = set(after) - quantized
    assert quantized and all(p.startswith(("transformer_blocks/", "single_transformer_blocks/",
                                           "double_stream_modulation_", "single_stream_modulation/"))
                             for p in quantized)
    assert all(p.startswith(("x_embedder/", "context_embedder/", "time_guidance_embed/", "norm_out/", "proj_out/"))
               for p in kept), kept
    assert any(p.startswith("transformer_blocks/") for p in quantized)
    assert any(p.startswith("single_transformer_blocks/") for p in quantized)
    for path in kept:
        np.testing.assert_array_equal(np.asarray(after[path]), before[path])
    for path in quantized:
        q = after[path]
        assert q.values.dtype == jnp.float8_e4m3fn and q.compute_dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(q[...], np.float32), before[path].astype(np.float32),
                                   atol=float(np.abs(before[path].astype(np.float32)).max()) * 2**-4)


def test_quantized_kernels_take_half_the_bytes_abstractly():
    """klein-4B from abstract shapes (nothing allocated): every quantized kernel is 1 byte a weight + its scales."""
    module = abstract_module("transformer", KLEIN_4B, "bfloat16")
    before = {path: v for path, v in _kernels(module).items()}
    total_before = parameter_bytes(module)
    quantize_module(module, "transformer", "fp8")
    after = _kernels(module)
    saved = 0
    for path, q in after.items():
        if isinstance(q, QuantizedArray):
            size = int(np.prod(before[path].shape))
            assert isinstance(q.values, jax.ShapeDtypeStruct) and q.values.shape == before[path].shape
            assert int(np.prod(q.scale.shape)) * 4 < size // 16  # scales are small beside the kernel
            saved += size * 2 - (size + int(np.prod(q.scale.shape)) * 4)
    assert total_before - parameter_bytes(module) == saved
    assert parameter_bytes(module) < 0.55 * total_before


def test_bad_quantization_values_are_refused_before_loading(tmp_path):
    for bad in ("int8", "FP8", 8, True):
        with pytest.raises(ValueError, match="not one of None, 'fp8'"):
            KleinPipeline.from_pretrained(tmp_path / "missing", quantization=bad)


def test_placement_splits_the_scale_along_output_axes_only():
    mesh = sharding.make_mesh()  # abstract values keep the sharding they are given, even on one device
    q = jax.eval_shape(lambda k: quantize(k, (0,)), jax.ShapeDtypeStruct((64, 12), jnp.bfloat16))
    column = sharding.put(q, NamedSharding(mesh, P(None, sharding.MODEL)))
    row = sharding.put(q, NamedSharding(mesh, P(sharding.MODEL, None)))
    assert column.values.sharding.spec == P(None, sharding.MODEL) and column.scale.sharding.spec == P(None, sharding.MODEL)
    assert row.values.sharding.spec == P(sharding.MODEL, None) and row.scale.sharding.spec == P(None, None)
    assert column.values.dtype == jnp.float8_e4m3fn  # placement does not cast


# ------------------------------------------------------------------------------------------------ pipelines


@pytest.fixture(scope="module")
def fp8_pipeline(tiny_checkpoint):
    return KleinPipeline.from_pretrained(tiny_checkpoint.klein, "float32", quantization="fp8",
                                         reference_buckets=TEST_BUCKETS)


def _images(pipe) -> np.ndarray:
    return pipe(PROMPTS, width=WIDTH, height=HEIGHT, seed=SEEDS, output_type="np")


def test_fp8_pipeline_is_close_to_the_unquantized_one_but_not_equal(tiny_pipeline, fp8_pipeline):
    quantized, plain = fp8_pipeline.sampler._transformer_state, tiny_pipeline.sampler._transformer_state
    assert any(leaf.dtype == jnp.float8_e4m3fn for leaf in jax.tree.leaves(quantized))
    device_bytes = [sum(sharding.bytes_per_device(state).values()) for state in (quantized, plain)]
    kernels = [q for q in jax.tree.leaves(quantized, is_leaf=lambda x: isinstance(x, QuantizedArray))
               if isinstance(q, QuantizedArray)]
    weights, scales = sum(q.values.size for q in kernels), sum(q.scale.size for q in kernels)
    assert device_bytes[1] - device_bytes[0] == 4 * weights - (weights + 4 * scales)  # float32 -> 1 byte + scales
    want, got = _images(tiny_pipeline), _images(fp8_pipeline)
    assert np.abs(got - want).max() > 1e-3  # the quantization is real
    assert min(psnr(g, w) for g, w in zip(got, want)) > MIN_PSNR_DB


def test_lora_applies_on_top_of_fp8_kernels(tiny_pipeline, fp8_pipeline, tmp_path):
    from lora_support import write_peft_adapter

    folder = write_peft_adapter(tmp_path / "peft", seed=0, gain=0.5)
    plain = _images(fp8_pipeline)
    try:
        for pipe in (tiny_pipeline, fp8_pipeline):
            pipe.load_lora_weights(folder, "fox")
        want, got = _images(tiny_pipeline), _images(fp8_pipeline)
    finally:
        for pipe in (tiny_pipeline, fp8_pipeline):
            pipe.unload_lora_weights()
    assert psnr(got, plain) < MIN_PSNR_DB - 10  # the adapter moves the fp8 images far more than fp8 does
    assert min(psnr(g, w) for g, w in zip(got, want)) > MIN_PSNR_DB


MESH_CHECK = """
import json
import numpy as np
from flax import nnx
from klein_jax import sharding
from klein_jax.demo import build_demo_pipeline
from klein_jax.quantization import QuantizedArray

images, specs = {}, []
for mesh in (None, "model=2"):
    pipe = build_demo_pipeline(mesh=mesh, quantization="fp8")
    images[mesh] = pipe("a fox", width=64, height=64, seed=1, output_type="np")
for path, variable in nnx.to_flat_state(pipe.sampler._transformer_state):
    q = variable.get_value()
    if isinstance(q, QuantizedArray):
        pad = lambda spec: list(spec) + [None] * (q.ndim - len(spec))
        specs.append([pad(sharding.partition_spec("transformer", tuple(path))), list(q.scale.shape),
                      pad(q.values.sharding.spec), pad(q.scale.sharding.spec)])
print(json.dumps({"max_diff": float(np.abs(images[None] - images["model=2"]).max()), "specs": specs}))
"""


def test_fp8_pipeline_on_a_model_parallel_mesh():
    """Two fake CPU devices: fp8 values split as the table splits their kernel, scales along output axes only, and
    the images equal to one device's."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", MESH_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_diff"] < 1e-4
    split = 0
    for table, scale_shape, values, scale in result["specs"]:
        assert values == table
        assert scale == [None if n == 1 else axis for n, axis in zip(scale_shape, table)], (table, scale_shape)
        split += "model" in scale
    assert split and split < len(result["specs"])  # column kernels split their scales, row kernels do not
