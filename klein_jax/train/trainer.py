"""A LoRA training run on a KleinPipeline: cached text embeddings and latents, the jitted step, checkpoints,
metrics.jsonl, and the final adapter (klein-train-lora; docs/lora.md)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klein_jax import latents as latent_ops
from klein_jax.lora.apply import LoraLayout
from klein_jax.lora.registry import linear_targets
from klein_jax.train import checkpoint
from klein_jax.train.data import Example, epoch_batches, load_pixels, scan_dataset
from klein_jax.train.export import save_adapter
from klein_jax.train.step import (TrainConfig, flow_matching_loss, init_lora, learning_rate_schedule, optimizer,
                                  select_targets, train_step)

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """One line of metrics.jsonl."""

    step: int
    loss: float
    learning_rate: float
    grad_norm: float
    seconds: float


class LoraTrainer:
    """Trains LoRA factors on `pipe`'s transformer from a folder of captioned images; writes into `out`."""

    def __init__(self, pipe, data: str | pathlib.Path, out: str | pathlib.Path, config: TrainConfig,
                 references: str | pathlib.Path | None = None):
        """references: the folder of edit pairs' reference images (data/cat.png + cat.txt, references/cat.*)."""
        self.pipe, self.config, self.out = pipe, config, pathlib.Path(out)
        self.examples: list[Example] = scan_dataset(data, config.resolution, pipe.pixels_per_token, references)
        targets = select_targets(linear_targets(pipe.transformer), config.targets)
        if targets is None:
            raise ValueError(f"no linear layer of the transformer matches the targets {config.targets!r}")
        self.layout = LoraLayout(targets, config.rank)
        graphdef, self.base_state = nnx.split(pipe.transformer)
        self.tx = optimizer(config)
        kwargs = dict(graphdef=graphdef, layout=self.layout, scaling=config.scaling)
        self._step = jax.jit(functools.partial(train_step, tx=self.tx, **kwargs), donate_argnums=(0, 1))
        self._loss = jax.jit(functools.partial(flow_matching_loss, remat=False, **kwargs))
        self.schedule = learning_rate_schedule(config)
        self._text = self._encode_captions()
        self._latents = self._encode_images([e.image for e in self.examples])
        self._references = self._encode_images([e.reference for e in self.examples]) if references else None
        self.batches_per_epoch = len(epoch_batches(self.examples, config.batch_size, config.seed, 0))

    # ------------------------------------------------------------------------------------------- caches

    def _encode_captions(self) -> dict[str, np.ndarray]:
        """Text features (T, D) per distinct caption, computed once."""
        out = {}
        for caption in dict.fromkeys(e.caption for e in self.examples):
            ids, mask = self.pipe.tokenizer.encode([caption], max_length=self.pipe.text_length)
            out[caption] = np.asarray(self.pipe.sampler.encode_text(ids, mask), np.float32)[0]
        log.info("encoded %d captions", len(out))
        return out

    def _encode_images(self, images: list[pathlib.Path]) -> list[np.ndarray]:
        """Normalised packed latents (L, C) per image at its example's bucket: the VAE's mode, as diffusers'
        --cache_latents."""
        vae = self.pipe.vae
        graphdef, state = nnx.split(vae)
        ps = self.pipe.pixels_per_token

        @functools.partial(jax.jit, static_argnums=(2,))
        def encode(state, pixels, tokens):
            height, width = pixels.shape[1:3]
            return nnx.merge(graphdef, state).encode_reference_tokens(pixels, jnp.array([height, width]), tokens)

        latents = []
        for example, image in zip(self.examples, images, strict=True):
            width, height = example.bucket
            pixels = load_pixels(image, example.bucket)[None].astype(vae.encoder.conv_in.kernel[...].dtype)
            latents.append(np.asarray(encode(state, pixels, (height // ps) * (width // ps)), np.float32)[0])
        log.info("encoded %d images", len(latents))
        return latents

    def batch(self, indices) -> dict:
        """The inputs of one step: latents (B, L, C), text features (B, T, D), position ids; with edit pairs the
        references' latents (B, L, C) and ids (t = 10, _prepare_image_ids)."""
        width, height = self.examples[indices[0]].bucket
        grid = (height // self.pipe.pixels_per_token, width // self.pipe.pixels_per_token)
        batch = {"latents": np.stack([self._latents[i] for i in indices]),
                 "text_embeds": np.stack([self._text[self.examples[i].caption] for i in indices]),
                 "img_ids": latent_ops.latent_ids(*grid), "txt_ids": latent_ops.text_ids(self.pipe.text_length)}
        if self._references is not None:
            batch |= {"ref_latents": np.stack([self._references[i] for i in indices]),
                      "ref_ids": latent_ops.image_ids([grid])}
        return batch

    # --------------------------------------------------------------------------------------------- running

    def step_key(self, step: int) -> jax.Array:
        """The noise and timestep key of step `step` (0-based): a resumed run draws the same."""
        return jax.random.fold_in(jax.random.key(self.config.seed), step)

    def loss(self, lora, indices, key) -> float:
        """The loss of `lora` on the batch `indices` with `key` (no update)."""
        return float(self._loss(lora, self.base_state, self.batch(indices), key))

    def initial_state(self) -> tuple[dict, object]:
        lora = init_lora(self.layout.targets, self.config.rank, jax.random.key(self.config.seed + 1))
        return lora, self.tx.init(lora)

    def run(self, *, resume: bool = False, on_step: Callable[[StepMetrics], None] | None = None,
            stop_after: int | None = None) -> pathlib.Path | None:
        """Trains to config.steps (from the newest checkpoint with resume); returns the adapter file.

        stop_after: checkpoint and return None after this step (a run to be resumed later).
        """
        lora, opt_state = self.initial_state()
        start = 0
        if resume:
            start = checkpoint.latest_step(self.out) or 0
            if start:
                order = epoch_batches(self.examples, self.config.batch_size, self.config.seed,
                                      (start - 1) // self.batches_per_epoch)  # the epoch of the last step done
                lora, opt_state, saved = checkpoint.restore_checkpoint(self.out, start, lora, opt_state, order)
                if not np.array_equal(saved, order):
                    raise ValueError("the checkpoint's data order differs from this data folder's: the images, "
                                     "captions, batch size or seed changed since it was written")
                log.info("resumed from step %d", start)
        self._trim_metrics(start)
        for step in range(start, self.config.steps):
            order = epoch_batches(self.examples, self.config.batch_size, self.config.seed,
                                  step // self.batches_per_epoch)
            began = time.perf_counter()
            lora, opt_state, loss, grad_norm = self._step(lora, opt_state, self.base_state,
                                                          self.batch(order[step % self.batches_per_epoch]),
                                                          self.step_key(step))
            metrics = StepMetrics(step + 1, float(loss), float(self.schedule(step)), float(grad_norm),
                                  time.perf_counter() - began)
            self._write_metrics(metrics)
            if on_step is not None:
                on_step(metrics)
            last = step + 1 in (self.config.steps, stop_after)
            if (step + 1) % self.config.checkpoint_every == 0 or last:
                checkpoint.save_checkpoint(self.out, step + 1, lora, opt_state, order)
            if step + 1 == stop_after:
                self.lora = lora
                return None
        self.lora = lora
        return save_adapter(self.out, lora, self.layout, rank=self.config.rank,
                            lora_alpha=self.config.scaling * self.config.rank)

    def _trim_metrics(self, last_step: int) -> None:
        """Keeps the metrics of steps <= last_step (a resumed run rewrites the ones after its checkpoint)."""
        path = self.out / METRICS
        self.out.mkdir(parents=True, exist_ok=True)
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))

    def _write_metrics(self, metrics: StepMetrics) -> None:
        with (self.out / METRICS).open("a", encoding="utf-8") as f:
            f.write(json.dumps(dataclasses.asdict(metrics)) + "\n")
