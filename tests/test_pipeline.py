"""KleinPipeline's API: seeds and batches, the step-wise path, compilation counts, prepared requests, bad input.

Parity with diffusers is in tests/test_pipeline_parity.py, the reference buckets in tests/test_buckets.py.
"""

import contextlib

import jax
import numpy as np
import PIL.Image
import pytest

from conftest import noise, random_image
from klein_jax.buckets import ReferenceBuckets
from klein_jax.demo import build_demo_pipeline
from klein_jax.pipeline import KleinPipeline, PreparedRequest
from klein_jax.sampler import GeneratePlan


# ----------------------------------------------------------------------------------------- seeds, batches


def test_batch_gives_each_prompt_its_own_seed_and_the_same_references(tiny_pipeline):
    pipe = tiny_pipeline
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


def test_stepwise_path_reports_every_step_and_equals_fused(tiny_pipeline):
    pipe = tiny_pipeline
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
    demo.sampler.program(GeneratePlan(1, (672 // 16, 1568 // 16), 0, 4, False, external_noise=False))  # compiled
    assert demo.compile_count == before + 2


def test_prepared_requests(demo):
    request = demo.prepare("a cat", [random_image(64, 80)], width=1344, height=768, seed=42)
    assert isinstance(request, PreparedRequest) and request.seed == 42 and request.workflow == "image-to-image"
    assert hash(request.batch_key) == hash(demo.prepare("a dog", [random_image(64, 80, seed=1)], 1344, 768).batch_key)
    assert request.batch_key != demo.prepare("a cat", [random_image(80, 64)], 1344, 768).batch_key
    assert request.batch_key != demo.prepare("a cat", width=1344, height=768).batch_key
    assert 0 <= demo.prepare("a cat").seed < 2**32
    assert demo.is_demo and demo.model_info == {"name": "flux2-klein-demo", "dtype": "float32", "variant": "distilled",
                                                "is_distilled": True, "steps": 4, "guidance_scale": None,
                                                "is_demo": True, "mesh": {"data": 1, "model": 1}}
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


def test_persistent_compilation_cache_serves_a_restart(tiny_pipeline, tmp_path):
    """A second pipeline (as after a restart) with the same cache folder loads its programs instead of compiling."""
    from jax.experimental.compilation_cache import compilation_cache

    from klein_jax.compilation_cache import enable_compilation_cache

    loaded = tiny_pipeline
    modules = (loaded.transformer, loaded.vae, loaded.text_encoder, loaded.tokenizer)
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.monitoring.register_event_listener(listener)
    try:
        enable_compilation_cache(tmp_path / "xla")
        pipes = [KleinPipeline(*modules, is_distilled=True) for _ in range(2)]
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

