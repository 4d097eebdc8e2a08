"""Process-wide test settings and shared helpers."""

import jax
import numpy as np
import pytest

# Parity tests compare float32 against torch: XLA's CPU default may use lower-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")


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
