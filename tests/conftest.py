"""Process-wide test settings, shared helpers and the session's tiny checkpoints and pipelines."""

import dataclasses
import pathlib

import jax
import numpy as np
import PIL.Image
import pytest

from klein_jax.buckets import ReferenceBuckets

# Parity tests compare float32 against torch: XLA's CPU default may use lower-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")

# The tiny VAE has 4-pixel tokens. One grid area (a 32x32-token bucket, 128x128 pixels) holds every test reference,
# so each batch size has one reference program; the token buckets sit just above one reference (<= 320 tokens) and
# three (1055 in tests/test_pipeline_parity.py). Every test reference is padded both ways (the parity covers masks).
TEST_BUCKETS = ReferenceBuckets(grid_areas=(1024,), token_buckets=(384, 1152))


def pytest_collection_modifyitems(config, items):
    """Skips the tests marked `gpu` unless JAX runs on a GPU."""
    backend = jax.default_backend()
    if backend == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU; the JAX backend is {backend}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_close(actual, expected, *, rel: float, name: str = "output"):
    """Max abs error relative to the expected output's scale (max |expected|) must be <= rel."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = max(np.abs(expected).max(), 1e-12)
    err = np.abs(actual - expected)
    idx = np.unravel_index(err.argmax(), err.shape)
    worst = err[idx] / scale
    assert worst <= rel, (
        f"{name}: max abs err {err[idx]:.3e} = {worst:.3e} x scale {scale:.3e} > {rel:.1e} "
        f"at {idx}: got {actual[idx]!r}, want {expected[idx]!r}"
    )
    return worst


@pytest.fixture
def close():
    return assert_close


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    """A PIL image of uniform random pixels, converted to `mode`."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def noise(width: int, height: int, batch: int = 1, seed: int = 0, pixels_per_token: int = 4) -> np.ndarray:
    """Initial noise in diffusers' layout (B, 128, H/ps, W/ps), for `latents=` (4 pixels a token: the tiny VAE)."""
    shape = (batch, 128, height // pixels_per_token, width // pixels_per_token)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------- tiny checkpoints, pipelines


@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    """A tiny random Flux2KleinPipeline saved as diffusers does (tests/tiny_pipeline.py), and its klein-convert
    output in float32."""

    diffusers: pathlib.Path
    klein: pathlib.Path


def _tiny_checkpoint(tmp_path_factory, distilled: bool) -> TinyCheckpoint:
    from tiny_pipeline import make_tiny_diffusers_pipeline

    from convert.cli import main as convert_main

    root = tmp_path_factory.mktemp("tiny-distilled" if distilled else "tiny-base")
    source = make_tiny_diffusers_pipeline(root / "diffusers", distilled=distilled)
    assert convert_main([str(source), str(root / "klein"), "--dtype", "float32", "--no-progress"]) == 0
    return TinyCheckpoint(source, root / "klein")


def _tiny_pipeline(checkpoint: TinyCheckpoint):
    from klein_jax.pipeline import KleinPipeline

    return KleinPipeline.from_pretrained(checkpoint.klein, "float32", reference_buckets=TEST_BUCKETS)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    """The distilled (4-step) tiny checkpoint."""
    return _tiny_checkpoint(tmp_path_factory, distilled=True)


@pytest.fixture(scope="session")
def tiny_base_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    """The base tiny checkpoint (classifier-free guidance)."""
    return _tiny_checkpoint(tmp_path_factory, distilled=False)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    """float32 KleinPipeline of tiny_checkpoint, loaded once: every test that uses it shares its compiled programs."""
    return _tiny_pipeline(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_base_pipeline(tiny_base_checkpoint):
    """float32 KleinPipeline of tiny_base_checkpoint, loaded once."""
    return _tiny_pipeline(tiny_base_checkpoint)


@pytest.fixture(scope="session")
def tiny_kv_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    """A tiny klein-9B-shaped Flux2KleinKVPipeline (model_index.json without is_distilled, as FLUX.2-klein-9b-kv)."""
    from tiny_pipeline import make_tiny_9b_pipeline

    from convert.cli import main as convert_main

    root = tmp_path_factory.mktemp("tiny-kv")
    source = make_tiny_9b_pipeline(root / "diffusers", kv=True, seed=7)
    assert convert_main([str(source), str(root / "klein"), "--dtype", "float32", "--no-progress"]) == 0
    return TinyCheckpoint(source, root / "klein")


@pytest.fixture(scope="session")
def tiny_kv_pipeline(tiny_kv_checkpoint):
    """float32 KleinPipeline of tiny_kv_checkpoint, loaded once."""
    return _tiny_pipeline(tiny_kv_checkpoint)
