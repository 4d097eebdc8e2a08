"""LoKr adapters on KleinPipeline vs diffusers' Flux2KleinPipeline.load_lora_weights (peft's LoKr layers).

One LoKr file in each naming diffusers reads for FLUX.2: BFL / ai-toolkit (one delta on the fused qkv, which
diffusers fuses the model's q/k/v for), LyCORIS, bare diffusers names with alphas, and `transformer.` names; with
full and low-rank factors and alphas baked (or dropped) as diffusers does. Each at two weights, float32 on CPU, max
abs <= 1e-4; every case moves diffusers' output by >= 100x that, and swapping the Kronecker factors fails.
"""

import numpy as np
import pytest
from lora_support import lokr_parts, lokr_tensors, write_tensors
from test_lora_parity import HEIGHT, MAX_ABS, PROMPT, SENSITIVITY, WIDTH, diffusers_image, max_abs
from tiny_pipeline import load_reference_pipeline

from conftest import noise
from klein_jax.lora import lokr as lokr_module

NAMINGS = ("bfl", "lycoris", "bare", "transformer")
CASES = {"bfl-1.0": ("bfl", 1.0), "bfl-neg0.7": ("bfl", -0.7), "lycoris-0.8": ("lycoris", 0.8),
         "lycoris-1.5": ("lycoris", 1.5), "bare-1.0": ("bare", 1.0), "bare-0.5": ("bare", 0.5),
         "transformer-1.0": ("transformer", 1.0), "transformer-neg1.2": ("transformer", -1.2)}


@pytest.fixture(scope="module")
def lokr_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lokr")
    return {naming: write_tensors(root / f"{naming}.safetensors",
                                  lokr_tensors(lokr_parts(seed=i, fused=naming == "bfl"), naming))
            for i, naming in enumerate(NAMINGS)}


@pytest.fixture(scope="module")
def references(tiny_checkpoint, lokr_files):
    """naming -> the diffusers pipeline holding its adapter (BFL's fuses q/k/v: a pipeline of its own)."""
    fused, unfused = (load_reference_pipeline(tiny_checkpoint.diffusers) for _ in range(2))
    for pipe in (fused, unfused):
        pipe.set_progress_bar_config(disable=True)
    fused.load_lora_weights(lokr_files["bfl"], adapter_name="bfl")
    assert fused.transformer.transformer_blocks[0].attn.fused_projections
    for naming in NAMINGS[1:]:
        unfused.load_lora_weights(lokr_files[naming], adapter_name=naming)
    return {naming: fused if naming == "bfl" else unfused for naming in NAMINGS}


@pytest.fixture(scope="module")
def pipe(tiny_pipeline, lokr_files):
    for naming, path in lokr_files.items():
        tiny_pipeline.load_lora_weights(path, adapter_name=naming)
    tiny_pipeline.set_adapters([])
    yield tiny_pipeline
    tiny_pipeline.unload_lora_weights()


@pytest.fixture(scope="module")
def plain(references) -> np.ndarray:
    reference = references["lycoris"]
    reference.disable_lora()
    try:
        return diffusers_image(reference, noise(WIDTH, HEIGHT, seed=3))
    finally:
        reference.enable_lora()


def _compare(pipe, reference, naming: str, ours: str, weight: float) -> tuple[float, float]:
    """(how far the adapter moves diffusers' image, max abs between ours and diffusers')."""
    latents = noise(WIDTH, HEIGHT, seed=3)
    reference.set_adapters([naming], adapter_weights=[weight])
    want = diffusers_image(reference, latents)
    pipe.set_adapters([ours], adapter_weights=[weight])
    try:
        got = pipe(PROMPT, width=WIDTH, height=HEIGHT, latents=latents, output_type="np")
    finally:
        pipe.set_adapters([])
    return max_abs(want, got), want


@pytest.mark.parametrize("case", CASES)
def test_lokr_matches_diffusers(case, pipe, references, plain):
    naming, weight = CASES[case]
    error, want = _compare(pipe, references[naming], naming, naming, weight)
    moved = max_abs(want, plain)
    assert moved >= SENSITIVITY * MAX_ABS, f"the adapter moves diffusers' output by only {moved:.2e}"
    assert error <= MAX_ABS, f"max abs error {error:.2e} ({case})"


def test_swapped_kronecker_factors_fail(pipe, references, lokr_files, monkeypatch):
    """kron(w2, w1) instead of kron(w1, w2) (shapes still fit the layers) is caught by the comparison."""
    factors = lokr_module._kron_factors
    monkeypatch.setattr(lokr_module, "_kron_factors", lambda *a: (lambda f: f and (f[1], f[0]))(factors(*a)))
    pipe.load_lora_weights(lokr_files["bfl"], adapter_name="swapped")
    error, _ = _compare(pipe, references["bfl"], "bfl", "swapped", 1.0)
    assert error > SENSITIVITY * MAX_ABS
