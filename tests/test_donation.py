"""Buffer donation: the step program writes its latents in place, and nothing reads a donated buffer afterwards."""

import jax
import numpy as np

from conftest import noise
from klein_jax.sampler import DecodePlan, GeneratePlan, StepPlan


def _plan(pipe, width=48, height=32):
    ps = pipe.pixels_per_token
    return GeneratePlan(1, (height // ps, width // ps), 0, 4, False, external_noise=True)


def test_step_program_aliases_its_latents(tiny_pipeline):
    plan = _plan(tiny_pipeline)
    compiled = tiny_pipeline.sampler.program(StepPlan(plan))
    latent_bytes = plan.grid[0] * plan.grid[1] * tiny_pipeline.sampler.channels * 4  # (1, L, C) float32
    assert compiled.memory_analysis().alias_size_in_bytes == latent_bytes
    assert "input_output_alias" in compiled.as_text()


def test_decode_program_donates_nothing(tiny_pipeline):
    """Its latents differ from its output (images) in shape: a donation would be unusable (and warn)."""
    compiled = tiny_pipeline.sampler.program(DecodePlan(1, _plan(tiny_pipeline).grid))
    assert compiled.memory_analysis().alias_size_in_bytes == 0


def test_stepwise_keeps_the_callers_noise(tiny_pipeline):
    """Given noise already on the device is copied before the first (donating) step: the caller's array survives,
    and a second run from the same inputs gives the same images as the fused program."""
    pipe, sampler = tiny_pipeline, tiny_pipeline.sampler
    prepared = pipe._prepare("a cat", (), 48, 32, 0, None, None, noise=pipe._noise_from_latents(
        noise(48, 32, seed=3), 1, 48, 32)[0])
    plan, inputs = pipe._inputs([prepared], {})
    inputs["noise"] = jax.device_put(inputs["noise"])  # on the device, as a caller may hold it
    stepwise = [sampler.generate_stepwise(plan, inputs, lambda i, n: None) for _ in range(2)]
    assert not inputs["noise"].is_deleted()
    fused = sampler.generate(plan, inputs)
    np.testing.assert_array_equal(np.asarray(stepwise[0]), np.asarray(stepwise[1]))
    np.testing.assert_allclose(np.asarray(stepwise[0]), np.asarray(fused), atol=1e-5)
