"""KleinPipeline end to end: parity with diffusers' Flux2KleinPipeline, padding, seeds, compilation, bad input.

Parity: a tiny random diffusers pipeline saved with save_pretrained (tests/tiny_pipeline.py), converted with
klein-convert, both run in float32 on CPU from the same initial noise (`latents=`, diffusers layout).
"""

import contextlib
import dataclasses

import jax
import numpy as np
import PIL.Image
import pytest
import torch
from flax import nnx
from tiny_pipeline import load_reference_pipeline, make_tiny_diffusers_pipeline

from convert.cli import main as convert_main
from klein_jax import latents as latent_ops
from klein_jax.buckets import ReferenceBuckets
from klein_jax.configs import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE
from klein_jax.demo import build_demo_pipeline
from klein_jax.loading import random_module
from klein_jax.pipeline import KleinPipeline, PreparedRequest
from klein_jax.reference_encoder import encode_reference_tokens
from klein_jax.sampler import GeneratePlan

OUT_LAYERS = TINY_TEXT_ENCODER.out_layers  # the tiny text encoder's hidden states (diffusers: text_encoder_out_layers)
# The tiny VAE has 4-pixel tokens; one grid area and one token bucket hold every test reference: every reference
# case shares its programs, and every reference is padded (the parity below covers the masking).
TEST_BUCKETS = ReferenceBuckets(grid_areas=(1024,), token_buckets=(1024,))
MAX_ABS = 1e-4  # shared/spec/interfaces.md: float32 CPU parity with diffusers


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def noise(width: int, height: int, batch: int = 1, seed: int = 0, pixels_per_token: int = 4) -> np.ndarray:
    """Initial noise in diffusers' layout (B, 128, H/ps, W/ps)."""
    shape = (batch, 128, height // pixels_per_token, width // pixels_per_token)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def converted(tmp_path_factory, distilled: bool):
    root = tmp_path_factory.mktemp("distilled" if distilled else "base")
    source = make_tiny_diffusers_pipeline(root / "diffusers", distilled=distilled)
    assert convert_main([str(source), str(root / "klein"), "--dtype", "float32", "--no-progress"]) == 0
    ours = KleinPipeline.from_pretrained(root / "klein", "float32", reference_buckets=TEST_BUCKETS)
    return load_reference_pipeline(source), ours, root / "klein"


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return converted(tmp_path_factory, distilled=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return converted(tmp_path_factory, distilled=False)


def diffusers_images(reference, *, prompt, width, height, latents, steps, images=None, **kwargs) -> np.ndarray:
    result = reference(image=images, prompt=prompt, width=width, height=height, num_inference_steps=steps,
                       latents=torch.from_numpy(latents), output_type="np", text_encoder_out_layers=OUT_LAYERS,
                       **kwargs)
    return result.images


def assert_max_abs(got: np.ndarray, want: np.ndarray, limit: float = MAX_ABS):
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - want)
    assert err.max() <= limit, f"max abs error {err.max():.3e} at {np.unravel_index(err.argmax(), err.shape)}"


# ------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("width, height", [(48, 32), (32, 56)])
def test_text_to_image_matches_diffusers(distilled, width, height):
    reference, pipe, _ = distilled
    latents = noise(width, height)
    want = diffusers_images(reference, prompt="a red fox in the snow", width=width, height=height, latents=latents,
                            steps=4)
    got = pipe("a red fox in the snow", width=width, height=height, latents=latents, output_type="np")
    assert got.shape == (1, height, width, 3)
    assert_max_abs(got, want)


def test_edit_with_odd_size_reference_matches_diffusers(distilled):
    reference, pipe, _ = distilled
    image = random_image(75, 67, seed=1)  # floored and centre-cropped to 72x64 (4-pixel tokens)
    latents = noise(40, 48, seed=1)
    want = diffusers_images(reference, prompt="make it blue", width=40, height=48, latents=latents, steps=4,
                            images=[image])
    got = pipe("make it blue", images=[image], width=40, height=48, latents=latents, output_type="np")
    assert_max_abs(got, want)


def test_three_references_of_different_sizes_match_diffusers(distilled):
    reference, pipe, _ = distilled
    images = [random_image(64, 64, seed=2), random_image(90, 70, "RGBA", seed=3), random_image(70, 101, "L", seed=4)]
    latents = noise(48, 32, seed=2)
    want = diffusers_images(reference, prompt="the three together", width=48, height=32, latents=latents, steps=4,
                            images=images)
    got = pipe("the three together", images=images, width=48, height=32, latents=latents, output_type="np")
    assert_max_abs(got, want)


def test_base_model_with_guidance_matches_diffusers(base):
    reference, pipe, _ = base
    assert not pipe.is_distilled and pipe.default_steps == 50 and pipe.model_info["guidance_scale"] == 4.0
    latents = noise(48, 32, seed=5)
    want = diffusers_images(reference, prompt="a lighthouse", width=48, height=32, latents=latents, steps=3,
                            guidance_scale=4.0)
    got = pipe("a lighthouse", width=48, height=32, latents=latents, num_inference_steps=3, output_type="np")
    assert_max_abs(got, want)


def test_padded_references_equal_unpadded():
    """Reference tokens padded at the end of the sequence and masked as keys change no valid output."""
    rng = np.random.default_rng(0)
    graph, state = nnx.split(random_module("transformer", TINY_TRANSFORMER, rng))
    run = jax.jit(lambda state, *args, **kwargs: nnx.merge(graph, state)(*args, **kwargs))
    T, L, R, P = 9, 12, 10, 7  # text, target (3x4), reference (2x5), padding
    x = rng.standard_normal((2, L + R, 128)).astype(np.float32)
    text = rng.standard_normal((2, T, TINY_TRANSFORMER.joint_attention_dim)).astype(np.float32)
    ids = np.concatenate([latent_ops.latent_ids(3, 4), latent_ops.image_ids([(2, 5)])])
    sigma = np.float32([0.5, 0.9])
    want = np.asarray(run(state, x, text, sigma, ids, latent_ops.text_ids(T)))
    padded_x = np.concatenate([x, 100 * rng.standard_normal((2, P, 128)).astype(np.float32)], axis=1)
    padded_ids = np.concatenate([ids, rng.integers(0, 50, (P, 4)).astype(np.int32)])
    got = np.asarray(run(state, padded_x, text, sigma, padded_ids, latent_ops.text_ids(T),
                         kv_lengths=np.full((2,), T + L + R, np.int32)))[:, : L + R]
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    unmasked = np.asarray(run(state, padded_x, text, sigma, padded_ids, latent_ops.text_ids(T)))[:, : L + R]
    assert np.abs(unmasked - want).max() > 1e-2 * np.abs(want).max()  # the mask is what makes them equal


def test_masked_reference_encoding_equals_unpadded():
    """A 4-level VAE with mid-block attention (GroupNorm, downsamplers, attention all masked), padded to buckets."""
    config = dataclasses.replace(TINY_VAE, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    rng = np.random.default_rng(0)
    vae = random_module("vae", config, rng)
    encode = jax.jit(lambda pixels, valid: encode_reference_tokens(vae, pixels, valid, slot_tokens=100))
    unpadded = jax.jit(vae.encode_packed)
    (h, w), (H, W) = (80, 112), (128, 192)
    image = rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
    want = np.asarray(unpadded(image)).reshape(2, -1, 128)  # (B, h/16 * w/16, 128), row-major
    padded = np.zeros((2, H, W, 3), np.float32)
    padded[:, :h, :w] = image
    got = np.asarray(encode(padded, np.array([h, w], np.int32)))
    n = want.shape[1]
    assert np.abs(got[:, :n] - want).max() < 1e-5 * np.abs(want).max()
    assert not got[:, n:].any()  # slot rows past the valid tokens are zero


def test_reference_buckets_hold_every_reference():
    buckets = ReferenceBuckets.default(16)
    assert buckets == ReferenceBuckets(grid_areas=(256, 1024, 4096), token_buckets=(4096, 8192, 16384))
    assert len(buckets.grids) == 21 and buckets.slot_tokens == 46 * 128
    for width in range(64, 2900, 16):
        for height in range(64, 2900, 16):
            if width * height <= 1024 * 1024 and max(width / height, height / width) <= 8:
                rows, cols = buckets.grid_for(height // 16, width // 16)
                assert rows * 16 >= height and cols * 16 >= width
                assert rows * cols <= max(5.3 * (height // 16) * (width // 16), 12 * 32)  # docs/pipeline.md
    assert buckets.grid_for(64, 70) == (64, 91)  # 4480 tokens: more than the cap allows, still held
    assert buckets.grid_for(10, 400) is None
    assert [buckets.tokens_for(n) for n in (0, 1, 4096, 4097, 16384, 20000)] == [0, 4096, 4096, 8192, 16384, 20000]
    assert buckets.token_buckets_for(0) == (0,)
    assert buckets.token_buckets_for(1) == (0, 4096)
    assert buckets.token_buckets_for(4) == (0, 4096, 8192, 16384)


# ----------------------------------------------------------------------------------------- seeds, batches


def test_batch_gives_each_prompt_its_own_seed_and_the_same_references(distilled):
    _, pipe, _ = distilled
    image = random_image(64, 80, seed=6)
    batch = pipe(["a cat", "a dog"], images=[image], width=48, height=32, seed=[11, 12], output_type="np")
    alone = pipe("a dog", images=[image], width=48, height=32, seed=12, output_type="np")
    again = pipe("a dog", images=[image], width=48, height=32, seed=12, output_type="np")
    other = pipe("a dog", images=[image], width=48, height=32, seed=13, output_type="np")
    assert batch.shape == (2, 32, 48, 3)
    np.testing.assert_array_equal(alone, again)  # same seed, same backend: the same image
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)  # batching does not change an image's noise
    assert np.abs(batch[0] - batch[1]).max() > 1e-2
    assert np.abs(other - alone).max() > 1e-2
    pil = pipe("a dog", images=[image], width=48, height=32, seed=12)
    assert isinstance(pil, list) and pil[0].size == (48, 32) and pil[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[0]), (alone[0] * 255).round().astype(np.uint8))


def test_stepwise_path_reports_every_step_and_equals_fused(distilled):
    _, pipe, _ = distilled
    steps, latents = [], noise(48, 32, seed=8)
    stepwise = pipe("a cat", width=48, height=32, latents=latents, output_type="np",
                    on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert {"text_encode_ms", "denoise_ms", "decode_ms"} <= set(pipe.last_timings)
    fused = pipe("a cat", width=48, height=32, latents=latents, output_type="np")
    np.testing.assert_allclose(stepwise, fused, atol=1e-5)


# ------------------------------------------------------------------------------------------- compilation


@contextlib.contextmanager
def backend_compiles():
    """Collects the names of the programs XLA compiles (jax.monitoring) inside the block."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def demo():
    # 16-pixel tokens as in the real model, so that the API aspect ratios apply; small buckets keep it quick.
    return build_demo_pipeline(reference_buckets=ReferenceBuckets(grid_areas=(24,), token_buckets=(64,)))


def test_no_compilation_after_warm_up(demo):
    with backend_compiles() as names:
        count = demo.compile(aspect_ratios=(), sizes=[(64, 64)], max_references=2, batch_sizes=(2,))
    # text encoder; the 3 grid buckets a reference can use (5x5, 5x8, 8x5 tokens); generate for 0 and 64
    # reference tokens; all at batch size 2 (single requests run padded)
    assert count == demo.compile_count == 1 + 3 + 2
    assert len(names) >= count
    small, wide, tall = random_image(64, 64, seed=7), random_image(96, 64, seed=8), random_image(64, 80, seed=9)
    requests = [
        [demo.prepare("a cat", width=64, height=64, seed=1)],
        [demo.prepare("a cat", (), 64, 64, 2), demo.prepare("a dog", (), 64, 64, 3)],
        [demo.prepare("edit it", [wide], 64, 64, seed=4)],
        [demo.prepare("both", [small, tall], 64, 64)],  # random seed
        [demo.prepare("one", [small], 64, 64, 6), demo.prepare("two", [random_image(64, 64, seed=10)], 64, 64)],
    ]
    with backend_compiles() as names:
        results = [demo.run_batch(batch) for batch in requests]
    assert names == [], f"compiled after warm-up: {names}"
    assert demo.compile_count == count
    for batch, images in zip(requests, results):
        assert len(images) == len(batch)
        assert all(image.size == (64, 64) and image.mode == "RGB" for image in images)
    again = demo.run_batch([demo.prepare("a cat", width=64, height=64, seed=1)])[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(results[0][0]))


def test_compile_aspect_ratios_counts_programs(demo):
    before = demo.compile_count
    # text encoder B=1; generate at 1568x672 without references (no reference programs)
    assert demo.compile(aspect_ratios="wide", max_references=0) == 2
    assert demo.compile(aspect_ratios=["wide"], max_references=0) == 0
    assert demo.compile_count == before + 2
    assert demo.sampler.has(GeneratePlan(1, (672 // 16, 1568 // 16), 0, 4, False, external_noise=False))


def test_prepared_requests(demo):
    request = demo.prepare("a cat", [random_image(64, 80)], width=1344, height=768, seed=42)
    assert isinstance(request, PreparedRequest) and request.seed == 42 and request.workflow == "edit"
    assert hash(request.batch_key) == hash(demo.prepare("a dog", [random_image(64, 80, seed=1)], 1344, 768).batch_key)
    assert request.batch_key != demo.prepare("a cat", [random_image(80, 64)], 1344, 768).batch_key
    assert request.batch_key != demo.prepare("a cat", width=1344, height=768).batch_key
    assert 0 <= demo.prepare("a cat").seed < 2**32
    assert demo.is_demo and demo.model_info == {"name": "flux2-klein-demo", "dtype": "float32", "is_distilled": True,
                                                "steps": 4, "guidance_scale": None, "is_demo": True}
    with pytest.raises(ValueError, match="share a batch_key"):
        demo.run_batch([request, demo.prepare("a cat", width=1344, height=768)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=1000), "width=1000 must be a positive multiple of 16"),
    (dict(height=0), "height=0 must be a positive multiple of 16"),
    (dict(images=[random_image(64, 64)] * 5), "5 reference images given; at most 4"),
    (dict(images=[PIL.Image.new("La", (64, 64))]), "cannot be converted to RGB"),
    (dict(images=[random_image(32, 64)]), "too small"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="  \n"), "prompt is empty"),
    (dict(seed=-1), "seed=-1"),
    (dict(num_inference_steps=0), "num_inference_steps=0"),
])
def test_bad_input_is_a_clear_error_and_compiles_nothing(demo, kwargs, message):
    kwargs = {"prompt": "a cat", **kwargs}
    before = demo.compile_count
    with pytest.raises(ValueError, match=message):
        demo.prepare(**kwargs)
    with pytest.raises(ValueError, match=message):
        demo(**kwargs)
    assert demo.compile_count == before


def test_call_argument_errors(demo):
    before = demo.compile_count
    with pytest.raises(ValueError, match="latents shape"):
        demo("a cat", width=64, height=64, latents=np.zeros((1, 128, 2, 2), np.float32))
    with pytest.raises(ValueError, match="2 seeds given for 1 prompts"):
        demo("a cat", seed=[1, 2])
    with pytest.raises(ValueError, match="output_type"):
        demo("a cat", output_type="pt")
    with pytest.raises(ValueError, match="non-empty list"):
        demo([])
    with pytest.raises(ValueError, match="aspect_ratio 'huge'"):
        demo.compile(aspect_ratios=["huge"])
    with pytest.raises(ValueError, match="max_references=5"):
        demo.compile(max_references=5)
    assert demo.compile_count == before


def test_persistent_compilation_cache_serves_a_restart(distilled, tmp_path):
    """A second pipeline (as after a restart) with the same cache folder loads its programs instead of compiling."""
    from jax.experimental.compilation_cache import compilation_cache

    loaded = distilled[1]
    modules = (loaded.transformer, loaded.vae, loaded.text_encoder, loaded.tokenizer)
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.monitoring.register_event_listener(listener)
    try:
        pipes = [KleinPipeline(*modules, is_distilled=True, compilation_cache_dir=tmp_path / "xla") for _ in range(2)]
        images = []
        for i, pipe in enumerate(pipes):
            hits.clear()
            images.append(pipe("a cat", width=16, height=16, seed=1, output_type="np"))
            assert pipe.compile_count == 2  # text encoder + generate, compiled or loaded
            assert len(hits) == (0 if i == 0 else 2)
        np.testing.assert_array_equal(images[0], images[1])
        assert any((tmp_path / "xla").iterdir())
    finally:
        jax.monitoring.unregister_event_listener(listener)
        jax.config.update("jax_compilation_cache_dir", previous[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
        compilation_cache.reset_cache()

