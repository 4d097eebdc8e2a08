"""The compiled programs of Flux2KleinPipeline: text encoding, reference encoding, denoise + decode.

The only place that jits. Modules are split once (nnx.split) when the Sampler is built; every program is a pure
function of (state, inputs), lowered and compiled ahead of time for one hashable plan (its static shapes) and kept
in a dict on the Sampler, so the caller owns the cache. Sigmas, timesteps, the guidance scale and the reference
layout are inputs, not constants: one program serves every request of its shape. Each plan lowers and describes
itself; a float32 pipeline's programs ask for full-precision matmuls (torch's float32 matmuls are not TF32).

Programs (plans):
- TextPlan(batch): Qwen3 features of (B, 512) tokens.
- ReferencePlan(batch, pixels): VAE-encode references padded to a grid bucket (Flux2VAE.encode_reference_tokens)
  into a fixed-length slot of packed tokens.
- GeneratePlan(batch, grid, ref_tokens, steps, guidance, external_noise): noise -> Euler loop (lax.fori_loop over
  the transformer) -> VAE decode -> images in [0, 1]. The stepwise variant (StepPlan + DecodePlan + NoisePlan)
  runs the same math one step per call, for progress callbacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klein_jax.models.transformer import round_to_dtype
from klein_jax.request import MAX_REFERENCES  # reference slots of every program
from klein_jax.scheduler import euler_step

log = logging.getLogger(__name__)


# Every plan has lower(sampler) -> (the program's function, its arguments' shapes) and describe(pixels_per_token).


class TextPlan(NamedTuple):
    """Qwen3 features of (batch, text_length) tokens."""

    batch: int

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        tokens = _spec((self.batch, sampler.text_length), np.int32)
        fn = functools.partial(_encode_text, graphs=sampler._graphs, dtype=sampler.dtype)
        return fn, (sampler._text_state, tokens, tokens)

    def describe(self, pixels_per_token: int) -> str:
        return f"text encoder batch={self.batch}"


class ReferencePlan(NamedTuple):
    """VAE-encode references padded to a grid bucket into fixed-length slots of packed tokens."""

    batch: int
    pixels: tuple[int, int]  # padded (height, width) of the bucket, in pixels

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        images = _spec((self.batch, *self.pixels, 3), np.float32)
        fn = functools.partial(_encode_references, graphs=sampler._graphs, slot_tokens=sampler.slot_tokens)
        return fn, (sampler._vae_state, images, _spec((2,), np.int32))

    def describe(self, pixels_per_token: int) -> str:
        return f"reference encoder {self.pixels[1]}x{self.pixels[0]} batch={self.batch}"


class GeneratePlan(NamedTuple):
    """Noise -> Euler loop over the transformer -> VAE decode -> images in [0, 1]."""

    batch: int
    grid: tuple[int, int]  # target latent grid (rows, cols): one token per 16x16 pixels
    ref_tokens: int  # padded reference token bucket; 0 without references
    steps: int
    guidance: bool  # classifier-free guidance with the "" prompt (base checkpoints)
    external_noise: bool  # noise given (diffusers layout `latents=`) instead of drawn from seeds

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        fn = functools.partial(_generate, graphs=sampler._graphs, plan=self)
        return fn, ((sampler._transformer_state, sampler._vae_state), sampler.generate_input_specs(self))

    def describe(self, pixels_per_token: int) -> str:
        return (f"generate {_size(self.batch, self.grid, pixels_per_token)} ref_tokens={self.ref_tokens} "
                f"steps={self.steps}{' cfg' if self.guidance else ''}{' given-noise' if self.external_noise else ''}")


class StepPlan(NamedTuple):
    """One Euler step of a GeneratePlan (the stepwise path, for progress callbacks)."""

    generate: GeneratePlan

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        plan = self.generate
        fn = functools.partial(_generate_step, graphs=sampler._graphs, plan=plan)
        latents = sampler._latent_spec(plan.batch, plan.grid)
        return fn, (sampler._transformer_state, latents, _spec((), np.int32), sampler.generate_input_specs(plan))

    def describe(self, pixels_per_token: int) -> str:
        return "one step of " + self.generate.describe(pixels_per_token)


class DecodePlan(NamedTuple):
    """Packed latents -> images in [0, 1] (the stepwise path)."""

    batch: int
    grid: tuple[int, int]

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        fn = functools.partial(_decode_only, graphs=sampler._graphs, plan=self)
        return fn, (sampler._vae_state, sampler._latent_spec(self.batch, self.grid))

    def describe(self, pixels_per_token: int) -> str:
        return f"decoder {_size(self.batch, self.grid, pixels_per_token)}"


class NoisePlan(NamedTuple):
    """The initial noise of `tokens` tokens from the seeds' key data (the stepwise path)."""

    batch: int
    tokens: int

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        fn = functools.partial(_noise, channels=sampler.channels, dtype=sampler.dtype, plan=self)
        return fn, (_spec((self.batch, 2), np.uint32),)

    def describe(self, pixels_per_token: int) -> str:
        return f"noise {self.tokens} tokens batch={self.batch}"


def _size(batch: int, grid: tuple[int, int], pixels_per_token: int) -> str:
    rows, cols = grid
    return f"{cols * pixels_per_token}x{rows * pixels_per_token} batch={batch}"


Plan = TextPlan | ReferencePlan | GeneratePlan | StepPlan | DecodePlan | NoisePlan


def seed_key_data(seed: int) -> np.ndarray:
    """uint32 (2,) threefry key data of a 64-bit seed: equal to jax.random.key(seed) (x64 for seeds >= 2**32)."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def draw_noise(key_data: jax.Array, tokens: int, channels: int, dtype) -> jax.Array:
    """(B, tokens, channels) standard normal noise, row b from its own key (B, 2): batching does not change it."""
    keys = jax.random.wrap_key_data(key_data, impl="threefry2x32")
    noise = jax.vmap(lambda k: jax.random.normal(k, (tokens, channels), jnp.float32))(keys)
    return noise.astype(dtype)  # diffusers draws the noise in prompt_embeds.dtype


@dataclasses.dataclass(frozen=True)
class _Graphs:
    transformer: Any
    vae: Any
    text_encoder: Any


def _reference_tokens(inputs: dict) -> jax.Array:
    """(B, R, C): the references' valid tokens gathered from the slots, padding rows at the end."""
    slots = jnp.concatenate(inputs["ref_slots"], axis=1)  # MAX_REFERENCES x (B, S, C) -> (B, 4S, C)
    return jnp.take(slots, inputs["ref_index"], axis=1)  # (B, 4S, C) -> (B, R, C)


def _velocity(transformer, latents: jax.Array, step: jax.Array, inputs: dict, plan: GeneratePlan) -> jax.Array:
    """The (guided) velocity (B, L, C) of the target tokens at step `step`, as Flux2KleinPipeline's loop body."""
    B, L, _ = latents.shape
    T = inputs["text_embeds"].shape[1]
    x, img_ids, kv_lengths = latents, inputs["target_ids"], None
    if plan.ref_tokens:
        refs = _reference_tokens(inputs).astype(latents.dtype)
        x = jnp.concatenate([latents, refs], axis=1)  # (B, L + R, C): target first, then references
        img_ids = jnp.concatenate([img_ids, inputs["ref_ids"]], axis=0)  # (L + R, 4)
        kv_lengths = jnp.full((B,), T + L, jnp.int32) + inputs["ref_count"]  # padding at the end is not a key
    x = x.astype(transformer.dtype)
    # diffusers: timestep = t.expand(B).to(latents.dtype); the model gets timestep / 1000 and scales it back.
    sigma = jnp.broadcast_to(inputs["timesteps"][step].astype(latents.dtype), (B,)) / 1000
    text = inputs["text_embeds"]
    if plan.guidance:  # cond and uncond as one batch of 2B: the rows are independent
        negative = jnp.broadcast_to(inputs["negative_embeds"], text.shape)
        x, sigma, text = (jnp.concatenate([a, a]) for a in (x, sigma, text))
        text = text.at[B:].set(negative)
        kv_lengths = None if kv_lengths is None else jnp.concatenate([kv_lengths, kv_lengths])
    velocity = transformer(x, text, sigma, img_ids, inputs["text_ids"], kv_lengths=kv_lengths)[:, :L]
    if plan.guidance:
        cond, uncond = velocity[:B], velocity[B:]
        velocity = _guide(cond, uncond, inputs["guidance_scale"])
    return velocity


def _guide(cond: jax.Array, uncond: jax.Array, scale: jax.Array) -> jax.Array:
    """uncond + scale * (cond - uncond) as torch runs diffusers' line with a Python-float scale (float32 here).

    Every op rounds to the velocity's dtype, but the scale is never rounded: torch multiplies a bfloat16 tensor by a
    Python scalar in float32 (its opmath type), so 4.2 stays 4.2 (not bfloat16's 4.1875).
    """
    dtype = cond.dtype
    diff = round_to_dtype(cond.astype(jnp.float32) - uncond.astype(jnp.float32), dtype)
    return (uncond.astype(jnp.float32) + round_to_dtype(scale * diff, dtype)).astype(dtype)


def _step(transformer, latents: jax.Array, step: jax.Array, inputs: dict, plan: GeneratePlan) -> jax.Array:
    velocity = _velocity(transformer, latents, step, inputs, plan)
    return euler_step(latents, velocity, inputs["sigmas"][step], inputs["sigmas"][step + 1])


def _decode(vae, latents: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Packed latents (B, L, C) -> float32 images (B, H, W, 3) in [0, 1] (end of __call__ + postprocess)."""
    B, L, C = latents.shape
    images = vae.decode_packed(latents.reshape(B, grid[0], grid[1], C))  # (B, L, C) -> (B, h, w, C) -> pixels
    return jnp.clip(images * 0.5 + 0.5, 0, 1).astype(jnp.float32)  # VaeImageProcessor.denormalize, then .float()


def _initial_latents(inputs: dict, plan: GeneratePlan, channels: int, dtype) -> jax.Array:
    if plan.external_noise:
        return inputs["noise"].astype(dtype)
    return draw_noise(inputs["key_data"], plan.grid[0] * plan.grid[1], channels, dtype)


def _generate(states, inputs, *, graphs: _Graphs, plan: GeneratePlan):
    transformer = nnx.merge(graphs.transformer, states[0])
    vae = nnx.merge(graphs.vae, states[1])
    latents = _initial_latents(inputs, plan, transformer.config.in_channels, inputs["text_embeds"].dtype)
    latents = jax.lax.fori_loop(0, plan.steps, lambda i, x: _step(transformer, x, i, inputs, plan), latents)
    return _decode(vae, latents, plan.grid)


def _generate_step(state, latents, step, inputs, *, graphs: _Graphs, plan: GeneratePlan):
    return _step(nnx.merge(graphs.transformer, state), latents, step, inputs, plan)


def _decode_only(state, latents, *, graphs: _Graphs, plan: DecodePlan):
    return _decode(nnx.merge(graphs.vae, state), latents, plan.grid)


def _noise(key_data, *, channels: int, dtype, plan: NoisePlan):
    return draw_noise(key_data, plan.tokens, channels, dtype)


def _encode_text(state, input_ids, attention_mask, *, graphs: _Graphs, dtype):
    return nnx.merge(graphs.text_encoder, state)(input_ids, attention_mask).astype(dtype)


def _encode_references(state, images, valid_hw, *, graphs: _Graphs, slot_tokens: int):
    vae = nnx.merge(graphs.vae, state)
    # diffusers: image.to(dtype=vae.dtype) before _encode_vae_image
    return vae.encode_reference_tokens(images.astype(vae.encoder.conv_in.kernel[...].dtype), valid_hw, slot_tokens)


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


class Sampler:
    """Owns the split modules and every compiled program; counts the programs it compiled."""

    def __init__(self, transformer, vae, text_encoder, *, dtype, text_length: int, slot_tokens: int):
        graphs, states = zip(*(nnx.split(m) for m in (transformer, vae, text_encoder)))
        self._graphs = _Graphs(*graphs)
        self._transformer_state, self._vae_state, self._text_state = states
        self.dtype = jnp.dtype(dtype)
        self.text_length = text_length
        self.slot_tokens = slot_tokens
        self.channels = transformer.config.in_channels
        self.text_dim = transformer.config.joint_attention_dim
        self.pixels_per_token = 2 * vae.config.spatial_scale
        self._programs: dict[Any, jax.stages.Compiled] = {}
        self.compile_count = 0
        self.compile_seconds = 0.0

    def module(self, name: str):
        """The "transformer", "vae" or "text_encoder" module, merged from the split state (shares its arrays)."""
        states = {"transformer": self._transformer_state, "vae": self._vae_state, "text_encoder": self._text_state}
        if name not in states:
            raise ValueError(f"module {name!r} is not one of {', '.join(states)}")
        return nnx.merge(getattr(self._graphs, name), states[name])

    # ------------------------------------------------------------------------------------------ compilation

    def lower(self, plan: Plan) -> jax.stages.Lowered:
        """The program of `plan` lowered to StableHLO; a float32 pipeline's matmuls at full precision."""
        fn, args = plan.lower(self)
        # JAX's default float32 matmul on a GPU is TF32 and torch's is not: float32 parity needs HIGHEST.
        full = self.dtype == jnp.float32
        with jax.default_matmul_precision("highest") if full else contextlib.nullcontext():
            return jax.jit(fn).lower(*args)

    def program(self, plan: Plan) -> jax.stages.Compiled:
        """The compiled program of `plan`, compiling it (ahead of time) on first use."""
        compiled = self._programs.get(plan)
        if compiled is None:
            start = time.perf_counter()
            compiled = self.lower(plan).compile()
            seconds = time.perf_counter() - start
            self._programs[plan] = compiled
            self.compile_count += 1
            self.compile_seconds += seconds
            log.info("compiled %s in %.1f s", plan.describe(self.pixels_per_token), seconds)
        return compiled

    def _latent_spec(self, batch: int, grid: tuple[int, int]) -> jax.ShapeDtypeStruct:
        return _spec((batch, grid[0] * grid[1], self.channels), self.dtype)

    def generate_input_specs(self, plan: GeneratePlan) -> dict[str, Any]:
        """Shapes and dtypes of the inputs of a GeneratePlan's program (the dict `generate` takes)."""
        B, L, T = plan.batch, plan.grid[0] * plan.grid[1], self.text_length
        specs = {
            "text_embeds": _spec((B, T, self.text_dim), self.dtype),
            "text_ids": _spec((T, 4), np.int32),
            "target_ids": _spec((L, 4), np.int32),
            "sigmas": _spec((plan.steps + 1,), np.float32),
            "timesteps": _spec((plan.steps,), np.float32),
        }
        if plan.external_noise:
            specs["noise"] = _spec((B, L, self.channels), self.dtype)
        else:
            specs["key_data"] = _spec((B, 2), np.uint32)
        if plan.guidance:
            specs["negative_embeds"] = _spec((1, T, self.text_dim), self.dtype)
            specs["guidance_scale"] = _spec((), np.float32)
        if plan.ref_tokens:
            R = plan.ref_tokens
            specs["ref_slots"] = tuple(_spec((B, self.slot_tokens, self.channels), self.dtype)
                                       for _ in range(MAX_REFERENCES))
            specs["ref_index"] = _spec((R,), np.int32)
            specs["ref_ids"] = _spec((R, 4), np.int32)
            specs["ref_count"] = _spec((), np.int32)
        return specs

    # ---------------------------------------------------------------------------------------------- running

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> jax.Array:
        """(B, T) token ids and mask -> text features (B, T, joint) in the pipeline dtype."""
        program = self.program(TextPlan(input_ids.shape[0]))
        return program(self._text_state, input_ids, attention_mask)

    def encode_references(self, images: np.ndarray, valid_hw: np.ndarray) -> jax.Array:
        """Padded references (B, H, W, 3) in [-1, 1] with valid (h, w) -> token slots (B, slot_tokens, C)."""
        program = self.program(ReferencePlan(images.shape[0], tuple(images.shape[1:3])))
        return program(self._vae_state, images, valid_hw)

    def generate(self, plan: GeneratePlan, inputs: dict[str, Any]) -> jax.Array:
        """Runs the fused program: float32 images (B, H, W, 3) in [0, 1]."""
        return self.program(plan)((self._transformer_state, self._vae_state), inputs)

    def generate_stepwise(self, plan: GeneratePlan, inputs: dict[str, Any], on_step: Callable[[int, int], None],
                          timings: dict[str, float] | None = None) -> jax.Array:
        """The same images one Euler step per call, calling on_step(step, steps) after each; fills
        timings["denoise_ms"] and timings["decode_ms"] (compilation excluded) when given."""
        tokens = plan.grid[0] * plan.grid[1]
        noise_program = None if plan.external_noise else self.program(NoisePlan(plan.batch, tokens))
        step_program = self.program(StepPlan(plan))
        decode_program = self.program(DecodePlan(plan.batch, plan.grid))
        start = time.perf_counter()
        latents = jax.device_put(inputs["noise"]) if noise_program is None else noise_program(inputs["key_data"])
        for i in range(plan.steps):
            latents = step_program(self._transformer_state, latents, np.int32(i), inputs).block_until_ready()
            on_step(i + 1, plan.steps)
        middle = time.perf_counter()
        images = decode_program(self._vae_state, latents).block_until_ready()
        if timings is not None:
            timings["denoise_ms"] = 1000 * (middle - start)
            timings["decode_ms"] = 1000 * (time.perf_counter() - middle)
        return images

