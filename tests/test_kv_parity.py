"""klein-9B KV: KleinPipeline on a Flux2KleinKVPipeline checkpoint against diffusers' Flux2KleinKVPipeline.

The session's tiny KV checkpoint (conftest.py: klein-9B proportions, saved by diffusers, converted by klein-convert)
runs in float32 on CPU from diffusers' noise (`latents=`): max abs error <= 1e-4 for edit (1 reference) and
multi-reference (3 references of different sizes) at batch sizes 1 and 2. The references must matter: other
references move diffusers' output by >= 100x that tolerance, and ours is 10x closer to diffusers than diffusers is to
itself with the references flipped (or reordered). test_broken_kv_path_fails shows both checks catch a KV model run
as a plain one and references modulated at the step's timestep instead of 0.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_pipeline_parity import flipped, max_abs, reference_images
from tiny_pipeline import load_any_reference_pipeline

from conftest import TEST_BUCKETS, noise, random_image
from klein_jax import latents as latent_ops
from klein_jax import sampler as sampler_module
from klein_jax.configs import TINY_9B_TEXT_ENCODER
from klein_jax.models.kv_cache import reference_kv
from klein_jax.pipeline import KleinPipeline

OUT_LAYERS = TINY_9B_TEXT_ENCODER.out_layers
MAX_ABS = 1e-4  # shared/spec/interfaces.md: float32 CPU parity with diffusers
SENSITIVITY = 100  # other references must move diffusers' output by at least SENSITIVITY x MAX_ABS
CLOSER = 0.1  # ours must be within CLOSER x what a flip or reordering of the references does to diffusers
WIDTH, HEIGHT = 48, 32
PROMPTS = ("make it blue", "the three together")
CASES = [(1, 1), (1, 2), (3, 1), (3, 2)]  # (references, batch size)


@pytest.fixture(scope="module")
def kv_reference(tiny_kv_checkpoint):
    """diffusers' Flux2KleinKVPipeline of the session's KV checkpoint, float32."""
    reference = load_any_reference_pipeline(tiny_kv_checkpoint.diffusers)
    assert type(reference).__name__ == "Flux2KleinKVPipeline"
    reference.set_progress_bar_config(disable=True)
    return reference


def diffusers_images(reference, batch: int, images, latents: np.ndarray) -> np.ndarray:
    """diffusers' KV pipeline at its defaults (4 steps, no guidance)."""
    return reference(image=images, prompt=list(PROMPTS[:batch]), width=WIDTH, height=HEIGHT,
                     latents=torch.from_numpy(latents), output_type="np", text_encoder_out_layers=OUT_LAYERS).images


def our_images(pipe: KleinPipeline, references: int, batch: int) -> np.ndarray:
    return pipe(list(PROMPTS[:batch]), images=reference_images(references), width=WIDTH, height=HEIGHT,
                latents=noise(WIDTH, HEIGHT, batch, seed=references), output_type="np")


@pytest.fixture(scope="module")
def expected(kv_reference):
    """(references, batch) -> diffusers' images and those of mutated references (name -> images), cached."""
    cache = {}

    def get(references: int, batch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if (references, batch) not in cache:
            latents = noise(WIDTH, HEIGHT, batch, seed=references)
            images = reference_images(references)
            mutations = {"flipped": flipped(images)}
            if references > 1:
                mutations["reversed"] = images[::-1]
            run = functools.partial(diffusers_images, kv_reference, batch, latents=latents)
            cache[references, batch] = run(images), {name: run(refs) for name, refs in mutations.items()}
        return cache[references, batch]

    return get


def assert_max_abs(got: np.ndarray, want: np.ndarray):
    assert got.shape == want.shape and got.dtype == np.float32
    assert max_abs(got, want) <= MAX_ABS, f"max abs error {max_abs(got, want):.3e}"


def assert_closer_than_mutations(got: np.ndarray, want: np.ndarray, mutated: dict[str, np.ndarray]):
    err = max_abs(got, want)
    for name, images in mutated.items():
        moved = max_abs(images, want)
        assert err <= CLOSER * moved, f"ours is {err:.3e} from diffusers, > {CLOSER} x {moved:.3e} ({name} references)"


# ------------------------------------------------------------------------------------------------ transformer


def test_reference_keys_values_and_cached_steps_match_diffusers(tiny_kv_pipeline, kv_reference):
    """models/kv_cache.py reference_kv == diffusers' Flux2KVCache after kv_cache_mode="extract", layer by layer
    (padding rows masked), and the first and a later step equal diffusers' "extract" and "cached" outputs."""
    rng = np.random.default_rng(0)
    B, T = 2, 11
    target_ids, ref_ids = latent_ops.latent_ids(3, 4), latent_ops.image_ids([(2, 3), (3, 2)])
    R, L = len(ref_ids), len(target_ids)
    x = rng.standard_normal((B, L, 128)).astype(np.float32)
    refs = rng.standard_normal((B, R, 128)).astype(np.float32)
    text = rng.standard_normal((B, T, kv_reference.transformer.config.joint_attention_dim)).astype(np.float32)
    text_ids, sigma = latent_ops.text_ids(T), np.array([0.8, 0.3], np.float32)
    t = torch.from_numpy
    with torch.no_grad():
        first, cache = kv_reference.transformer(
            hidden_states=torch.cat([t(refs), t(x)], 1), encoder_hidden_states=t(text), timestep=t(sigma),
            img_ids=torch.cat([t(ref_ids), t(target_ids)]), txt_ids=t(text_ids), return_dict=False,
            kv_cache_mode="extract", num_ref_tokens=R)
        later = kv_reference.transformer(hidden_states=t(x), encoder_hidden_states=t(text), timestep=t(sigma / 2),
                                         img_ids=t(target_ids), txt_ids=t(text_ids), return_dict=False,
                                         kv_cache=cache, kv_cache_mode="cached")[0]
    ours = tiny_kv_pipeline.transformer
    padded = np.concatenate([refs, refs[:, ::-1][:, :3]], axis=1)  # 3 padding rows, as a token bucket adds them
    padded_ids = np.concatenate([ref_ids, ref_ids[:3]])
    kv = reference_kv(ours, jnp.asarray(padded), jnp.asarray(padded_ids), jnp.int32(R))
    layers = [(kv.double[i], cache.get_double(i)) for i in range(len(kv.double))]
    layers += [(kv.single[i], cache.get_single(i)) for i in range(len(kv.single))]
    assert len(layers) == 5 and len(cache.double_block_caches) + len(cache.single_block_caches) == 5
    for (k, v), theirs in layers:
        np.testing.assert_allclose(np.asarray(k)[:, :R], theirs.k_ref.numpy(), atol=2e-5)
        np.testing.assert_allclose(np.asarray(v)[:, :R], theirs.v_ref.numpy(), atol=2e-5)
    kv_lengths = jnp.full((B,), T + L + R, jnp.int32)  # the 3 padding rows come last: no keys
    for s, want in ((sigma, first), (sigma / 2, later)):
        got = ours(*map(jnp.asarray, (x, text, s, target_ids, text_ids)), kv_lengths=kv_lengths, cached_kv=kv)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)
    plain = ours(*map(jnp.asarray, (x, text, sigma, target_ids, text_ids)))
    assert max_abs(np.asarray(plain), first.numpy()) > 1e-2, "the references must move the velocity"


# --------------------------------------------------------------------------------------------------- pipeline


def test_text_to_image_matches_diffusers_kv(tiny_kv_pipeline, kv_reference):
    latents = noise(WIDTH, HEIGHT, seed=9)
    want = diffusers_images(kv_reference, 1, None, latents)
    got = tiny_kv_pipeline(PROMPTS[0], width=WIDTH, height=HEIGHT, latents=latents, output_type="np")
    assert_max_abs(got, want)


@pytest.mark.parametrize("references, batch", CASES, ids=[f"{r}ref-batch{b}" for r, b in CASES])
def test_reference_workflow_matches_diffusers_kv(references, batch, tiny_kv_pipeline, kv_reference, expected):
    want, mutated = expected(references, batch)
    other = diffusers_images(kv_reference, batch, reference_images(references, seed=10),
                             noise(WIDTH, HEIGHT, batch, seed=references))
    assert max_abs(other, want) >= SENSITIVITY * MAX_ABS, "other references barely move diffusers' output"
    got = our_images(tiny_kv_pipeline, references, batch)
    assert_max_abs(got, want)
    assert_closer_than_mutations(got, want, mutated)


def test_stepwise_path_equals_fused(tiny_kv_pipeline):
    """klein-generate's progress path: the cache from its own program (KVCachePlan), then one step per call."""
    fused = our_images(tiny_kv_pipeline, 3, 1)
    steps = []
    stepwise = tiny_kv_pipeline(PROMPTS[0], images=reference_images(3), width=WIDTH, height=HEIGHT,
                                latents=noise(WIDTH, HEIGHT, 1, seed=3), output_type="np",
                                on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert max_abs(stepwise, fused) <= 1e-6


def test_compiled_shapes_serve_any_references_and_batch_rows_are_independent(tiny_kv_pipeline):
    """After compile(), requests with other references (same bucket) compile nothing; in a batch, each row's cache
    comes from its own references: rows with different references give what they give next to a copy of
    themselves (a lone request is padded to the compiled batch size 2 with copies of itself)."""
    pipe = tiny_kv_pipeline
    pipe.compile(aspect_ratios=[], sizes=[(WIDTH, HEIGHT)], max_references=1, batch_sizes=(2,))
    before = pipe.compile_count
    a = pipe.prepare("a cat", [random_image(75, 67, seed=20)], WIDTH, HEIGHT, seed=1)
    b = pipe.prepare("a cat", [random_image(75, 67, seed=21)], WIDTH, HEIGHT, seed=2)
    assert a.batch_key == b.batch_key
    together = [np.asarray(image, np.int16) for image in pipe.run_batch([a, b])]
    alone = [np.asarray(pipe.run_batch([r])[0], np.int16) for r in (a, b)]
    assert pipe.last_timings["batch_size"] == 2
    pipe.run_batch([pipe.prepare("a dog", [random_image(64, 90, seed=22)], WIDTH, HEIGHT, seed=3)])
    pipe.run_batch([pipe.prepare("a dog", width=WIDTH, height=HEIGHT, seed=4)])
    assert pipe.compile_count == before, "a request on compiled shapes compiled a program"
    assert all(np.abs(t - s).max() <= 1 for t, s in zip(together, alone))
    assert np.abs(together[0] - together[1]).max() > 10, "different references must give different images"


# ------------------------------------------------------------------------- the checks catch a broken KV path


def _plain_path(pipe: KleinPipeline, monkeypatch) -> KleinPipeline:
    """The KV checkpoint run as a plain distilled model: references in every step, at the step's timestep."""
    return KleinPipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, is_distilled=True,
                         dtype=pipe.dtype, reference_buckets=TEST_BUCKETS)


def _references_at_timestep_one(pipe: KleinPipeline, monkeypatch) -> KleinPipeline:
    """The cache computed with the references modulated at timestep 1 instead of diffusers' ref_fixed_timestep 0."""
    monkeypatch.setattr(sampler_module, "reference_kv", functools.partial(reference_kv, timestep=1.0))
    return KleinPipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, is_distilled=True,
                         kv_cache=True, dtype=pipe.dtype, reference_buckets=TEST_BUCKETS)


@pytest.mark.parametrize("breakage", [_plain_path, _references_at_timestep_one], ids=lambda f: f.__name__.strip("_"))
def test_broken_kv_path_fails(breakage, tiny_kv_pipeline, expected, monkeypatch):
    want, mutated = expected(3, 1)
    got = our_images(breakage(tiny_kv_pipeline, monkeypatch), 3, 1)  # a fresh pipeline: its programs trace anew
    with pytest.raises(AssertionError):
        assert_max_abs(got, want)
    with pytest.raises(AssertionError):
        assert_closer_than_mutations(got, want, mutated)
