"""The flow-matching schedule and Euler step against diffusers (Flux2KleinPipeline, FlowMatchEulerDiscreteScheduler)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as diffusers_mu
from diffusers.pipelines.flux2.pipeline_flux2_klein import retrieve_timesteps

from klein_jax.scheduler import check_scheduler_config, compute_empirical_mu, euler_step, flow_match_schedule

# scheduler/scheduler_config.json of the klein repos (klein.md §5.3)
KLEIN_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")


def diffusers_schedule(tokens: int, steps: int, **config) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps) exactly as Flux2KleinPipeline.__call__ step 6 computes them."""
    scheduler = FlowMatchEulerDiscreteScheduler(**{**KLEIN_SCHEDULER, **config})
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=diffusers_mu(tokens, steps))
    return scheduler.sigmas.numpy(), timesteps.numpy()


@pytest.mark.parametrize("tokens, steps", [
    (4096, 4), (4032, 4), (1024, 4), (4096, 50), (16, 1), (96, 3), (4300, 4), (4301, 2), (5000, 28), (16384, 8),
])
def test_schedule_is_bit_identical_to_diffusers(tokens, steps):
    sigmas, timesteps = diffusers_schedule(tokens, steps)
    ours = flow_match_schedule(tokens, steps)
    assert ours.sigmas.dtype == np.float32 and ours.timesteps.dtype == np.float32
    np.testing.assert_array_equal(ours.sigmas, sigmas)
    np.testing.assert_array_equal(ours.timesteps, timesteps)
    assert ours.mu == diffusers_mu(tokens, steps)


@pytest.mark.parametrize("tokens, steps, mu, first_sigmas", [  # klein.md §5.3 worked values
    (4096, 4, 2.291180, [1.0, 0.967384, 0.908144, 0.767200, 0.0]),
    (4032, 4, 2.285753, [1.0, 0.967212, 0.907690, 0.766229, 0.0]),
    (1024, 4, 2.030690, [1.0, 0.958085, 0.883982, 0.717497, 0.0]),
    (4096, 50, 2.023351, [1.0, 0.997309, 0.994521, 0.991632]),
])
def test_worked_values_of_the_spec(tokens, steps, mu, first_sigmas):
    schedule = flow_match_schedule(tokens, steps)
    assert schedule.mu == pytest.approx(mu, abs=1e-6)
    np.testing.assert_allclose(schedule.sigmas[: len(first_sigmas)], first_sigmas, atol=1e-6)
    assert schedule.sigmas.shape == (steps + 1,) and schedule.sigmas[-1] == 0.0
    np.testing.assert_array_equal(schedule.timesteps, schedule.sigmas[:-1] * np.float32(1000))


def test_empirical_mu_by_hand():
    # above 4300 tokens mu is linear in the tokens only: 0.00016927 * 5000 + 0.45666666
    assert compute_empirical_mu(5000, 4) == pytest.approx(1.30301666, abs=1e-12)
    assert compute_empirical_mu(5000, 50) == compute_empirical_mu(5000, 4)
    # below, interpolate between the 10-step and 200-step lines: at 10 steps mu = a1 * L + b1
    assert compute_empirical_mu(1000, 10) == pytest.approx(8.73809524e-05 * 1000 + 1.89833333, abs=1e-12)
    assert compute_empirical_mu(1000, 200) == pytest.approx(0.00016927 * 1000 + 0.45666666, abs=1e-12)


@pytest.mark.parametrize("steps", [0, -1, 2.0, True])
def test_bad_step_counts(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_match_schedule(4096, steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_matches_scheduler_step(dtype):
    """Every step of a 4-step schedule, with diffusers' upcast / cast-back (bf16 on CPU torch: bit-identical)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER)
    steps = 4
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=diffusers_mu(256, steps))
    schedule = flow_match_schedule(256, steps)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 256, 128, generator=generator).to(dtype)
    ours = jnp.asarray(sample.float().numpy()).astype(jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)
    for i, t in enumerate(scheduler.timesteps):
        velocity = torch.randn(2, 256, 128, generator=generator).to(dtype)
        sample = scheduler.step(velocity, t, sample, return_dict=False)[0]
        ours = euler_step(ours, jnp.asarray(velocity.float().numpy()).astype(ours.dtype),
                          jnp.float32(schedule.sigmas[i]), jnp.float32(schedule.sigmas[i + 1]))
        assert ours.dtype == (jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)
        np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), sample.float().numpy())


# ------------------------------------------------------------------------------------------ scheduler_config.json


def saved_config(**changes) -> dict:
    """scheduler_config.json as diffusers writes it for klein's scheduler, with `changes`."""
    return {**json.loads(FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER).to_json_string()), **changes}


@pytest.mark.parametrize("changes", [
    {},
    dict(shift=1.0, base_shift=0.3, max_shift=2.0, base_image_seq_len=64, max_image_seq_len=8192),
    dict(shift_terminal=0.0),
])
def test_accepted_configs_give_our_schedule(changes):
    """What is accepted leaves diffusers' schedule bit-identical to ours (the values it ignores may be anything)."""
    config = saved_config(**changes)
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and "_diffusers_version" in config
    check_scheduler_config(config)
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    sigmas, timesteps = diffusers_schedule(4096, 4, **init)
    np.testing.assert_array_equal(flow_match_schedule(4096, 4).sigmas, sigmas)
    np.testing.assert_array_equal(flow_match_schedule(4096, 4).timesteps, timesteps)


@pytest.mark.parametrize("changes, needle", [
    (dict(use_dynamic_shifting=False), "use_dynamic_shifting=false (supported: true)"),
    (dict(time_shift_type="linear"), 'time_shift_type="linear" (supported: "exponential")'),
    (dict(num_train_timesteps=500), "num_train_timesteps=500 (supported: 1000)"),
    (dict(shift_terminal=0.1), "shift_terminal=0.1 (supported: null)"),
    (dict(use_karras_sigmas=True), "use_karras_sigmas=true (supported: false)"),
    (dict(use_exponential_sigmas=True), "use_exponential_sigmas=true (supported: false)"),
    (dict(use_beta_sigmas=True), "use_beta_sigmas=true (supported: false)"),
    (dict(invert_sigmas=True), "invert_sigmas=true (supported: false)"),
    (dict(stochastic_sampling=True), "stochastic_sampling=true (supported: false)"),
    (dict(use_flow_sigmas=True), "use_flow_sigmas=true (supported: false)"),
    (dict(_class_name="EulerDiscreteScheduler"),
     '_class_name="EulerDiscreteScheduler" (supported: "FlowMatchEulerDiscreteScheduler")'),
    (dict(use_new_sigmas=True), "use_new_sigmas=true (unknown to FlowMatchEulerDiscreteScheduler)"),
])
def test_refused_settings_are_named(changes, needle):
    with pytest.raises(ValueError, match="unsupported scheduler settings") as e:
        check_scheduler_config(saved_config(**changes))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("changes", [dict(use_dynamic_shifting=False), dict(time_shift_type="linear"),
                                     dict(num_train_timesteps=500), dict(shift_terminal=0.1),
                                     dict(use_karras_sigmas=True), dict(invert_sigmas=True)])
def test_refused_settings_change_the_schedule(changes):
    """Each refused schedule setting really moves diffusers' sigmas or timesteps away from ours."""
    sigmas, timesteps = diffusers_schedule(4096, 4, **changes)
    ours = flow_match_schedule(4096, 4)
    assert not (np.array_equal(ours.sigmas, sigmas) and np.array_equal(ours.timesteps, timesteps))


def test_every_offending_key_in_one_error():
    config = {k: v for k, v in saved_config(use_karras_sigmas=True, time_shift_type="linear").items()
              if k != "use_dynamic_shifting"}
    with pytest.raises(ValueError) as e:
        check_scheduler_config(config)
    message = str(e.value)
    for needle in ("use_karras_sigmas=true", 'time_shift_type="linear"',
                   "use_dynamic_shifting not set (diffusers' default false; supported: true)"):
        assert needle in message
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        check_scheduler_config([])
