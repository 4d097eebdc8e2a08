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

from klein_jax.buckets import ReferenceBuckets
from klein_jax.configs import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE
from klein_jax.loading import random_module
from klein_jax.pipeline import KleinPipeline
from klein_jax.demo_tokenizer import demo_prompt_tokenizer

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


def build_demo_pipeline(seed: int = 0, **kwargs) -> KleinPipeline:
    """A distilled (4-step) float32 KleinPipeline with random weights; keyword arguments go to KleinPipeline."""
    rng = np.random.default_rng(seed)
    transformer = random_module("transformer", TINY_TRANSFORMER, rng)
    vae = random_module("vae", DEMO_VAE, rng)
    text_encoder = random_module("text_encoder", TINY_TEXT_ENCODER, rng)
    tokenizer = demo_prompt_tokenizer(TINY_TEXT_ENCODER.vocab_size)
    log.info("built the demo model (random weights, seed %d): its images are noise", seed)
    kwargs.setdefault("reference_buckets", DEMO_REFERENCE_BUCKETS)
    return KleinPipeline(transformer, vae, text_encoder, tokenizer, is_distilled=True, dtype=jnp.float32,
                         name=DEMO_NAME, is_demo=True, **kwargs)
