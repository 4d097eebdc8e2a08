"""The Sampler: classifier-free guidance as diffusers computes it, float32 matmul precision, self-describing plans."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close

from klein_jax.configs import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE
from klein_jax.latents import latent_ids, text_ids
from klein_jax.loading import random_module
from klein_jax.sampler import (
    DecodePlan,
    GeneratePlan,
    NoisePlan,
    ReferencePlan,
    Sampler,
    StepPlan,
    TextPlan,
    _velocity,
)

TEXT_LENGTH, SLOT_TOKENS = 8, 16


class _EchoTransformer:
    """Stands in for the flow transformer: a row's velocity is its text features, so that the conditional velocity is
    the prompt's features and the unconditional one the negative prompt's."""

    def __init__(self, dtype):
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x, text, sigma, img_ids, text_ids, kv_lengths=None, cached_kv=None, rope=None):
        return text[:, : x.shape[1], : x.shape[2]]  # (2B, T, C) -> (2B, L, C)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_guidance_is_diffusers_python_float_scale(dtype):
    """diffusers: `neg + guidance_scale * (pred - neg)` with a Python float. torch multiplies a bf16 tensor by it in
    float32 (4.2 is not rounded to bf16's 4.1875) and rounds every op to bf16: bit-identical when jitted, as in a
    program (XLA would drop the bf16 rounding of the difference unless told)."""
    B, rows, cols, C = 2, 4, 4, 8
    L = rows * cols
    rng = np.random.default_rng(0)
    cond = torch.from_numpy(4 * rng.standard_normal((B, L, C), np.float32)).to(getattr(torch, dtype))
    uncond = torch.from_numpy(4 * rng.standard_normal((1, L, C), np.float32)).to(getattr(torch, dtype))
    want = (uncond + 4.2 * (cond - uncond)).float().numpy()
    plan = GeneratePlan(B, (rows, cols), 0, 1, guidance=True, external_noise=True)
    inputs = dict(text_embeds=jnp.asarray(cond.float().numpy(), dtype), text_ids=text_ids(L),
                  negative_embeds=jnp.asarray(uncond.float().numpy(), dtype), target_ids=latent_ids(rows, cols),
                  timesteps=np.float32([1000.0]), guidance_scale=np.float32(4.2))
    velocity = jax.jit(lambda x, inputs: _velocity(_EchoTransformer(dtype), x, 0, inputs, plan, rope=None))(
        jnp.zeros((B, L, C), dtype), inputs)
    assert velocity.dtype == jnp.dtype(dtype)
    if dtype == "bfloat16":
        np.testing.assert_array_equal(np.asarray(velocity, np.float32), want)
    else:  # XLA's CPU backend fuses the multiply-add (one rounding fewer than torch): an ulp at most
        assert_close(velocity, want, rel=1e-6)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def sampler(request) -> Sampler:
    """A Sampler of the tiny random models in the parameter dtype (only lowered here, compiled where a test says)."""
    rng = np.random.default_rng(0)
    modules = [random_module(name, config, rng, request.param) for name, config in
               (("transformer", TINY_TRANSFORMER), ("vae", TINY_VAE), ("text_encoder", TINY_TEXT_ENCODER))]
    return Sampler(*modules, dtype=request.param, text_length=TEXT_LENGTH, slot_tokens=SLOT_TOKENS)


def _every_plan(pixels_per_token: int) -> list:
    generate = GeneratePlan(2, (2, 3), SLOT_TOKENS, 2, guidance=True, external_noise=False)
    return [TextPlan(2), ReferencePlan(1, (2 * pixels_per_token, 3 * pixels_per_token)), generate,
            StepPlan(generate), DecodePlan(2, (2, 3)), NoisePlan(2, 6)]


def test_every_plan_lowers_itself(sampler):
    ps, dtype, C = sampler.pixels_per_token, sampler.dtype, TINY_TRANSFORMER.in_channels
    images = jax.ShapeDtypeStruct((2, 2 * ps, 3 * ps, 3), jnp.float32)
    want = [jax.ShapeDtypeStruct((2, TEXT_LENGTH, TINY_TRANSFORMER.joint_attention_dim), dtype),
            jax.ShapeDtypeStruct((1, SLOT_TOKENS, C), dtype), images, jax.ShapeDtypeStruct((2, 6, C), dtype), images,
            jax.ShapeDtypeStruct((2, 6, C), dtype)]
    for plan, out in zip(_every_plan(ps), want, strict=True):
        got = sampler.lower(plan).out_info
        assert (got.shape, got.dtype) == (out.shape, out.dtype), plan


def _matmuls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]


def test_float32_programs_request_full_precision(sampler):
    """On a GPU JAX's default float32 matmul is TF32 and torch's is not: float32 programs ask for HIGHEST in every
    dot and convolution; bfloat16 programs keep the default (conftest sets HIGHEST process-wide: undone here)."""
    with jax.default_matmul_precision(None):
        for plan in (TextPlan(1), _every_plan(sampler.pixels_per_token)[2]):
            matmuls = _matmuls(sampler.lower(plan).as_text())
            assert any("dot_general" in m for m in matmuls) and (isinstance(plan, TextPlan) or any(
                "convolution" in m for m in matmuls)), plan
            forced = ["HIGHEST" in m for m in matmuls]
            assert all(forced) if sampler.dtype == jnp.float32 else not any(forced), (plan, matmuls[0])


def test_plans_describe_themselves():
    generate = GeneratePlan(1, (48, 84), 4096, 4, guidance=True, external_noise=False)
    described = [plan.describe(16) for plan in (
        TextPlan(2), ReferencePlan(1, (512, 768)), generate, generate._replace(guidance=False, external_noise=True),
        StepPlan(generate), DecodePlan(2, (48, 84)), NoisePlan(1, 4032))]
    assert described == [
        "text encoder batch=2", "reference encoder 768x512 batch=1",
        "generate 1344x768 batch=1 ref_tokens=4096 steps=4 cfg",
        "generate 1344x768 batch=1 ref_tokens=4096 steps=4 given-noise",
        "one step of generate 1344x768 batch=1 ref_tokens=4096 steps=4 cfg", "decoder 1344x768 batch=2",
        "noise 4032 tokens batch=1"]


def test_programs_are_compiled_once_and_logged(sampler, caplog):
    plan = NoisePlan(3, 5)
    before = sampler.compile_count
    with caplog.at_level(logging.INFO, logger="klein_jax.sampler"):
        program = sampler.program(plan)
    assert sampler.program(plan) is program and sampler.compile_count == before + 1
    assert any(message.startswith("compiled noise 5 tokens batch=3 in ") for message in caplog.messages)
    noise = program(np.zeros((3, 2), np.uint32))
    assert noise.shape == (3, 5, TINY_TRANSFORMER.in_channels) and noise.dtype == sampler.dtype
