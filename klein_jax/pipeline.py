"""KleinPipeline: FLUX.2 [klein] text-to-image, image-to-image and multi-reference generation (port of
Flux2KleinPipeline).

Host work (validation with klein_jax/request.py, tokenizing, reference preprocessing with PIL, schedules, seeds)
happens in `prepare`; device work runs in the ahead-of-time compiled programs of klein_jax/sampler.py. `__call__` is
prepare + run for a list of prompts; `prepare` / `run_batch` / `compile` are the batch API the server uses (a request
stream on warmed-up shapes compiles nothing).

Differences from diffusers, by design: distilled checkpoints default to 4 steps (diffusers: 50 for every klein);
N prompts with references give N images each conditioned on the same references, and an image's noise comes from
its own seed so that batching does not change it. With `latents=` the results match diffusers' (klein.md §5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from klein_jax import images as image_ops
from klein_jax import latents as latent_ops
from klein_jax import sharding
from klein_jax.buckets import ReferenceBuckets
from klein_jax.configs import Variant
from klein_jax.loading import load_components
from klein_jax.models.attention import check_attention, set_attention
from klein_jax.lora import Combination, LoraAdapters, linear_targets
from klein_jax.quantization import check_quantization, quantize_module
from klein_jax.request import (ASPECT_RATIOS, MAX_REFERENCES, Workflow, check_guidance_scale, check_prompt,
                               check_seed, check_size, check_steps, resolve_aspect_ratio)
from klein_jax.sampler import GeneratePlan, ReferencePlan, Sampler, TextPlan, seed_key_data
from klein_jax.scheduler import Schedule, flow_match_schedule

log = logging.getLogger(__name__)

DISTILLED_STEPS = 4
BASE_STEPS = 50
BASE_GUIDANCE_SCALE = 4.0
OUTPUT_TYPES = ("pil", "np")


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedReference:
    """One preprocessed reference: pixels (h, w, 3) float32 in [-1, 1] and the padded bucket (height, width)."""

    pixels: np.ndarray
    bucket: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels after the area cap and crop."""
        return self.pixels.shape[0], self.pixels.shape[1]


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedRequest:
    """A validated request, ready for run_batch; requests with equal `batch_key` can share one batch."""

    prompt: str
    width: int
    height: int
    seed: int
    num_steps: int
    guidance_scale: float | None  # None: no classifier-free guidance
    references: tuple[PreparedReference, ...] = ()
    noise: np.ndarray | None = None  # (L, C) packed initial noise from `latents=`, in the pipeline dtype
    lora: Combination = ()  # (adapter name, weight) pairs (klein_jax/lora); () is no adapter

    @property
    def batch_key(self) -> tuple:
        """Everything that fixes the shapes and shared inputs of a batch's programs."""
        refs = tuple((r.size, r.bucket) for r in self.references)
        return (self.width, self.height, self.num_steps, self.guidance_scale, refs, self.noise is not None, self.lora)

    @property
    def workflow(self) -> Workflow:
        """text-to-image (no reference), image-to-image (1) or multi-reference (2-4)."""
        return Workflow.for_references(len(self.references))


@dataclasses.dataclass(frozen=True, eq=False)
class PendingBatch:
    """A batch that start_batch dispatched: its images still computing on the device (finish_batch waits)."""

    images: tuple[jax.Array, ...]  # (B, H, W, 3) float32 per chunk of at most the largest compiled batch
    counts: tuple[int, ...]  # requests per chunk; the rows after them are padding
    timings: dict[str, float]  # the last chunk's stages (last_timings once finished)


class KleinPipeline:
    """FLUX.2 [klein] generation with ahead-of-time compiled programs (shared/spec/interfaces.md)."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, *, is_distilled: bool, dtype=None,
                 name: str = "flux2-klein", is_demo: bool = False, reference_buckets: ReferenceBuckets | None = None,
                 kv_cache: bool = False, mesh: str | jax.sharding.Mesh | None = None,
                 quantization: str | None = None, attention: str | None = None):
        """kv_cache: klein-9B KV (Flux2KleinKVPipeline): reference keys/values computed once per image (klein_jax/kv.py).
        mesh: None (one device), "data=D,model=M" or a jax.sharding.Mesh with those axes (klein_jax/sharding.py).
        quantization: None, or "fp8": the transformer's block and modulation kernels stored as float8_e4m3fn with a
        scale per output channel, quantized in place (klein_jax/quantization.py).
        attention: None (the default per platform and dtype), "xla", "cudnn" or "pallas": the flow transformer's
        attention backend (klein_jax/models/attention.py)."""
        if kv_cache and not is_distilled:
            raise ValueError("kv_cache=True is the distilled klein-9B KV model; it cannot be a base model")
        self.tokenizer = tokenizer
        self.is_distilled = bool(is_distilled)
        self.kv_cache = bool(kv_cache)
        self.is_demo = bool(is_demo)
        self.name = name
        self.dtype = jnp.dtype(transformer.dtype if dtype is None else dtype)  # latents, text features, noise
        self.pixels_per_token = 2 * vae.config.spatial_scale  # 16: VAE /8, then 2x2 patches
        self.buckets = reference_buckets or ReferenceBuckets.default(self.pixels_per_token)
        self.text_length = text_encoder.config.max_sequence_length
        self.mesh = sharding.make_mesh(mesh)
        self.quantization = check_quantization(quantization)
        if attention is not None:
            set_attention(transformer, attention, self.dtype)
        transformer = quantize_module(transformer, "transformer", self.quantization)
        self.sampler = Sampler(transformer, vae, text_encoder, dtype=self.dtype, text_length=self.text_length,
                               slot_tokens=self.buckets.slot_tokens, mesh=self.mesh)
        self.lora = LoraAdapters(linear_targets(transformer), self.dtype,  # adapters: inputs, not weights
                                 placement=sharding.replicated(self.sampler.mesh))
        self._batch_sizes: set[int] = set()
        self._schedules: dict[tuple[int, int], Schedule] = {}
        self._negative_embeds: jax.Array | None = None
        self._zero_slots: dict[int, jax.Array] = {}
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, dtype: Any = "bfloat16", **kwargs) -> "KleinPipeline":
        """Loads a klein-convert folder, a diffusers pipeline folder or a hub id (klein_jax/loading); with `mesh=`
        every parameter is placed shard by shard straight from the checkpoint; with `quantization="fp8"` the
        transformer is quantized after loading."""
        check_quantization(kwargs.get("quantization"))  # before a long load
        if kwargs.get("attention") is not None:
            check_attention(kwargs["attention"], dtype)
        mesh = sharding.make_mesh(kwargs.pop("mesh", None))
        components = load_components(source, dtype, mesh=mesh)
        return cls(components.transformer, components.vae, components.text_encoder, components.tokenizer,
                   is_distilled=components.is_distilled, kv_cache=components.variant is Variant.KV,
                   dtype=components.dtype, name=kwargs.pop("name", os.fspath(source)), mesh=mesh, **kwargs)

    # ------------------------------------------------------------------------------------------- properties

    @property
    def default_steps(self) -> int:
        """4 for distilled checkpoints, 50 for base ones."""
        return DISTILLED_STEPS if self.is_distilled else BASE_STEPS

    @property
    def transformer(self):
        """The Flux2Transformer module (a view of the sampler's state: it shares the arrays)."""
        return self.sampler.module("transformer")

    @property
    def vae(self):
        """The Flux2VAE module (a view of the sampler's state)."""
        return self.sampler.module("vae")

    @property
    def text_encoder(self):
        """The Qwen3TextEncoder module (a view of the sampler's state)."""
        return self.sampler.module("text_encoder")

    @property
    def compile_count(self) -> int:
        """Programs compiled so far by this pipeline."""
        return self.sampler.compile_count

    @property
    def variant(self) -> Variant:
        """distilled, base or kv (shared/spec/interfaces.md, "Model variants")."""
        if self.kv_cache:
            return Variant.KV
        return Variant.DISTILLED if self.is_distilled else Variant.BASE

    @property
    def model_info(self) -> dict[str, Any]:
        """name, dtype, variant, is_distilled, steps (default), guidance_scale (default), is_demo, mesh."""
        return {"name": self.name, "dtype": self.dtype.name, "variant": self.variant.value,
                "is_distilled": self.is_distilled,
                "steps": self.default_steps, "guidance_scale": None if self.is_distilled else BASE_GUIDANCE_SCALE,
                "is_demo": self.is_demo, "mesh": sharding.mesh_sizes(self.mesh)}

    @property
    def batch_multiple(self) -> int:
        """The data axis: every batch is padded to a multiple of it, so a batcher should fill batches so."""
        return sharding.mesh_sizes(self.mesh)[sharding.DATA]

    # ---------------------------------------------------------------------------------- LoRA (klein_jax/lora)

    def load_lora_weights(self, source: str | os.PathLike, adapter_name: str | None = None, *,
                          weight_name: str | None = None) -> str:
        """Loads a LoRA adapter (.safetensors file, folder or hub id; diffusers/PEFT, kohya or BFL names) and makes
        it the active one at weight 1, as diffusers does; returns its name (default: default_<n>)."""
        return self.lora.load(source, adapter_name, weight_name=weight_name)

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """The adapters __call__ and prepare (without lora=) apply, weighted (diffusers' set_adapters); [] for none."""
        self.lora.set_active(adapter_names, adapter_weights)

    def unload_lora_weights(self) -> None:
        """Forgets every adapter."""
        self.lora.unload()

    # ------------------------------------------------------------------------------------------- validation

    def _check_size(self, width, height) -> tuple[int, int]:
        return check_size(width, height, multiple_of=self.pixels_per_token)

    def _resolve_steps(self, steps) -> int:
        return self.default_steps if steps is None else check_steps(steps)

    def _resolve_guidance(self, guidance_scale) -> float | None:
        guidance_scale = check_guidance_scale(guidance_scale)
        if self.is_distilled:
            if guidance_scale is not None and guidance_scale > 1:
                log.warning("guidance_scale %s is ignored for step-wise distilled models", guidance_scale)
            return None
        scale = BASE_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        return scale if scale > 1 else None  # diffusers: CFG iff guidance_scale > 1 and not is_distilled

    def _prepare_references(self, images) -> tuple[PreparedReference, ...]:
        if images is None:
            return ()
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if not isinstance(images, Sequence):
            raise ValueError(f"images must be a list of PIL images, got {type(images).__name__}")
        pixels = image_ops.preprocess_references(images, multiple_of=self.pixels_per_token)
        return tuple(PreparedReference(p, self._reference_bucket(k, p.shape[0], p.shape[1]))
                     for k, p in enumerate(pixels))

    def _usable_grids(self) -> list[tuple[int, int]]:
        """Grid buckets a reference can land in: both sides at least check_image_input's 64 pixels."""
        least = image_ops.MIN_SIDE // self.pixels_per_token
        return [g for g in self.buckets.grids if min(g) >= least]

    def _reference_bucket(self, index: int, height: int, width: int) -> tuple[int, int]:
        ps = self.pixels_per_token
        grid = self.buckets.grid_for(height // ps, width // ps)
        if grid is None:  # outside every bucket: a program for its own shape (compiled on first use)
            if (height // ps) * (width // ps) > self.buckets.slot_tokens:
                raise ValueError(f"reference image {index} has {(height // ps) * (width // ps)} tokens after "
                                 f"preprocessing; this pipeline's reference buckets hold {self.buckets.slot_tokens}")
            log.warning("reference image %d (%dx%d) fits no reference bucket", index, width, height)
            return height, width
        return grid[0] * ps, grid[1] * ps

    # ------------------------------------------------------------------------------------------ batch API

    def prepare(self, prompt: str, images: Sequence[PIL.Image.Image] = (), width: int = 1024, height: int = 1024,
                seed: int | None = None, *, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, lora: str | None = None,
                lora_scale: float | None = None) -> PreparedRequest:
        """Validates a request on the host and preprocesses its references; raises ValueError on bad input.

        lora: one loaded adapter's name, at lora_scale (default 1.0); None: the adapters set_adapters chose.
        """
        return self._prepare(prompt, self._prepare_references(images), width, height, seed, num_inference_steps,
                             guidance_scale, lora=self.lora.choose(lora, lora_scale))

    def _prepare(self, prompt, references, width, height, seed, steps, guidance_scale, noise=None,
                 lora: Combination = ()) -> PreparedRequest:
        prompt = check_prompt(prompt)
        width, height = self._check_size(width, height)
        seed = secrets.randbelow(2**32) if seed is None else check_seed(seed)
        return PreparedRequest(prompt=prompt, width=width, height=height, seed=seed,
                               num_steps=self._resolve_steps(steps),
                               guidance_scale=self._resolve_guidance(guidance_scale),
                               references=tuple(references), noise=noise, lora=lora)

    def run_batch(self, prepared: Sequence[PreparedRequest]) -> list[PIL.Image.Image]:
        """One image per request (all with the same batch_key), padded to a compiled batch size."""
        return self.finish_batch(self.start_batch(prepared))

    def start_batch(self, prepared: Sequence[PreparedRequest]) -> PendingBatch:
        """run_batch's first half: the host inputs (tokens, references, seeds) built and the programs dispatched.
        Returns while the device still computes (JAX dispatch is asynchronous), so a server can prepare the next
        batch meanwhile; finish_batch waits for the images."""
        return self._dispatch(self._checked(prepared))

    def finish_batch(self, pending: PendingBatch) -> list[PIL.Image.Image]:
        """run_batch's second half: waits for the device; one image per request of start_batch."""
        return image_ops.numpy_to_pil(self._collect(pending))

    def compile(self, aspect_ratios: str | Sequence[str] = "all", max_references: int = MAX_REFERENCES,
                batch_sizes: Sequence[int] = (1,), *, sizes: Sequence[tuple[int, int]] = ()) -> int:
        """Compiles ahead of time every program those shapes need (default steps and guidance); returns how many.

        aspect_ratios: "all" or API aspect-ratio names; sizes: more (width, height) pairs in pixels. With LoRA
        adapters loaded, each generate program also compiles once for their layout (any one adapter per request).
        """
        names = list(ASPECT_RATIOS) if aspect_ratios == "all" else [aspect_ratios] if isinstance(
            aspect_ratios, str) else list(aspect_ratios)
        sizes = [resolve_aspect_ratio(n) for n in names] + [self._check_size(w, h) for w, h in sizes]
        if isinstance(max_references, bool) or not isinstance(max_references, int) or not (
                0 <= max_references <= MAX_REFERENCES):
            raise ValueError(f"max_references={max_references!r} must be an integer in 0..{MAX_REFERENCES}")
        batch_sizes = sorted(set(batch_sizes))
        if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes={batch_sizes!r} must be positive integers")
        batch_sizes = sorted({sharding.padded_batch(self.mesh, b) for b in batch_sizes})
        before, start = self.compile_count, time.perf_counter()
        guidance = self._resolve_guidance(None) is not None
        layouts = [None, *dict.fromkeys(self.lora.layout((n,)) for n in self.lora.names)]  # one adapter at a time
        plans = [TextPlan(1)] if guidance else []
        for batch in batch_sizes:
            plans.append(TextPlan(batch))
            if max_references:
                plans += [ReferencePlan(batch, (r * self.pixels_per_token, c * self.pixels_per_token))
                          for r, c in self._usable_grids()]
            for width, height in sizes:
                grid = (height // self.pixels_per_token, width // self.pixels_per_token)
                plans += [GeneratePlan(batch, grid, tokens, self.default_steps, guidance, external_noise=False,
                                       lora=layout, kv_cache=self.kv_cache and tokens > 0)
                          for tokens in self.buckets.token_buckets_for(max_references) for layout in layouts]
        for plan in plans:
            self.sampler.program(plan)
        self._batch_sizes.update(batch_sizes)
        if guidance:
            self._negative()
        count = self.compile_count - before
        log.info("compile: %d programs for %s, up to %d references, batch sizes %s in %.1f s", count,
                 ", ".join(f"{w}x{h}" for w, h in sizes), max_references, batch_sizes, time.perf_counter() - start)
        return count

    # ---------------------------------------------------------------------------------------------- __call__

    def __call__(self, prompt: str | Sequence[str], images: Sequence[PIL.Image.Image] | None = None,
                 width: int = 1024, height: int = 1024, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | Sequence[int] | None = None,
                 latents: np.ndarray | None = None, output_type: str = "pil",
                 on_step: Callable[[int, int], None] | None = None):
        """Generates one image per prompt: a list of PIL images, or float32 (B, H, W, 3) in [0, 1] for "np".

        seed: one int per prompt, or one int s (prompt i gets s + i), or None (random). latents: initial noise in
        diffusers' layout (B, 128, H/16, W/16). on_step(step, steps): runs the loop one compiled step at a time.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else None
        if not prompts:
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        prompts = [check_prompt(p) for p in prompts]
        width, height = self._check_size(width, height)
        seeds = self._seeds(seed, len(prompts))
        noise = self._noise_from_latents(latents, len(prompts), width, height)
        references = self._prepare_references(images)
        prepared = [self._prepare(p, references, width, height, s, num_inference_steps, guidance_scale,
                                  None if noise is None else noise[i], self.lora.active)
                    for i, (p, s) in enumerate(zip(prompts, seeds))]
        images_np = self._run(prepared, on_step=on_step)
        return images_np if output_type == "np" else image_ops.numpy_to_pil(images_np)

    def _seeds(self, seed, count: int) -> list[int | None]:
        if seed is None:
            return [None] * count
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return [check_seed(seed + i) for i in range(count)]
        if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
            raise ValueError(f"seed={seed!r} must be an int or a list of ints, one per prompt")
        seeds = list(seed)
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds given for {count} prompts; give one per prompt")
        return [check_seed(s) for s in seeds]

    def _noise_from_latents(self, latents, count: int, width: int, height: int) -> np.ndarray | None:
        """diffusers-layout noise (B, C, h, w) -> packed (B, h*w, C) in the pipeline dtype (prepare_latents)."""
        if latents is None:
            return None
        latents = np.asarray(latents)
        shape = (count, self.sampler.channels, height // self.pixels_per_token, width // self.pixels_per_token)
        if latents.shape != shape:
            raise ValueError(f"latents shape {latents.shape} != {shape} (B, C, H/{self.pixels_per_token}, "
                             f"W/{self.pixels_per_token}) for {count} prompts at {width}x{height}")
        packed = latents.astype(np.float32).transpose(0, 2, 3, 1).reshape(count, -1, shape[1])  # (B, h*w, C)
        return packed.astype(self.dtype)  # diffusers: latents.to(dtype=prompt_embeds.dtype)

    # ----------------------------------------------------------------------------------------------- running

    def _batch_size(self, count: int) -> int:
        fitting = [b for b in self._batch_sizes if b >= count]
        return min(fitting) if fitting else sharding.padded_batch(self.mesh, count)

    def _checked(self, prepared: Sequence[PreparedRequest]) -> list[PreparedRequest]:
        prepared = list(prepared)
        if not prepared:
            raise ValueError("run_batch needs at least one prepared request")
        keys = {p.batch_key for p in prepared}
        if len(keys) > 1:
            raise ValueError(f"requests in one batch must share a batch_key; got {len(keys)} different keys")
        return prepared

    def _chunks(self, prepared: list[PreparedRequest]) -> list[list[PreparedRequest]]:
        """More requests than the largest compiled batch run in chunks of it."""
        largest = max(self._batch_sizes, default=len(prepared))
        return [prepared[i:i + largest] for i in range(0, len(prepared), largest)]

    def _padded_inputs(self, chunk: list[PreparedRequest], timings: dict[str, float]) -> tuple[GeneratePlan, dict]:
        timings["batch_size"] = batch = self._batch_size(len(chunk))
        rows = chunk + [chunk[0]] * (batch - len(chunk))  # padding rows repeat the first request
        return self._inputs(rows, timings)

    def _dispatch(self, prepared: list[PreparedRequest]) -> PendingBatch:
        images, counts, timings = [], [], {}
        for chunk in self._chunks(prepared):
            timings = {}
            plan, inputs = self._padded_inputs(chunk, timings)
            with self._stage(timings, "denoise_decode_ms"):  # the dispatch here, the wait in _collect
                images.append(self.sampler.generate(plan, inputs))
            counts.append(len(chunk))
        return PendingBatch(tuple(images), tuple(counts), timings)

    def _collect(self, pending: PendingBatch) -> np.ndarray:
        with self._stage(pending.timings, "denoise_decode_ms"):
            images = [sharding.to_host(chunk)[:count] for chunk, count in zip(pending.images, pending.counts)]
        self.last_timings = pending.timings
        return np.concatenate(images)

    def _run(self, prepared: Sequence[PreparedRequest], on_step=None) -> np.ndarray:
        prepared = self._checked(prepared)
        if on_step is None:
            return self._collect(self._dispatch(prepared))
        images = []
        for chunk in self._chunks(prepared):
            timings: dict[str, float] = {}
            plan, inputs = self._padded_inputs(chunk, timings)
            with self._stage(timings, "denoise_decode_ms"):
                images.append(sharding.to_host(self.sampler.generate_stepwise(plan, inputs, on_step, timings)))
            images[-1] = images[-1][: len(chunk)]
            self.last_timings = timings
        return np.concatenate(images)

    @contextlib.contextmanager
    def _stage(self, timings: dict[str, float], name: str):
        """Adds a stage's time to timings[name] (ms), without the compilation inside it (added to compile_ms)."""
        start, compiled = time.perf_counter(), self.sampler.compile_seconds
        yield
        compile_s = self.sampler.compile_seconds - compiled
        timings[name] = timings.get(name, 0.0) + 1000 * (time.perf_counter() - start - compile_s)
        if compile_s:
            timings["compile_ms"] = timings.get("compile_ms", 0.0) + 1000 * compile_s

    def _inputs(self, rows: list[PreparedRequest], timings: dict[str, float]) -> tuple[GeneratePlan, dict]:
        first = rows[0]
        ps = self.pixels_per_token
        grid = (first.height // ps, first.width // ps)
        schedule = self._schedule(grid[0] * grid[1], first.num_steps)
        with self._stage(timings, "text_encode_ms"):
            input_ids, attention_mask = self.tokenizer.encode([r.prompt for r in rows], max_length=self.text_length)
            inputs: dict[str, Any] = {
                "text_embeds": self.sampler.encode_text(input_ids, attention_mask).block_until_ready(),
                "text_ids": latent_ops.text_ids(self.text_length),
                "target_ids": latent_ops.latent_ids(*grid),
                "sigmas": schedule.sigmas,
                "timesteps": schedule.timesteps,
            }
        if first.noise is not None:
            inputs["noise"] = np.stack([r.noise for r in rows])
        else:
            inputs["key_data"] = np.stack([seed_key_data(r.seed) for r in rows])
        if first.guidance_scale is not None:
            with self._stage(timings, "text_encode_ms"):
                inputs["negative_embeds"] = self._negative()  # computed once per pipeline
            inputs["guidance_scale"] = np.float32(first.guidance_scale)
        ref_tokens = 0
        if first.references:
            with self._stage(timings, "reference_encode_ms"):
                ref_tokens = self._reference_inputs(rows, inputs)
        layout = None
        if first.lora:
            layout, inputs["lora"] = self.lora.inputs(first.lora)
        plan = GeneratePlan(len(rows), grid, ref_tokens, first.num_steps, first.guidance_scale is not None,
                            external_noise=first.noise is not None, lora=layout,
                            kv_cache=self.kv_cache and ref_tokens > 0)
        return plan, inputs

    def _reference_inputs(self, rows: list[PreparedRequest], inputs: dict) -> int:
        """Encodes each reference slot over the batch; fills ref_slots/index/ids/count; returns the token bucket."""
        ps, S = self.pixels_per_token, self.sampler.slot_tokens
        slots, index, grids = [], [], []
        for k, ref in enumerate(rows[0].references):
            height, width = ref.bucket
            padded = np.zeros((len(rows), height, width, 3), np.float32)
            for b, row in enumerate(rows):
                h, w = row.references[k].size
                padded[b, :h, :w] = row.references[k].pixels
            h, w = ref.size
            slots.append(self.sampler.encode_references(padded, np.array([h, w], np.int32)))
            index.append(k * S + np.arange((h // ps) * (w // ps), dtype=np.int32))
            grids.append((h // ps, w // ps))
        slots += [self._zero_slot(len(rows))] * (MAX_REFERENCES - len(slots))
        index = np.concatenate(index)
        count = index.shape[0]
        bucket = self.buckets.tokens_for(count)
        ids = latent_ops.image_ids(grids)  # (count, 4), t = 10, 20, ... per reference
        inputs["ref_slots"] = tuple(jax.block_until_ready(slots))
        inputs["ref_index"] = np.pad(index, (0, bucket - count))  # padding rows gather token 0; masked as keys
        inputs["ref_ids"] = np.pad(ids, ((0, bucket - count), (0, 0)))
        inputs["ref_count"] = np.int32(count)
        return bucket

    def _zero_slot(self, batch: int) -> jax.Array:
        if batch not in self._zero_slots:
            self._zero_slots[batch] = sharding.put(
                np.zeros((batch, self.sampler.slot_tokens, self.sampler.channels), self.dtype),
                sharding.batch_sharding(self.mesh, batch))
        return self._zero_slots[batch]

    def _schedule(self, tokens: int, steps: int) -> Schedule:
        key = (tokens, steps)
        if key not in self._schedules:
            self._schedules[key] = flow_match_schedule(tokens, steps)
        return self._schedules[key]

    def _negative(self) -> jax.Array:
        """Features (1, T, joint) of the empty negative prompt "" (computed once per pipeline)."""
        if self._negative_embeds is None:
            input_ids, attention_mask = self.tokenizer.encode([""], max_length=self.text_length)
            self._negative_embeds = self.sampler.encode_text(input_ids, attention_mask)
        return self._negative_embeds

