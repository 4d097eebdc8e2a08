"""Reference preprocessing and output postprocessing against diffusers' Flux2ImageProcessor / pipeline code."""

import numpy as np
import PIL.Image
import pytest
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

from klein_jax import images as image_ops


def diffusers_preprocess(image: PIL.Image.Image, multiple_of: int = 16) -> np.ndarray:
    """Flux2KleinPipeline.__call__ step 4 for one reference -> (h, w, 3) float32 in [-1, 1]."""
    processor = Flux2ImageProcessor(vae_scale_factor=multiple_of)
    processor.check_image_input(image)
    width, height = image.size
    if width * height > 1024 * 1024:
        image = processor._resize_to_target_area(image, 1024 * 1024)
        width, height = image.size
    width, height = (width // multiple_of) * multiple_of, (height // multiple_of) * multiple_of
    tensor = processor.preprocess(image, height=height, width=width, resize_mode="crop")  # (1, 3, h, w)
    return tensor[0].permute(1, 2, 0).numpy()


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("width, height, mode", [
    (75, 67, "RGB"),  # odd size: floor to 64x64, centre crop
    (1531, 877, "RGB"),  # over the 1024^2 area cap: LANCZOS resize with int() truncation, then crop
    (1024, 1024, "RGB"),  # exactly at the cap: no resize
    (1025, 1024, "RGBA"),  # one pixel over the cap, alpha dropped after the crop
    (333, 129, "L"),  # grayscale
    (200, 300, "P"),  # palette (PIL resizes P images with NEAREST: order of operations matters)
    (4000, 501, "RGB"),  # aspect ratio just under 8, large
    (64, 64, "CMYK"),
])
def test_preprocess_equals_diffusers(width, height, mode):
    image = random_image(width, height, mode)
    want = diffusers_preprocess(image)
    got = image_ops.preprocess_reference(image)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert got.shape[0] % 16 == 0 and got.shape[1] % 16 == 0


def test_preprocess_other_multiple():
    """Tiny test VAEs have 4-pixel tokens: the floor follows the pipeline's vae_scale_factor * 2."""
    image = random_image(75, 67)
    np.testing.assert_array_equal(image_ops.preprocess_reference(image, multiple_of=4), diffusers_preprocess(image, 4))


@pytest.mark.parametrize("width, height, want", [
    (75, 67, (64, 64)),  # floor to multiples of 16
    # 2M pixels: scale sqrt(2^20 / 2e6) = 0.7240..., int(1448.15) = 1448, int(724.07) = 724, floored to 1440x720
    (2000, 1000, (1440, 720)),
    (1024, 1024, (1024, 1024)),  # exactly at the area cap: untouched
])
def test_reference_size_by_hand(width, height, want):
    got = image_ops.preprocess_reference(random_image(width, height))
    assert (got.shape[1], got.shape[0]) == want


def test_values_are_in_minus_one_one():
    image = PIL.Image.fromarray(np.array([[[0, 255, 128]] * 64] * 64, np.uint8))
    got = image_ops.preprocess_reference(image)
    np.testing.assert_array_equal(got[0, 0], np.float32([0, 255, 128]) / 255 * 2 - 1)


@pytest.mark.parametrize("image, message", [
    (random_image(63, 100), "too small: 63x100"),
    (random_image(100, 40), "too small"),
    (random_image(1000, 100), "aspect ratio is too extreme"),
    (np.zeros((64, 64, 3), np.uint8), "must be a PIL.Image.Image, got ndarray"),
    ("cat.png", "got str"),
])
def test_check_image_input_errors(image, message):
    with pytest.raises(ValueError, match=message):
        image_ops.preprocess_references([image])
    if isinstance(image, PIL.Image.Image):  # diffusers rejects the same images
        with pytest.raises(ValueError):
            Flux2ImageProcessor.check_image_input(image)


def test_image_not_convertible_to_rgb():
    image = PIL.Image.new("La", (64, 64))
    with pytest.raises(ValueError, match=r"reference image 1 \(mode 'La'\) cannot be converted to RGB"):
        image_ops.preprocess_references([random_image(64, 64), image])


def test_too_many_references():
    with pytest.raises(ValueError, match="5 reference images given; at most 4"):
        image_ops.preprocess_references([random_image(64, 64)] * 5)


def test_references_are_all_checked_before_any_preprocessing():
    with pytest.raises(ValueError, match="reference image 2 is too small"):
        image_ops.preprocess_references([random_image(64, 64), random_image(64, 64), random_image(10, 10)])


def test_postprocess_rounds_like_numpy_to_pil():
    # values whose x * 255 lands on .5 boundaries: numpy rounds half to even, as diffusers does
    values = np.array([0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5, 127.5 / 255, 1.0, 0.999, 0.001], np.float32)
    images = np.broadcast_to(values[None, None, :, None], (2, 4, values.size, 3)).copy()  # (B, H, W, 3)
    want = VaeImageProcessor.numpy_to_pil(images)
    got = image_ops.numpy_to_pil(images)
    assert [g.size for g in got] == [w.size for w in want]
    for g, w in zip(got, want):
        assert g.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(image_ops.to_uint8(values), [0, 0, 2, 2, 128, 128, 255, 255, 0])

