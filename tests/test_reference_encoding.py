"""References padded to bucket shapes encode exactly as at their own shape: the masked VAE blocks
(klein_jax/models/vae_blocks.py), Flux2VAE.encode_reference_tokens, and reference tokens padded at the end of the
transformer's sequence. Float32 on CPU."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from flax import nnx
from tiny_pipeline import tiny_vae

from conftest import assert_close
from klein_jax import latents as latent_ops
from klein_jax.configs import TINY_TRANSFORMER, TINY_VAE
from klein_jax.loading import load_component, random_module
from klein_jax.models.vae_blocks import Attention, Downsample2D, GroupNorm, ResnetBlock2D

REL = 1e-5  # the VAE parity tolerance (tests/test_vae.py)
# 4 levels as the real VAE (16 pixels a token, 8 a latent pixel), mid-block attention on, 8 GroupNorm groups.
VAE_CONFIG = dataclasses.replace(TINY_VAE, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4)
PIXELS_PER_TOKEN = 16
SLOT_TOKENS = 100
# bucket grid (rows, cols) in tokens -> reference grids it holds, odd sizes, one of each orientation
CASES = {(8, 8): [(5, 7), (1, 3)], (6, 12): [(3, 11), (5, 2)], (13, 4): [(9, 3), (13, 1)]}


@pytest.fixture(scope="module")
def vaes():
    """(diffusers AutoencoderKLFlux2 with random weights and BN statistics, ours loaded from its state dict)."""
    assert VAE_CONFIG.mid_block_add_attention
    ref = tiny_vae(VAE_CONFIG)
    ours = load_component("vae", VAE_CONFIG, {k: v.numpy() for k, v in ref.state_dict().items()}, jnp.float32)
    return ref, ours


def _diffusers_tokens(ref, images: np.ndarray) -> np.ndarray:
    """Flux2KleinPipeline._encode_vae_image + _pack_latents: (B, H, W, 3) -> (B, H/16 * W/16, 128)."""
    fake_pipe = types.SimpleNamespace(vae=ref, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        latents = Flux2KleinPipeline._encode_vae_image(fake_pipe, torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                                       generator=None)
        return Flux2KleinPipeline._pack_latents(latents).numpy()


def _padded(images: np.ndarray, rows: int, cols: int, rng) -> np.ndarray:
    """Row 0 zero-padded (as the pipeline pads), every other row padded with noise the mask must ignore."""
    B, h, w, _ = images.shape
    out = rng.uniform(-3, 3, (B, rows, cols, 3)).astype(np.float32)
    out[0] = 0
    out[:, :h, :w] = images
    return out


@pytest.mark.parametrize("bucket", list(CASES), ids=lambda g: f"bucket{g[0]}x{g[1]}")
def test_padded_reference_tokens_equal_unpadded_and_diffusers(vaes, bucket):
    ref, ours = vaes
    encode = nnx.jit(lambda vae, x, valid: vae.encode_reference_tokens(x, valid, SLOT_TOKENS))
    unmasked = nnx.jit(lambda vae, x: vae.bn.normalize(latent_ops.patchify(vae.encode(x))))
    rng = np.random.default_rng(sum(bucket))
    H, W = bucket[0] * PIXELS_PER_TOKEN, bucket[1] * PIXELS_PER_TOKEN
    for rows, cols in CASES[bucket]:
        h, w, n = rows * PIXELS_PER_TOKEN, cols * PIXELS_PER_TOKEN, rows * cols
        images = rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
        padded = _padded(images, H, W, rng)
        got = np.asarray(encode(ours, padded, np.array([h, w], np.int32)))  # (2, SLOT_TOKENS, 128)
        assert not got[:, n:].any(), "slot rows past the valid tokens must be zero"
        unpadded = np.asarray(unmasked(ours, images)).reshape(2, n, -1)  # (B, h, w, C) -> (B, L, C), row-major
        assert_close(got[:, :n], unpadded, rel=REL, name=f"{rows}x{cols} in {bucket}: padded vs unpadded")
        assert_close(got[:, :n], _diffusers_tokens(ref, images), rel=REL, name=f"{rows}x{cols} vs diffusers")
        # without the mask the padding moves every token: the test above can see a masking bug
        plain = np.asarray(unmasked(ours, padded))[:, :rows, :cols].reshape(2, n, -1)
        for b in range(2):
            assert np.abs(plain[b] - unpadded[b]).max() > 1e-2 * np.abs(unpadded[b]).max()


def _crop_mask(rows: int, cols: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros((1, rows, cols, 1), bool)
    mask[:, :h, :w] = True
    return mask


@pytest.mark.parametrize("block", ["group_norm", "resnet", "downsample", "attention"])
def test_masked_block_on_padded_input_equals_block_on_crop(block):
    """Each block alone: valid outputs on a noise-padded input equal the block on the valid crop."""
    rngs = nnx.Rngs(0)
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    module = {
        "group_norm": lambda: GroupNorm(4, 8),
        "resnet": lambda: ResnetBlock2D(8, 16, 4, **kw),  # with a 1x1 conv_shortcut
        "downsample": lambda: Downsample2D(8, **kw),
        "attention": lambda: Attention(8, 4, **kw),
    }[block]()
    if block == "group_norm":
        module.scale[...] = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, 8), jnp.float32)
        module.bias[...] = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, 8), jnp.float32)
    rng = np.random.default_rng(3)
    h, w, H, W = 6, 4, 10, 9
    padded = rng.standard_normal((2, H, W, 8)).astype(np.float32)
    padded[:, h:] = padded[:, :, w:] = 50.0  # far from the valid values, so that a leak shows
    crop = padded[:, :h, :w]
    want = np.asarray(module(jnp.asarray(crop)))
    got = np.asarray(module(jnp.asarray(padded), jnp.asarray(_crop_mask(H, W, h, w))))
    got = got[:, : want.shape[1], : want.shape[2]]
    assert_close(got, want, rel=REL, name=block)


def test_padded_references_equal_unpadded():
    """Reference tokens padded at the end of the sequence and masked as keys change no valid output."""
    rng = np.random.default_rng(0)
    graph, state = nnx.split(random_module("transformer", TINY_TRANSFORMER, rng))
    run = jax.jit(lambda state, *args, **kwargs: nnx.merge(graph, state)(*args, **kwargs))
    T, L, R, P = 9, 12, 10, 7  # text, target (3x4), reference (2x5), padding
    x = rng.standard_normal((2, L + R, 128)).astype(np.float32)
    text = rng.standard_normal((2, T, TINY_TRANSFORMER.joint_attention_dim)).astype(np.float32)
    ids = np.concatenate([latent_ops.latent_ids(3, 4), latent_ops.image_ids([(2, 5)])])
    sigma = np.float32([0.5, 0.9])
    want = np.asarray(run(state, x, text, sigma, ids, latent_ops.text_ids(T)))
    padded_x = np.concatenate([x, 100 * rng.standard_normal((2, P, 128)).astype(np.float32)], axis=1)
    padded_ids = np.concatenate([ids, rng.integers(0, 50, (P, 4)).astype(np.int32)])
    got = np.asarray(run(state, padded_x, text, sigma, padded_ids, latent_ops.text_ids(T),
                         kv_lengths=np.full((2,), T + L + R, np.int32)))[:, : L + R]
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    unmasked = np.asarray(run(state, padded_x, text, sigma, padded_ids, latent_ops.text_ids(T)))[:, : L + R]
    assert np.abs(unmasked - want).max() > 1e-2 * np.abs(want).max()  # the mask is what makes them equal
