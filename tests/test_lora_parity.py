"""LoRA adapters on KleinPipeline vs diffusers' Flux2KleinPipeline.load_lora_weights + set_adapters.

One diffusers/PEFT file (peft's layers saved by save_lora_weights, with alpha != r and rank/alpha patterns) and one
kohya file (fused qkv, alphas), each at two weights, and both at once; float32 on CPU, max abs <= 1e-4 from the
same initial noise. Every adapter case moves diffusers' output by >= 100x that tolerance (asserted), and
test_broken_scaling_fails shows that a wrong PEFT scaling fails the comparison. A stream of requests that alternates
adapters and scales compiles nothing after warm-up.
"""

import numpy as np
import pytest
from lora_support import kohya_tensors, write_peft_adapter, write_tensors
from tiny_pipeline import load_reference_pipeline

from conftest import noise
from klein_jax.configs import TINY_TEXT_ENCODER
from klein_jax.lora import adapter as adapter_module

MAX_ABS = 1e-4  # shared/spec/interfaces.md: float32 CPU parity with diffusers
SENSITIVITY = 100  # each adapter case must move diffusers' output by >= SENSITIVITY x MAX_ABS
WIDTH, HEIGHT = 48, 32
PROMPT = "a watercolor fox"
CASES = {  # id -> (adapter names, weights)
    "peft-0.7": (["peft"], [0.7]),
    "peft-1.5": (["peft"], [1.5]),
    "kohya-1.0": (["kohya"], [1.0]),
    "kohya-neg0.6": (["kohya"], [-0.6]),
    "both": (["peft", "kohya"], [0.8, 0.5]),
}


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"peft": write_peft_adapter(root / "peft", seed=0, gain=0.5),
            "kohya": write_tensors(root / "kohya.safetensors", kohya_tensors(seed=1))}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, adapter_files):
    pipe = load_reference_pipeline(tiny_checkpoint.diffusers)
    pipe.set_progress_bar_config(disable=True)
    for name, path in adapter_files.items():
        pipe.load_lora_weights(path, adapter_name=name)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_pipeline, adapter_files):
    for name, path in adapter_files.items():
        assert tiny_pipeline.load_lora_weights(path, adapter_name=name) == name
        assert tiny_pipeline.lora.active == ((name, 1.0),)  # as diffusers: the adapter just loaded is active
    tiny_pipeline.set_adapters([])
    yield tiny_pipeline
    tiny_pipeline.unload_lora_weights()


@pytest.fixture(scope="module")
def plain(reference) -> np.ndarray:
    """diffusers' image without adapters."""
    reference.disable_lora()
    try:
        return diffusers_image(reference, noise(WIDTH, HEIGHT, seed=3))
    finally:
        reference.enable_lora()


def diffusers_image(reference, latents) -> np.ndarray:
    import torch

    return reference(prompt=[PROMPT], width=WIDTH, height=HEIGHT, num_inference_steps=4, output_type="np",
                     latents=torch.from_numpy(latents), text_encoder_out_layers=TINY_TEXT_ENCODER.out_layers).images


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max())


@pytest.mark.parametrize("case", CASES)
def test_adapter_matches_diffusers(case, pipe, reference, plain):
    names, weights = CASES[case]
    latents = noise(WIDTH, HEIGHT, seed=3)
    reference.set_adapters(names, adapter_weights=weights)
    want = diffusers_image(reference, latents)
    moved = max_abs(want, plain)
    assert moved >= SENSITIVITY * MAX_ABS, f"the adapter moves diffusers' output by only {moved:.2e}"
    pipe.set_adapters(names, adapter_weights=weights)
    try:
        got = pipe(PROMPT, width=WIDTH, height=HEIGHT, latents=latents, output_type="np")
    finally:
        pipe.set_adapters([])
    assert max_abs(got, want) <= MAX_ABS, f"max abs error {max_abs(got, want):.2e} ({case})"
    plain_ours = pipe(PROMPT, width=WIDTH, height=HEIGHT, latents=latents, output_type="np")
    assert max_abs(plain_ours, plain) <= MAX_ABS  # set_adapters([]) is the plain model again


def test_broken_scaling_fails(pipe, reference, adapter_files, monkeypatch, tmp_path):
    """Ignoring the file's lora_alpha (scaling 1 instead of alpha / r) is caught by the comparison."""
    monkeypatch.setattr(adapter_module, "peft_scaling", lambda module, rank, metadata: 1.0)
    pipe.load_lora_weights(adapter_files["peft"], adapter_name="unscaled")
    latents = noise(WIDTH, HEIGHT, seed=3)
    reference.set_adapters(["peft"], adapter_weights=[0.7])
    want = diffusers_image(reference, latents)
    pipe.set_adapters(["unscaled"], adapter_weights=[0.7])
    try:
        got = pipe(PROMPT, width=WIDTH, height=HEIGHT, latents=latents, output_type="np")
    finally:
        pipe.set_adapters([])
    assert max_abs(got, want) > SENSITIVITY * MAX_ABS


def test_alternating_adapters_compile_nothing(pipe):
    """After one plain and one LoRA request, a stream alternating adapters and scales compiles no program: every
    single adapter runs in the same program."""
    requests = [dict(), dict(lora="peft", lora_scale=0.5), dict(lora="kohya"), dict(lora="peft", lora_scale=-2.0),
                dict(lora="kohya", lora_scale=3.5), dict()]
    images = {}
    for i, kwargs in enumerate(requests * 2):
        if i == 2:  # warm: the plain program and the one LoRA program have run (kohya has not run yet)
            before = pipe.compile_count
        prepared = pipe.prepare(PROMPT, width=WIDTH, height=HEIGHT, seed=7, **kwargs)
        images.setdefault(tuple(kwargs.items()), []).append(np.asarray(pipe.run_batch([prepared])[0]))
    assert pipe.compile_count == before
    firsts = [runs[0] for runs in images.values()]
    for runs in images.values():
        assert all(np.array_equal(runs[0], r) for r in runs)  # the same request gives the same image
    assert len({a.tobytes() for a in firsts}) == len(firsts)  # every adapter and scale changes the image
