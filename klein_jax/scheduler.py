"""Port of the Flux2KleinPipeline schedule: compute_empirical_mu + FlowMatchEulerDiscreteScheduler.set_timesteps.

diffusers builds the schedule on the host in numpy/torch:
    sigmas = np.linspace(1.0, 1 / N, N)                         # float64
    mu = compute_empirical_mu(image_seq_len, N)                 # Python float
    sigmas = exp(mu) / (exp(mu) + (1 / sigmas.astype(float32) - 1) ** 1.0)   # float32 arithmetic
    timesteps = sigmas * 1000 ; sigmas = cat([sigmas, 0])       # float32
Every step below keeps those dtypes, so the values are bit-identical to diffusers'. The result depends only on
(target image tokens, steps), so it is computed once per shape on the host and passed to the compiled sampler.
check_scheduler_config refuses a scheduler_config.json whose schedule would differ from this one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler config (klein scheduler_config.json)
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"

# The scheduler_config.json settings this port follows: key -> (what is supported, in JSON, and its test). diffusers
# reads the booleans and shift_terminal by truthiness; Flux2KleinPipeline also reads use_flow_sigmas if present.
_SUPPORTED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "_class_name": (f'"{SCHEDULER_CLASS}"', lambda v: v in (None, SCHEDULER_CLASS)),
    "num_train_timesteps": (str(NUM_TRAIN_TIMESTEPS), lambda v: v == NUM_TRAIN_TIMESTEPS),
    "use_dynamic_shifting": ("true", bool),
    "time_shift_type": ('"exponential"', lambda v: v == "exponential"),
    **{key: ("false", lambda v: not v) for key in (
        "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling",
        "use_flow_sigmas")},
    "shift_terminal": ("null", lambda v: not v),
}
# Read by FlowMatchEulerDiscreteScheduler only without dynamic shifting (the pipeline passes its own mu): any value.
_UNUSED = ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
# FlowMatchEulerDiscreteScheduler.__init__ defaults that differ from what is supported (a key may be left out).
_DIFFUSERS_DEFAULTS = {"use_dynamic_shifting": False}


def check_scheduler_config(config: dict[str, Any]) -> None:
    """Raises ValueError naming every setting of a scheduler_config.json that would change the schedule."""
    if not isinstance(config, dict):  # a bad file: a ValueError like every problem below
        raise ValueError(f"the scheduler config must be a JSON object, got {type(config).__name__}")  # noqa: TRY004
    problems = []
    for key, (supported, ok) in _SUPPORTED.items():
        if key in config and not ok(config[key]):
            problems.append(f"{key}={json.dumps(config[key], default=repr)} (supported: {supported})")
        elif key not in config and key in _DIFFUSERS_DEFAULTS:
            problems.append(f"{key} not set (diffusers' default {json.dumps(_DIFFUSERS_DEFAULTS[key])}; "
                            f"supported: {supported})")
    for key, value in config.items():
        if key not in _SUPPORTED and key not in _UNUSED and not key.startswith("_"):
            problems.append(f"{key}={json.dumps(value, default=repr)} (unknown to {SCHEDULER_CLASS})")
    if problems:
        raise ValueError(f"unsupported scheduler settings: {'; '.join(problems)}. klein-jax runs Flux2KleinPipeline's "
                         f"schedule only: {SCHEDULER_CLASS} with dynamic shifting by the exponential time shift")


class Schedule(NamedTuple):
    """The sigmas of one sampling run: sigmas (N+1,) float32 ending in 0, timesteps (N,) float32 = 1000 sigma."""

    sigmas: np.ndarray
    timesteps: np.ndarray
    mu: float


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Resolution- and step-dependent shift mu (diffusers pipeline_flux2.compute_empirical_mu)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def time_shift_exponential(mu: float, sigmas: np.ndarray, power: float = 1.0) -> np.ndarray:
    """exp(mu) / (exp(mu) + (1/sigma - 1)**power) in the dtype of `sigmas` (scheduler._time_shift_exponential)."""
    # numpy 2 keeps Python scalars weak: a float32 array stays float32, as in diffusers.
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** power)


def flow_match_schedule(image_seq_len: int, num_steps: int) -> Schedule:
    """The Euler schedule Flux2KleinPipeline uses for `image_seq_len` target tokens and `num_steps` steps."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_inference_steps={num_steps!r} must be a positive integer")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len={image_seq_len!r} must be a positive integer")
    mu = compute_empirical_mu(int(image_seq_len), int(num_steps))
    sigmas_in = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)  # pipeline float64 -> scheduler f32
    sigmas = time_shift_exponential(mu, sigmas_in).astype(np.float32)
    timesteps = (sigmas * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float32)
    sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])  # terminal sigma 0
    return Schedule(sigmas=sigmas, timesteps=timesteps, mu=mu)


def euler_step(latents: jax.Array, velocity: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """One flow-matching Euler step x + (sigma_next - sigma) v, with FlowMatchEulerDiscreteScheduler.step's casts."""
    dt = (sigma_next - sigma).astype(jnp.float32)
    # torch: a 0-d float32 tensor times a (B, L, C) tensor of velocity.dtype is computed in velocity.dtype.
    update = dt.astype(velocity.dtype) * velocity
    # step() upcasts the sample to float32 and casts the result back to the model output's dtype.
    return (latents.astype(jnp.float32) + update.astype(jnp.float32)).astype(velocity.dtype)
