"""Flux2VAE (NHWC) against diffusers AutoencoderKLFlux2 and Flux2KleinPipeline's latent paths, float32 on CPU.

Padded references (masks in the blocks) are in tests/test_reference_encoding.py."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
from flax import nnx

from conftest import assert_close
from klein_jax.loading.keymaps.vae import vae_rules
from klein_jax.loading import WeightMappingError, expected_params, load_component
from klein_jax.loading.keymap import map_weights
from klein_jax.loading.safetensors import ShardedCheckpoint
from klein_jax import latents as L
from klein_jax.configs import FLUX2_VAE, VAEConfig
from klein_jax.models.vae import Flux2VAE, LatentBatchNorm

REL = 1e-5

# Tiny diffusers configs with odd block counts; each key is a test id.
def _levels(n: int) -> dict:
    return dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


TINY_CONFIGS = {
    # 2 levels (factor 2), 1 resnet per encoder level (2 per decoder level), GroupNorm of 4 groups
    "levels2_lpb1_g4": dict(**_levels(2), block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                            latent_channels=4),
    # 3 levels (factor 4), 3 (4) resnets a level, 8 groups, a decoder wider than the encoder
    "levels3_lpb3_g8": dict(**_levels(3), block_out_channels=(8, 16, 16), decoder_block_out_channels=(16, 16, 24),
                            layers_per_block=3, norm_num_groups=8, latent_channels=8),
    # optional layers off: no mid attention, no quant convs (encode/decode and errors only, to save compiles)
    "levels2_bare": dict(**_levels(2), block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         latent_channels=4, mid_block_add_attention=False, use_quant_conv=False,
                         use_post_quant_conv=False),
}
PIPELINE_CONFIGS = ["levels2_lpb1_g4", "levels3_lpb3_g8"]


def _randomise(ref: AutoencoderKLFlux2) -> None:
    """GroupNorm affines and BN statistics away from their identity init, so that a swapped mapping shows."""
    g = torch.Generator().manual_seed(1)
    for module in ref.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.weight.data = 1 + 0.2 * torch.randn(module.weight.shape, generator=g)
            module.bias.data = 0.2 * torch.randn(module.bias.shape, generator=g)
    ref.bn.running_mean.data = 0.5 * torch.randn(ref.bn.running_mean.shape, generator=g)
    ref.bn.running_var.data = torch.rand(ref.bn.running_var.shape, generator=g) * 2 + 0.05
    ref.bn.num_batches_tracked.fill_(7)


_BUILT: dict[str, tuple] = {}


def _build(name: str, tmp_path_factory) -> tuple:
    """(diffusers reference, our model loaded from its save_pretrained folder, our config), built once per name."""
    if name not in _BUILT:
        torch.manual_seed(0)
        ref = AutoencoderKLFlux2(**TINY_CONFIGS[name]).eval()
        _randomise(ref)
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        config = VAEConfig.from_json(folder / "config.json")
        ours = load_component("vae", config, ShardedCheckpoint(folder), jnp.float32)
        _BUILT[name] = ref, ours, config
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=PIPELINE_CONFIGS)
def pipeline_pair(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@nnx.jit(static_argnums=1)
def _run(model: Flux2VAE, method: str, x: jnp.ndarray) -> jnp.ndarray:
    """One compiled call of `model.<method>(x)`: faster than eager op-by-op dispatch on CPU."""
    return getattr(model, method)(x)


@nnx.jit(static_argnums=3)
def _reference_tokens(model: Flux2VAE, images: jnp.ndarray, valid_hw: np.ndarray, slot_tokens: int) -> jnp.ndarray:
    return model.encode_reference_tokens(images, valid_hw, slot_tokens)


def _images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def _ref_reference_tokens(ref, images: np.ndarray) -> np.ndarray:
    """Flux2KleinPipeline._encode_vae_image + _pack_latents, run on a stand-in `self` that has only the VAE."""
    fake_pipe = types.SimpleNamespace(vae=ref, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        latents = Flux2KleinPipeline._encode_vae_image(fake_pipe, _nchw(images), generator=None)
        return Flux2KleinPipeline._pack_latents(latents).numpy()  # (B, h*w, 4C), row-major


def _ref_decode_tokens(ref, tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """The end of Flux2KleinPipeline.__call__: packed tokens (B, h*w, 4C) -> images, with its static helpers."""
    ids = torch.from_numpy(np.stack([L.latent_ids(h, w)] * tokens.shape[0])).long()
    pipe = Flux2KleinPipeline
    with torch.no_grad():
        latents = pipe._unpack_latents_with_ids(torch.from_numpy(np.array(tokens)), ids, h, w)
        mean = ref.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps).to(latents.dtype)
        latents = pipe._unpatchify_latents(latents * std + mean)
        return _nhwc(ref.decode(latents, return_dict=False)[0])


def test_loaded_config_and_variables(pair):
    ref, ours, config = pair
    assert config.block_out_channels == tuple(ref.config.block_out_channels)
    stats = nnx.state(ours, nnx.BatchStat)
    np.testing.assert_array_equal(np.asarray(stats["bn"]["running_mean"][...]), ref.bn.running_mean.numpy())
    np.testing.assert_array_equal(np.asarray(stats["bn"]["running_var"][...]), ref.bn.running_var.numpy())
    n_ours = sum(int(np.prod(s)) for s, _ in expected_params(ours).values())
    n_ref = sum(t.numel() for name, t in ref.state_dict().items() if name != "bn.num_batches_tracked")
    assert n_ours == n_ref


def test_encode_matches_diffusers(pair):
    ref, ours, config = pair
    images = _images((2, 96, 160, 3))  # non-square
    with torch.no_grad():
        want = _nhwc(ref.encode(_nchw(images)).latent_dist.mode())
    got = _run(ours, "encode", jnp.asarray(images))
    f = config.spatial_scale
    assert got.shape == (2, 96 // f, 160 // f, config.latent_channels)
    assert_close(got, want, rel=REL, name="encode mean")


def test_decode_matches_diffusers(pair):
    ref, ours, config = pair
    z = np.random.default_rng(3).standard_normal((2, 12, 20, config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        want = _nhwc(ref.decode(_nchw(z)).sample)
    got = _run(ours, "decode", jnp.asarray(z))
    f = config.spatial_scale
    assert got.shape == (2, 12 * f, 20 * f, 3)
    assert_close(got, want, rel=REL, name="decode")


def test_packed_paths_match_pipeline(pipeline_pair):
    ref, ours, config = pipeline_pair
    images = _images((1, 96, 160, 3), seed=4)
    f = 2 * config.spatial_scale
    h, w = 96 // f, 160 // f
    want = _ref_reference_tokens(ref, images)
    tokens = _reference_tokens(ours, jnp.asarray(images), np.array([96, 160], np.int32), h * w)
    assert tokens.shape == (1, h * w, config.packed_channels)
    assert_close(tokens, want, rel=REL, name="encode_reference_tokens at full size")
    want_images = _ref_decode_tokens(ref, want, h, w)
    got_images = _run(ours, "decode_packed", jnp.asarray(want).reshape(1, h, w, -1))  # (1, L, 4C) -> (1, h, w, 4C)
    assert got_images.shape == images.shape
    assert_close(got_images, want_images, rel=REL, name="packed -> pixels")


def test_smallest_sizes(pipeline_pair):
    ref, ours, config = pipeline_pair
    f = config.spatial_scale
    images = _images((1, f, f, 3), seed=5)  # smallest encode: one latent pixel
    with torch.no_grad():
        want = _nhwc(ref.encode(_nchw(images)).latent_dist.mode())
    assert_close(_run(ours, "encode", jnp.asarray(images)), want, rel=REL, name="encode at the smallest size")
    images = _images((1, 2 * f, 2 * f, 3), seed=6)  # smallest packed: one token
    tokens = _reference_tokens(ours, jnp.asarray(images), np.array([2 * f, 2 * f], np.int32), 1)
    want = _ref_reference_tokens(ref, images)
    assert_close(tokens, want, rel=REL, name="encode_reference_tokens at the smallest size")
    want_images = _ref_decode_tokens(ref, want, 1, 1)
    got_images = _run(ours, "decode_packed", jnp.asarray(want).reshape(1, 1, 1, -1))
    assert_close(got_images, want_images, rel=REL, name="decode_packed at the smallest size")


def test_shape_errors(pair):
    _, ours, config = pair
    f = config.spatial_scale
    with pytest.raises(ValueError, match="rank 3"):
        ours.encode(jnp.zeros((4 * f, 4 * f, 3)))
    with pytest.raises(ValueError, match="must have 3 channels"):
        ours.encode(jnp.zeros((1, 3, 4 * f, 4 * f)))  # NCHW by mistake
    with pytest.raises(ValueError, match=f"multiples of {f}; got {4 * f + 1}x{4 * f}"):
        ours.encode(jnp.zeros((1, 4 * f + 1, 4 * f, 3)))
    valid = np.array([2 * f, 2 * f], np.int32)
    with pytest.raises(ValueError, match=f"multiples of {2 * f}; got {3 * f}x{4 * f}"):
        ours.encode_reference_tokens(jnp.zeros((1, 3 * f, 4 * f, 3)), valid, 1)
    with pytest.raises(ValueError, match=r"one \(height, width\) pair; got shape \(1, 2\)"):
        ours.encode_reference_tokens(jnp.zeros((1, 4 * f, 4 * f, 3)), valid[None], 1)
    with pytest.raises(ValueError, match="slot_tokens must be at least 1; got 0"):
        ours.encode_reference_tokens(jnp.zeros((1, 4 * f, 4 * f, 3)), valid, 0)
    with pytest.raises(ValueError, match=f"must have {config.latent_channels} channels"):
        ours.decode(jnp.zeros((1, 2, 2, config.latent_channels + 1)))
    with pytest.raises(ValueError, match=f"must have {config.packed_channels} channels"):
        ours.decode_packed(jnp.zeros((1, 2, 2, config.latent_channels)))
    with pytest.raises(ValueError, match="rank 5"):
        ours.decode_packed(jnp.zeros((1, 1, 2, 2, config.packed_channels)))


def _batch_norm(mean, var, eps: float) -> LatentBatchNorm:
    bn = LatentBatchNorm(len(mean), eps=eps)
    bn.running_mean[...] = jnp.asarray(mean, jnp.float32)
    bn.running_var[...] = jnp.asarray(var, jnp.float32)
    return bn


def test_latent_batch_norm_hand_computed():
    bn = _batch_norm([1.0, 0.0], [3.0, 8.0], eps=1.0)  # std = sqrt(var + eps) = (2, 3)
    z = np.array([[5.0, -1.0]], np.float32)  # (1, C=2)
    out = np.asarray(bn.normalize(z))
    np.testing.assert_allclose(out, [[2.0, -1.0 / 3.0]], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(bn.denormalize(out)), z, rtol=1e-7)


def test_latent_batch_norm_matches_pipeline_formula():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    mean = rng.standard_normal(8).astype(np.float32)
    var = rng.uniform(0.1, 2.0, 8).astype(np.float32)
    bn = _batch_norm(mean, var, eps=1e-4)
    zt, mt, vt = _nchw(z), torch.from_numpy(mean).view(1, -1, 1, 1), torch.from_numpy(var).view(1, -1, 1, 1)
    std = torch.sqrt(vt + 1e-4)  # Flux2KleinPipeline: _encode_vae_image and the end of __call__
    np.testing.assert_allclose(np.asarray(bn.normalize(z)), _nhwc((zt - mt) / std), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.denormalize(z)), _nhwc(zt * std + mt), rtol=1e-6)


def test_weights_of_another_config_are_rejected(pair):
    ref, _, config = pair
    other = VAEConfig(**{**config.to_dict(), "layers_per_block": config.layers_per_block + 1})
    with pytest.raises(WeightMappingError, match="missing weights"):
        load_component("vae", other, {k: v.numpy() for k, v in ref.state_dict().items()}, jnp.float32)


class _ZeroTensors(dict):
    """name -> read-only zero array of the reference's shape, without allocating (meta-device model)."""

    def __getitem__(self, name):
        return np.broadcast_to(np.float32(0), super().__getitem__(name))


def test_real_flux2_vae_layout_maps_completely():
    """Every tensor of the real-size diffusers VAE (built on the meta device) maps with the right shape."""
    with torch.device("meta"):
        ref = AutoencoderKLFlux2()
    assert VAEConfig.from_dict(dict(ref.config)) == FLUX2_VAE
    shapes = _ZeroTensors({name: tuple(t.shape) for name, t in ref.state_dict().items()})
    abstract = nnx.eval_shape(lambda: Flux2VAE(FLUX2_VAE, rngs=nnx.Rngs(0)))
    mapped = map_weights(shapes, vae_rules(FLUX2_VAE), expected_params(abstract))
    assert sum(int(np.prod(a.shape)) for a in mapped.values()) == 84_046_371  # klein.md §1.4, less the BN counter
    assert mapped[("decoder", "mid_block", "attentions", 0, "to_out", "kernel")].shape == (512, 512)
    assert mapped[("encoder", "down_blocks", 0, "downsamplers", 0, "conv", "kernel")].shape == (3, 3, 128, 128)


@pytest.mark.parametrize("pipeline_pair", ["levels3_lpb3_g8"], indirect=True)
def test_bfloat16_decode_is_as_close_to_float32_as_diffusers_bfloat16(pipeline_pair, tmp_path):
    """Both VAEs in bfloat16 from the same weights, decoding the same latents: our mean error against the float32
    decode is within 5 % of diffusers' own bfloat16 error (the convolutions add their biases before the one rounding,
    as torch does)."""
    import copy

    ref, _, config = pipeline_pair
    ref.save_pretrained(tmp_path)
    ours = load_component("vae", config, ShardedCheckpoint(tmp_path), jnp.bfloat16)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    z = np.random.default_rng(5).standard_normal((2, 12, 20, config.latent_channels)).astype(np.float32)
    z16 = jnp.asarray(z, jnp.bfloat16)
    with torch.no_grad():
        want = _nhwc(ref.decode(_nchw(z)).sample)
        theirs = _nhwc(ref16.decode(_nchw(np.asarray(z16, np.float32)).bfloat16()).sample.float())
    got = np.asarray(_run(ours, "decode", z16), np.float32)
    err_ours, err_theirs = np.abs(got - want).mean(), np.abs(theirs - want).mean()
    between = np.abs(got - theirs).mean()
    print(f"mean abs vs float32: ours {err_ours:.3e}, diffusers bf16 {err_theirs:.3e}; ours vs theirs {between:.3e}")
    assert err_ours <= 1.05 * err_theirs
