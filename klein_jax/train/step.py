"""The training step: flow matching on the transformer with LoRA factors as the only trained parameters.

As diffusers' examples/dreambooth/train_dreambooth_lora_flux2_klein.py: latents are the VAE's mode, patchified and
batch-norm normalised; u ~ U(0, 1) gives index floor(1000 u) into the scheduler's unshifted training timesteps
(1000 .. 1), so sigma = (1000 - index) / 1000 (weighting scheme "none": no loss weighting); the noisy input is
(1 - sigma) x + sigma noise, the target noise - x, the loss the mean squared error in float32. The factors are
float32 (peft's "gaussian" init: lora_A ~ N(0, 1/r), lora_B = 0), cast to the base model's dtype in the matmuls;
each transformer block is rematerialised in the backward pass (jax.checkpoint), so activations are kept per block
boundary only. AdamW (optax) with global-norm clipping and a linear warm-up then cosine decay.
Edit pairs (..._klein_img2img.py): the reference's latents (normalised as the target's, not noised) follow the
noisy target tokens with their own ids (t = 10); the prediction is cut back to the target tokens for the loss.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from klein_jax.lora.apply import LoraLayout, apply_lora

NUM_TRAIN_TIMESTEPS = 1000
# diffusers' klein script default: the double blocks' image attention and the whole single blocks.
DEFAULT_TARGETS = (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out)"
                   r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of klein-train-lora (defaults: diffusers' klein script where it has one)."""

    rank: int = 16
    lora_alpha: float | None = None  # None: = rank (scaling 1)
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    steps: int = 1000
    batch_size: int = 1
    resolution: int = 1024
    seed: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-4
    targets: str = DEFAULT_TARGETS
    checkpoint_every: int = 250

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size", "resolution", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        if not self.learning_rate > 0 or self.warmup_steps < 0:
            raise ValueError(f"learning-rate={self.learning_rate} must be > 0 and warmup-steps >= 0")

    @property
    def scaling(self) -> float:
        """peft's lora_alpha / r."""
        return (self.rank if self.lora_alpha is None else self.lora_alpha) / self.rank


def select_targets(targets: dict[str, tuple[int, int]], pattern: str) -> LoraLayout | None:
    """The layout of the layers whose path fully matches `pattern` (None when none does)."""
    chosen = tuple((path, *shape) for path, shape in targets.items() if re.fullmatch(pattern, path))
    return chosen or None


def init_lora(layout_targets, rank: int, key: jax.Array) -> dict:
    """{"down": (in, r) ~ N(0, 1/r), "up": (r, out) zeros} per target, float32 (peft init_lora_weights="gaussian")."""
    keys = jax.random.split(key, len(layout_targets))
    return {"down": tuple(jax.random.normal(k, (fan_in, rank), jnp.float32) / rank
                          for k, (_, fan_in, _) in zip(keys, layout_targets)),
            "up": tuple(jnp.zeros((rank, fan_out), jnp.float32) for _, _, fan_out in layout_targets)}


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on a warm-up + cosine schedule."""
    schedule = learning_rate_schedule(config)
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay))


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    warmup = min(config.warmup_steps, config.steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else config.learning_rate, config.learning_rate,
                                              warmup, config.steps, end_value=0.0)


class _Remat:
    """A transformer block recomputed in the backward pass (gradient checkpointing)."""

    def __init__(self, block):
        self.block = block

    def __call__(self, *args):
        return jax.checkpoint(lambda *a: self.block(*a))(*args)


def _model(graphdef, base_state, lora: dict, layout: LoraLayout, scaling: float, remat: bool):
    transformer = nnx.merge(graphdef, base_state)
    apply_lora(transformer, layout, {"down": lora["down"], "up": tuple(u * scaling for u in lora["up"]),
                                     "weights": jnp.ones((layout.rank,), jnp.float32)})
    if remat:
        for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
            for i in range(len(blocks)):
                blocks[i] = _Remat(blocks[i])
    return transformer


def flow_matching_loss(lora: dict, base_state, batch: dict, key: jax.Array, *, graphdef, layout: LoraLayout,
                       scaling: float, remat: bool = True) -> jax.Array:
    """Mean squared error of the velocity on one batch; `key` draws the noise and the timesteps."""
    transformer = _model(graphdef, base_state, lora, layout, scaling, remat)
    latents = batch["latents"]  # (B, L, C) float32, normalised
    noise_key, time_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
    index = jnp.floor(jax.random.uniform(time_key, (latents.shape[0],)) * NUM_TRAIN_TIMESTEPS)
    sigma = (NUM_TRAIN_TIMESTEPS - index) / NUM_TRAIN_TIMESTEPS  # (B,)
    noisy = (1.0 - sigma[:, None, None]) * latents + sigma[:, None, None] * noise
    x, img_ids = noisy, batch["img_ids"]
    if "ref_latents" in batch:  # (B, R, C): target tokens first, then the reference's
        x = jnp.concatenate([noisy, batch["ref_latents"]], axis=1)
        img_ids = jnp.concatenate([img_ids, batch["ref_ids"]], axis=0)
    dtype = transformer.dtype
    prediction = transformer(x.astype(dtype), batch["text_embeds"].astype(dtype), sigma.astype(dtype),
                             img_ids, batch["txt_ids"])[:, :latents.shape[1]]
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - (noise - latents)))


def train_step(lora, opt_state, base_state, batch, key, *, graphdef, layout, scaling, tx, remat: bool = True):
    """One AdamW update; returns (lora, opt_state, loss, gradient norm before clipping)."""
    loss, grads = jax.value_and_grad(flow_matching_loss)(lora, base_state, batch, key, graphdef=graphdef,
                                                         layout=layout, scaling=scaling, remat=remat)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss, optax.global_norm(grads)
