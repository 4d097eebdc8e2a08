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
- With `kv_cache` (klein-9B KV, klein_jax/models/kv_cache.py) the references enter only as keys and values, computed
  once before the loop (the stepwise path: KVCachePlan) and attended by every step.
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

from klein_jax.lora.apply import LoraLayout, apply_lora
from klein_jax.lora.lokr import lokr_specs
from klein_jax import sharding
from klein_jax.models.kv_cache import ReferenceKV, reference_kv, reference_kv_shapes
from klein_jax.models.transformer import round_to_dtype
from klein_jax.request import MAX_REFERENCES  # reference slots of every program
from klein_jax.scheduler import euler_step

log = logging.getLogger(__name__)


# Every plan has lower(sampler) -> (the program's function, its arguments' shapes) and describe(pixels_per_token).


class TextPlan(NamedTuple):
    """Qwen3 features of (batch, text_length) tokens."""

    batch: int

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        tokens = sampler._batched((self.batch, sampler.text_length), np.int32)
        fn = functools.partial(_encode_text, graphs=sampler._graphs, dtype=sampler.dtype)
        return fn, (sampler._text_state, tokens, tokens)

    def describe(self, pixels_per_token: int) -> str:
        return f"text encoder batch={self.batch}"


class ReferencePlan(NamedTuple):
    """VAE-encode references padded to a grid bucket into fixed-length slots of packed tokens."""

    batch: int
    pixels: tuple[int, int]  # padded (height, width) of the bucket, in pixels

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        images = sampler._batched((self.batch, *self.pixels, 3), np.float32)
        fn = functools.partial(_encode_references, graphs=sampler._graphs, slot_tokens=sampler.slot_tokens)
        return fn, (sampler._vae_state, images, sampler._shared((2,), np.int32))

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
    lora: LoraLayout | None = None  # LoRA factors as inputs (klein_jax/lora); None: the plain transformer
    kv_cache: bool = False  # klein-9B KV: the references enter as keys and values computed once (with ref_tokens)

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        fn = functools.partial(_generate, graphs=sampler._graphs, plan=self)
        return fn, ((sampler._transformer_state, sampler._vae_state), sampler.generate_input_specs(self))

    def describe(self, pixels_per_token: int) -> str:
        return (f"generate {_size(self.batch, self.grid, pixels_per_token)} ref_tokens={self.ref_tokens} "
                f"steps={self.steps}{' cfg' if self.guidance else ''}{' given-noise' if self.external_noise else ''}"
                f"{' ' + self.lora.describe() if self.lora else ''}{' kv' if self.kv_cache else ''}")


class StepPlan(NamedTuple):
    """One Euler step of a GeneratePlan (the stepwise path, for progress callbacks)."""

    generate: GeneratePlan

    @property
    def batch(self) -> int:
        return self.generate.batch

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        plan = self.generate
        fn = functools.partial(_generate_step, graphs=sampler._graphs, plan=plan)
        latents = sampler._latent_spec(plan.batch, plan.grid)
        step = sampler._shared((), np.int32)
        specs = sampler.generate_input_specs(plan)
        if _caches_references(plan):  # the references' keys and values, from the KVCachePlan program
            specs["ref_kv"] = sampler.reference_kv_specs(plan)
        return fn, (sampler._transformer_state, latents, step, specs)

    def describe(self, pixels_per_token: int) -> str:
        return "one step of " + self.generate.describe(pixels_per_token)


class KVCachePlan(NamedTuple):
    """The references' keys and values of a kv_cache GeneratePlan (the stepwise path; the fused one computes them)."""

    generate: GeneratePlan

    @property
    def batch(self) -> int:
        return self.generate.batch

    def lower(self, sampler: Sampler) -> tuple[Callable, tuple]:
        fn = functools.partial(_reference_kv_only, graphs=sampler._graphs, plan=self.generate)
        return fn, (sampler._transformer_state, _kv_cache_inputs(sampler.generate_input_specs(self.generate)))

    def describe(self, pixels_per_token: int) -> str:
        return "reference keys and values of " + self.generate.describe(pixels_per_token)


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
        return fn, (sampler._batched((self.batch, 2), np.uint32),)

    def describe(self, pixels_per_token: int) -> str:
        return f"noise {self.tokens} tokens batch={self.batch}"


def _size(batch: int, grid: tuple[int, int], pixels_per_token: int) -> str:
    rows, cols = grid
    return f"{cols * pixels_per_token}x{rows * pixels_per_token} batch={batch}"


Plan = TextPlan | ReferencePlan | GeneratePlan | StepPlan | KVCachePlan | DecodePlan | NoisePlan

# Arguments a program donates (XLA writes its output into them). Only a step's latents qualify: a donated buffer is
# reused only for an output of its shape and dtype, and no other program has one (text ids, images, key data, noise and
# the decode's latents differ from their outputs; weights, inputs and the KV cache are read again).
DONATED_ARGUMENTS: dict[type, tuple[int, ...]] = {StepPlan: (1,)}


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
    mesh: jax.sharding.Mesh


def _vae(graphs: _Graphs, state):
    """The VAE merged inside the traced function, its weights gathered whole from their shards (sharding.GATHERED)."""
    return nnx.merge(graphs.vae, sharding.gathered(state, graphs.mesh))


def _reference_tokens(inputs: dict) -> jax.Array:
    """(B, R, C): the references' valid tokens gathered from the slots, padding rows at the end."""
    slots = jnp.concatenate(inputs["ref_slots"], axis=1)  # MAX_REFERENCES x (B, S, C) -> (B, 4S, C)
    return jnp.take(slots, inputs["ref_index"], axis=1)  # (B, 4S, C) -> (B, R, C)


def _image_ids(inputs: dict, plan: GeneratePlan) -> jax.Array:
    """Position ids (L [+ R], 4) of the image tokens the transformer runs: the target's, then the references' unless
    they ride as cached keys and values."""
    if plan.ref_tokens and not _caches_references(plan):
        return jnp.concatenate([inputs["target_ids"], inputs["ref_ids"]], axis=0)  # (L + R, 4)
    return inputs["target_ids"]


def _velocity(transformer, latents: jax.Array, step: jax.Array, inputs: dict, plan: GeneratePlan,
              rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """The (guided) velocity (B, L, C) of the target tokens at step `step`, as Flux2KleinPipeline's loop body;
    rope: the joint sequence's cos/sin tables (transformer.rope of the text's and _image_ids' positions)."""
    B, L, _ = latents.shape
    T = inputs["text_embeds"].shape[1]
    x, kv_lengths, cached_kv = latents, None, None
    if _caches_references(plan):  # klein-9B KV: the references only as cached keys and values, after the sequence
        cached_kv = inputs["ref_kv"]
        kv_lengths = jnp.full((B,), T + L, jnp.int32) + inputs["ref_count"]  # padding at the end is not a key
    elif plan.ref_tokens:
        refs = _reference_tokens(inputs).astype(latents.dtype)
        x = jnp.concatenate([latents, refs], axis=1)  # (B, L + R, C): target first, then references
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
    velocity = transformer(x, text, sigma, _image_ids(inputs, plan), inputs["text_ids"], kv_lengths=kv_lengths,
                           cached_kv=cached_kv, rope=rope)[:, :L]
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


def _denoise(transformer, latents: jax.Array, first, last, inputs: dict, plan: GeneratePlan) -> jax.Array:
    """Euler steps first..last-1 (a lax.fori_loop). The rotary tables are computed once, before the loop: inside it
    they are loop operands, read from memory; computed in the step, XLA fused their cos/sin into every block's q
    and k rotation and recomputed them per head (7 % of a medium CPU step). A single step (the stepwise program)
    keeps the loop, with traced bounds, so that it runs the same code."""
    rope = transformer.rope(_image_ids(inputs, plan), inputs["text_ids"])

    def step(i, x):
        velocity = _velocity(transformer, x, i, inputs, plan, rope)
        return euler_step(x, velocity, inputs["sigmas"][i], inputs["sigmas"][i + 1])

    return jax.lax.fori_loop(first, last, step, latents)


def _decode(vae, latents: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Packed latents (B, L, C) -> float32 images (B, H, W, 3) in [0, 1] (end of __call__ + postprocess)."""
    B, L, C = latents.shape
    images = vae.decode_packed(latents.reshape(B, grid[0], grid[1], C))  # (B, L, C) -> (B, h, w, C) -> pixels
    return jnp.clip(images * 0.5 + 0.5, 0, 1).astype(jnp.float32)  # VaeImageProcessor.denormalize, then .float()


def _initial_latents(inputs: dict, plan: GeneratePlan, channels: int, dtype) -> jax.Array:
    if plan.external_noise:
        return inputs["noise"].astype(dtype)
    return draw_noise(inputs["key_data"], plan.grid[0] * plan.grid[1], channels, dtype)


def _transformer(graphs: _Graphs, state, inputs: dict, plan: GeneratePlan):
    """The transformer merged inside the traced function, with the plan's LoRA factors applied."""
    transformer = nnx.merge(graphs.transformer, state)
    if plan.lora:
        apply_lora(transformer, plan.lora, inputs["lora"])
    return transformer


def _caches_references(plan: GeneratePlan) -> bool:
    return plan.kv_cache and plan.ref_tokens > 0


def _reference_kv(transformer, inputs: dict) -> ReferenceKV:
    """The references' keys and values in every block (Flux2KleinKVPipeline's first step computes them)."""
    return reference_kv(transformer, _reference_tokens(inputs), inputs["ref_ids"], inputs["ref_count"])


def _generate(states, inputs, *, graphs: _Graphs, plan: GeneratePlan):
    transformer = _transformer(graphs, states[0], inputs, plan)
    vae = _vae(graphs, states[1])
    if _caches_references(plan):
        inputs = {**inputs, "ref_kv": _reference_kv(transformer, inputs)}
    latents = _initial_latents(inputs, plan, transformer.config.in_channels, inputs["text_embeds"].dtype)
    latents = _denoise(transformer, latents, 0, plan.steps, inputs, plan)
    return _decode(vae, latents, plan.grid)


def _generate_step(state, latents, step, inputs, *, graphs: _Graphs, plan: GeneratePlan):
    return _denoise(_transformer(graphs, state, inputs, plan), latents, step, step + 1, inputs, plan)


def _kv_cache_inputs(inputs: dict) -> dict:
    """The inputs a KVCachePlan program reads: the references and the LoRA factors."""
    return {k: v for k, v in inputs.items() if k in ("ref_slots", "ref_index", "ref_ids", "ref_count", "lora")}


def _reference_kv_only(state, inputs, *, graphs: _Graphs, plan: GeneratePlan) -> ReferenceKV:
    return _reference_kv(_transformer(graphs, state, inputs, plan), inputs)


def _decode_only(state, latents, *, graphs: _Graphs, plan: DecodePlan):
    return _decode(_vae(graphs, state), latents, plan.grid)


def _noise(key_data, *, channels: int, dtype, plan: NoisePlan):
    return draw_noise(key_data, plan.tokens, channels, dtype)


def _encode_text(state, input_ids, attention_mask, *, graphs: _Graphs, dtype):
    return nnx.merge(graphs.text_encoder, state)(input_ids, attention_mask).astype(dtype)


def _encode_references(state, images, valid_hw, *, graphs: _Graphs, slot_tokens: int):
    vae = _vae(graphs, state)
    # diffusers: image.to(dtype=vae.dtype) before _encode_vae_image
    return vae.encode_reference_tokens(images.astype(vae.encoder.conv_in.kernel[...].dtype), valid_hw, slot_tokens)


def _spec(shape, dtype, where: jax.sharding.Sharding | None = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=where)


def _placed(program: jax.stages.Compiled, first: int, *inputs) -> list:
    """`inputs` (the program's arguments from position `first` on) placed as the program expects them: host arrays
    split over the devices, device arrays already placed so kept (a program refuses differently placed ones).
    Inputs the program does not read (no sharding) are passed as they are."""
    def place(value, where):
        return value if where is None else sharding.put(value, where)

    expected = program.input_shardings[0][first:]
    return [jax.tree.map(place, value, where, is_leaf=lambda x: x is None)
            for value, where in zip(inputs, expected, strict=True)]


class Sampler:
    """Owns the split modules and every compiled program; counts the programs it compiled.

    mesh: the (data, model) device mesh (klein_jax/sharding.py); the modules' arrays are placed on it as its
    partitioning table says (arrays already placed so, as from_pretrained loads them, are not copied), and every
    program's batch inputs and its output are split over `data`.
    """

    def __init__(self, transformer, vae, text_encoder, *, dtype, text_length: int, slot_tokens: int,
                 mesh: jax.sharding.Mesh | None = None):
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        for name, module in (("transformer", transformer), ("text_encoder", text_encoder)):
            sharding.check_model_axis(name, module.config, self.mesh)
        graphs, states = zip(*(nnx.split(m) for m in (transformer, vae, text_encoder)))
        self._graphs = _Graphs(*graphs, mesh=self.mesh)
        self._transformer_state, self._vae_state, self._text_state = (
            sharding.shard_state(state, name, self.mesh)
            for state, name in zip(states, ("transformer", "vae", "text_encoder")))
        self.dtype = jnp.dtype(dtype)
        self.text_length = text_length
        self.slot_tokens = slot_tokens
        self.channels = transformer.config.in_channels
        self.transformer_config = transformer.config
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
            return jax.jit(fn, out_shardings=sharding.batch_sharding(self.mesh, plan.batch),
                           donate_argnums=DONATED_ARGUMENTS.get(type(plan), ())).lower(*args)

    def program(self, plan: Plan) -> jax.stages.Compiled:
        """The compiled program of `plan`, compiling it (ahead of time) on first use."""
        key = (type(plan), plan)  # plans are tuples: StepPlan(p) == KVCachePlan(p), DecodePlan can equal a ReferencePlan
        compiled = self._programs.get(key)
        if compiled is None:
            start = time.perf_counter()
            compiled = self.lower(plan).compile()
            seconds = time.perf_counter() - start
            self._programs[key] = compiled
            self.compile_count += 1
            self.compile_seconds += seconds
            log.info("compiled %s in %.1f s", plan.describe(self.pixels_per_token), seconds)
        return compiled

    def _batched(self, shape, dtype) -> jax.ShapeDtypeStruct:
        """An input whose dimension 0 is the batch: split over the mesh's data axis."""
        return _spec(shape, dtype, sharding.batch_sharding(self.mesh, shape[0]))

    def _shared(self, shape, dtype) -> jax.ShapeDtypeStruct:
        """An input every row uses (ids, schedules, reference layout): replicated."""
        return _spec(shape, dtype, sharding.replicated(self.mesh))

    def _latent_spec(self, batch: int, grid: tuple[int, int]) -> jax.ShapeDtypeStruct:
        return self._batched((batch, grid[0] * grid[1], self.channels), self.dtype)

    def generate_input_specs(self, plan: GeneratePlan) -> dict[str, Any]:
        """Shapes and dtypes of the inputs of a GeneratePlan's program (the dict `generate` takes)."""
        B, L, T = plan.batch, plan.grid[0] * plan.grid[1], self.text_length
        specs = {
            "text_embeds": self._batched((B, T, self.text_dim), self.dtype),
            "text_ids": self._shared((T, 4), np.int32),
            "target_ids": self._shared((L, 4), np.int32),
            "sigmas": self._shared((plan.steps + 1,), np.float32),
            "timesteps": self._shared((plan.steps,), np.float32),
        }
        if plan.external_noise:
            specs["noise"] = self._batched((B, L, self.channels), self.dtype)
        else:
            specs["key_data"] = self._batched((B, 2), np.uint32)
        if plan.guidance:
            specs["negative_embeds"] = self._shared((1, T, self.text_dim), self.dtype)
            specs["guidance_scale"] = self._shared((), np.float32)
        if plan.ref_tokens:
            R = plan.ref_tokens
            specs["ref_slots"] = tuple(self._batched((B, self.slot_tokens, self.channels), self.dtype)
                                       for _ in range(MAX_REFERENCES))
            specs["ref_index"] = self._shared((R,), np.int32)
            specs["ref_ids"] = self._shared((R, 4), np.int32)
            specs["ref_count"] = self._shared((), np.int32)
        if plan.lora:  # klein_jax/lora/apply.py: down (in, R), up (R, out) per target layer, weights (R,)
            R, targets = plan.lora.rank, plan.lora.targets
            specs["lora"] = {"down": tuple(self._shared((fan_in, R), self.dtype) for _, fan_in, _ in targets),
                             "up": tuple(self._shared((R, fan_out), self.dtype) for _, _, fan_out in targets),
                             "weights": self._shared((R,), np.float32)}
            if plan.lora.lokr:
                specs["lora"] |= lokr_specs(plan.lora.lokr, self._shared, self.dtype)
        return specs

    def reference_kv_specs(self, plan: GeneratePlan) -> ReferenceKV:
        """Shapes and dtypes of the references' keys and values of a kv_cache plan (split over `data`)."""
        shapes = reference_kv_shapes(self.transformer_config, plan.batch, plan.ref_tokens, self.dtype)
        return jax.tree.map(lambda s: self._batched(s.shape, s.dtype), shapes)

    # ---------------------------------------------------------------------------------------------- running

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> jax.Array:
        """(B, T) token ids and mask -> text features (B, T, joint) in the pipeline dtype."""
        program = self.program(TextPlan(input_ids.shape[0]))
        return program(self._text_state, *_placed(program, 1, input_ids, attention_mask))

    def encode_references(self, images: np.ndarray, valid_hw: np.ndarray) -> jax.Array:
        """Padded references (B, H, W, 3) in [-1, 1] with valid (h, w) -> token slots (B, slot_tokens, C)."""
        program = self.program(ReferencePlan(images.shape[0], tuple(images.shape[1:3])))
        return program(self._vae_state, *_placed(program, 1, images, valid_hw))

    def generate(self, plan: GeneratePlan, inputs: dict[str, Any]) -> jax.Array:
        """Runs the fused program: float32 images (B, H, W, 3) in [0, 1]."""
        program = self.program(plan)
        return program((self._transformer_state, self._vae_state), *_placed(program, 1, inputs))

    def generate_stepwise(self, plan: GeneratePlan, inputs: dict[str, Any], on_step: Callable[[int, int], None],
                          timings: dict[str, float] | None = None) -> jax.Array:
        """The same images one Euler step per call, calling on_step(step, steps) after each; fills
        timings["denoise_ms"] and timings["decode_ms"] (compilation excluded) when given."""
        tokens = plan.grid[0] * plan.grid[1]
        noise_program = None if plan.external_noise else self.program(NoisePlan(plan.batch, tokens))
        step_program = self.program(StepPlan(plan))
        kv_program = self.program(KVCachePlan(plan)) if _caches_references(plan) else None
        decode_program = self.program(DecodePlan(plan.batch, plan.grid))
        start = time.perf_counter()
        if kv_program is not None:  # the references' keys and values, once for every step
            cache = kv_program(self._transformer_state, *_placed(kv_program, 1, _kv_cache_inputs(inputs)))
            inputs = {**inputs, "ref_kv": cache}
        (inputs,) = _placed(step_program, 3, inputs)  # placed once for every step
        if noise_program is None:  # a buffer of its own: the step program donates its latents
            latents = sharding.put(np.asarray(inputs["noise"]), sharding.batch_sharding(self.mesh, plan.batch))
        else:
            latents = noise_program(*_placed(noise_program, 0, inputs["key_data"]))
        for i in range(plan.steps):
            latents = step_program(self._transformer_state, latents, np.int32(i), inputs).block_until_ready()
            on_step(i + 1, plan.steps)
        middle = time.perf_counter()
        images = decode_program(self._vae_state, latents).block_until_ready()
        if timings is not None:
            timings["denoise_ms"] = 1000 * (middle - start)
            timings["decode_ms"] = 1000 * (time.perf_counter() - middle)
        return images

