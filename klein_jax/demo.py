"""The demo model: a tiny KleinPipeline with random weights, built in memory (no torch, no files, no download).

It runs the whole pipeline contract (every workflow, size and seed) and produces noise images. The transformer and
text encoder are TINY_TRANSFORMER / TINY_TEXT_ENCODER; the VAE is DEMO_VAE: TINY_VAE with 4 levels so that a
transformer token covers 16x16 pixels as in the real model (TINY_VAE's 4x4 tokens would put 64k tokens in a
1024x1024 image), 8 channels, one resnet per level and no mid-block attention (a 16k-token attention per image is
too slow on a CPU), so that its programs compile in seconds.
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np
from flax import nnx

from klein_jax.buckets import ReferenceBuckets
from klein_jax.configs import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE
from klein_jax.models.text_encoder import Qwen3TextEncoder
from klein_jax.models.transformer import Flux2Transformer
from klein_jax.models.vae import Flux2VAE
from klein_jax.pipeline import KleinPipeline
from klein_jax.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

DEMO_NAME = "flux2-klein-demo"
DEMO_VAE = dataclasses.replace(
    TINY_VAE,
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=4,
    layers_per_block=0,
    mid_block_add_attention=False,
)
# Small references (the usual test images) get small buckets: on a CPU the tiny model's cost is attention over
# the padded sequence. Large ones use the real model's buckets (a 1024x1024 reference is 4096 tokens).
DEMO_REFERENCE_BUCKETS = ReferenceBuckets(grid_areas=(64, 4096), token_buckets=(256, 4096, 16384))


def random_module(cls, config, rng: np.random.Generator):
    """cls(config) in float32 with random host-drawn weights: kernels N(0, 1/fan_in), embeddings N(0, 1), norm
    scales and BN variances 1, biases and BN means 0. Built abstractly, so no initialiser is compiled."""
    abstract = nnx.eval_shape(lambda: cls(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    for path, variable in flat:
        shape, name = variable.value.shape, str(path[-1])
        if name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "embedding":
            value = rng.standard_normal(shape)
        elif name in ("scale", "running_var"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        variable.set_value(jnp.asarray(value.astype(np.float32)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def build_demo_pipeline(seed: int = 0, **kwargs) -> KleinPipeline:
    """A distilled (4-step) float32 KleinPipeline with random weights; keyword arguments go to KleinPipeline."""
    rng = np.random.default_rng(seed)
    transformer = random_module(Flux2Transformer, TINY_TRANSFORMER, rng)
    vae = random_module(Flux2VAE, DEMO_VAE, rng)
    text_encoder = random_module(Qwen3TextEncoder, TINY_TEXT_ENCODER, rng)
    tokenizer = PromptTokenizer.demo(TINY_TEXT_ENCODER.vocab_size)
    log.info("built the demo model (random weights, seed %d): its images are noise", seed)
    kwargs.setdefault("reference_buckets", DEMO_REFERENCE_BUCKETS)
    return KleinPipeline(transformer, vae, text_encoder, tokenizer, is_distilled=True, dtype=jnp.float32,
                         name=DEMO_NAME, is_demo=True, **kwargs)
