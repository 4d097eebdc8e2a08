"""klein_jax.latents: hand-computed values, round trips, and equality with Flux2KleinPipeline's static helpers."""

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline

from klein_jax import latents as L


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def test_patchify_hand_computed():
    # z[0, r, c, ch] = 10 * ch + (2 r + c): one 2x2 patch, two channels
    z = (10 * np.arange(2)[None, None, None, :] + np.arange(4).reshape(1, 2, 2, 1)).astype(np.float32)
    out = np.asarray(L.patchify(z))
    assert out.shape == (1, 1, 1, 8)
    # channel c*4 + pi*2 + pj holds z[pi, pj, c]
    np.testing.assert_array_equal(out[0, 0, 0], [0, 1, 2, 3, 10, 11, 12, 13])


def test_patchify_places_patches_on_the_grid():
    z = np.arange(4 * 6, dtype=np.float32).reshape(1, 4, 6, 1)  # value = 6 r + c
    out = np.asarray(L.patchify(z))  # (1, 2, 3, 4)
    # patch (i, j) channel pi*2+pj = z[2i+pi, 2j+pj]
    np.testing.assert_array_equal(out[0, 1, 2], [6 * 2 + 4, 6 * 2 + 5, 6 * 3 + 4, 6 * 3 + 5])
    np.testing.assert_array_equal(out[0, 0, 1], [2, 3, 8, 9])


@pytest.mark.parametrize("shape", [(1, 2, 2, 1), (2, 6, 10, 3), (1, 8, 4, 32)])
def test_patchify_round_trip_and_diffusers(shape):
    rng = np.random.default_rng(0)
    z = rng.standard_normal(shape).astype(np.float32)
    p = np.asarray(L.patchify(z))
    np.testing.assert_array_equal(np.asarray(L.unpatchify(p)), z)
    want = _nhwc(Flux2KleinPipeline._patchify_latents(_nchw(z)))
    np.testing.assert_array_equal(p, want)
    back = _nhwc(Flux2KleinPipeline._unpatchify_latents(_nchw(p)))
    np.testing.assert_array_equal(np.asarray(L.unpatchify(p)), back)


def test_row_major_reshape_is_diffusers_pack_and_latent_ids_unpack():
    """Packing is a row-major reshape (B, h, w, C) -> (B, h*w, C); latent_ids unpack it (_unpack_latents_with_ids)."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    tokens = z.reshape(2, 15, 8)  # (B, h, w, C) -> (B, L, C)
    np.testing.assert_array_equal(tokens[1, 2 * 5 + 4], z[1, 2, 4])  # token index r*w + c
    np.testing.assert_array_equal(tokens, Flux2KleinPipeline._pack_latents(_nchw(z)).numpy())
    ids = torch.from_numpy(np.stack([L.latent_ids(3, 5)] * 2)).long()
    want = _nhwc(Flux2KleinPipeline._unpack_latents_with_ids(torch.from_numpy(tokens), ids, 3, 5))
    np.testing.assert_array_equal(want, z)


def test_latent_ids_hand_computed():
    ids = L.latent_ids(2, 3)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0],
                                        [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 2, 0]])
    np.testing.assert_array_equal(L.latent_ids(1, 2, t=20), [[20, 0, 0, 0], [20, 0, 1, 0]])


def test_latent_ids_match_diffusers():
    want = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, 3, 5))[0].numpy()
    np.testing.assert_array_equal(L.latent_ids(3, 5), want)


def test_image_ids_match_diffusers():
    grids = [(2, 3), (4, 1)]
    want = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 128, h, w) for h, w in grids])[0].numpy()
    got = L.image_ids(grids)
    np.testing.assert_array_equal(got, want)
    assert got[0].tolist() == [10, 0, 0, 0] and got[-1].tolist() == [20, 3, 0, 0]


def test_text_ids_hand_computed_and_diffusers():
    np.testing.assert_array_equal(L.text_ids(3), [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]])
    want = Flux2KleinPipeline._prepare_text_ids(torch.zeros(2, 7, 4))
    for b in range(2):
        np.testing.assert_array_equal(L.text_ids(7), want[b].numpy())


def test_errors():
    with pytest.raises(ValueError, match="multiple of the 2x2 patch"):
        L.patchify(np.zeros((1, 3, 4, 2)))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        L.unpatchify(np.zeros((1, 2, 2, 6)))
    with pytest.raises(ValueError, match="at least"):
        L.latent_ids(0, 4)
    with pytest.raises(ValueError, match="at least"):
        L.text_ids(0)
    with pytest.raises(ValueError, match="at least one"):
        L.image_ids([])
