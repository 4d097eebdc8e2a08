"""klein-9B (distilled and base) with Qwen3-8B.

The presets against the real layouts (shapes only, nothing allocated: diffusers' and transformers' modules on the
meta device), the BFL single file at the 9B family's proportions, and the 4B parity suite of
tests/test_pipeline_parity.py on tiny 9B-shaped checkpoints (configs.TINY_9B_*: more double-stream blocks per
single-stream block, more heads, a text encoder with 4 query heads per key/value head and an untied lm_head, as
Qwen3-8B): text-to-image, edit, multi-reference, base with classifier-free guidance, float32 on CPU, max abs <= 1e-4.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.numpy import load_file
from test_pipeline_parity import (
    MAX_ABS,
    PROMPTS,
    SENSITIVITY,
    WIDTH,
    HEIGHT,
    Expected,
    Workflow,
    assert_closer_than_mutations,
    assert_max_abs,
    diffusers_images,
    flipped,
    max_abs,
    reference_images,
)
from tiny_pipeline import (
    diffusers_to_bfl,
    load_reference_pipeline,
    make_bfl_transformer_file,
    make_tiny_9b_pipeline,
    qwen3_config,
)

from conftest import TEST_BUCKETS, noise
from convert.cli import main as convert_main
from klein_jax.configs import KLEIN_9B, QWEN3_8B, TINY_9B_TEXT_ENCODER, TINY_9B_TRANSFORMER
from klein_jax.loading import checkpoint, expected_params
from klein_jax.loading.keymap import map_weights
from klein_jax.loading.keymaps.bfl import BFLTransformer
from klein_jax.loading.keymaps.text_encoder import text_encoder_rules
from klein_jax.loading.keymaps.transformer import transformer_rules
from klein_jax.loading.modules import abstract_module
from klein_jax.pipeline import KleinPipeline

STEPS = {"distilled": 4, "base": 3}
# Three of the 4B suite's four workflows (its base-1ref-batch1 is left out for time): edit, multi-reference, and base
# with guidance, references and a batch of 2.
WORKFLOWS = [Workflow("distilled", 1, 2), Workflow("distilled", 3, 1), Workflow("base", 3, 2)]


# --------------------------------------------------------------------------------- the real 9B layouts, by shape


def _placeholders(state_dict) -> dict[str, np.ndarray]:
    """Zero-stride arrays with the shapes of a meta-device state dict: key maps run on them without data."""
    return {k: np.broadcast_to(np.zeros((), np.bool_), tuple(v.shape)) for k, v in state_dict.items()}


def _mapped_count(tensors, rules, name: str, config) -> int:
    """Runs the key map on `tensors` against the module of `config`; every parameter set; returns their count."""
    module = abstract_module(name, config, "bfloat16")
    expected = {p: (shape, np.bool_) for p, (shape, _) in expected_params(module).items()}
    params = map_weights(tensors, rules, expected, dtype=np.bool_)
    assert params.keys() == expected.keys()
    return sum(int(np.prod(a.shape)) for a in params.values())


def test_real_9b_transformer_layouts_fit_the_preset():
    """diffusers' klein-9B transformer (8 double, 24 single blocks, D 4096) in the diffusers and the BFL layout maps
    onto KLEIN_9B: every key, every shape; 9,078,581,248 parameters (klein.md §1.2)."""
    with torch.device("meta"):
        state = Flux2Transformer2DModel(**KLEIN_9B.to_dict()).state_dict()
    assert len(state) == 233
    rules = transformer_rules(KLEIN_9B)
    assert _mapped_count(_placeholders(state), rules, "transformer", KLEIN_9B) == 9_078_581_248
    bfl = diffusers_to_bfl(state)
    assert sum(k.startswith("double_blocks.7.") for k in bfl) == 12 and "single_blocks.23.linear1.weight" in bfl
    view = BFLTransformer(_placeholders(bfl))
    assert _mapped_count(view, rules, "transformer", KLEIN_9B) == 9_078_581_248


def test_real_qwen3_8b_layout_fits_the_preset():
    """Qwen3-8B (36 layers, untied lm_head, 32/8 heads) maps onto QWEN3_8B: 27 layers kept, the rest, model.norm
    and lm_head dropped; 5,831,883,520 parameters read (klein.md §1.3)."""
    from transformers import Qwen3ForCausalLM

    config = qwen3_config(QWEN3_8B)
    config.tie_word_embeddings = False
    with torch.device("meta"):
        state = Qwen3ForCausalLM(config).state_dict()
    assert "lm_head.weight" in state and len([k for k in state if k.startswith("model.layers.35.")]) == 11
    count = _mapped_count(_placeholders(state), text_encoder_rules(QWEN3_8B), "text_encoder", QWEN3_8B)
    assert count == 5_831_883_520


# ---------------------------------------------------------------------------------------- tiny 9B checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """model -> (diffusers folder, klein-convert folder) of the tiny 9B-shaped distilled and base checkpoints."""
    out = {}
    for model, distilled in (("distilled", True), ("base", False)):
        root = tmp_path_factory.mktemp(f"tiny-9b-{model}")
        source = make_tiny_9b_pipeline(root / "diffusers", distilled=distilled, seed=11)
        assert convert_main([str(source), str(root / "klein"), "--dtype", "float32", "--no-progress"]) == 0
        out[model] = (source, root / "klein")
    return out


@pytest.fixture(scope="module")
def pipelines(checkpoints) -> dict[str, KleinPipeline]:
    return {model: KleinPipeline.from_pretrained(klein, "float32", reference_buckets=TEST_BUCKETS)
            for model, (_, klein) in checkpoints.items()}


@pytest.fixture(scope="module")
def references(checkpoints) -> dict:
    out = {model: load_reference_pipeline(source) for model, (source, _) in checkpoints.items()}
    for reference in out.values():
        reference.set_progress_bar_config(disable=True)
    return out


def test_tiny_9b_checkpoints_have_the_9b_proportions(checkpoints, pipelines):
    source, _ = checkpoints["distilled"]
    text_config = json.loads((source / "text_encoder" / "config.json").read_text())
    assert text_config["num_attention_heads"] == 4 * text_config["num_key_value_heads"]
    assert text_config["tie_word_embeddings"] is False  # lm_head is saved, and dropped on conversion
    assert any("lm_head.weight" in json.loads(p.read_text())["weight_map"]
               for p in (source / "text_encoder").glob("*.index.json"))
    transformer = pipelines["distilled"].transformer.config
    assert transformer == TINY_9B_TRANSFORMER and transformer.num_layers / transformer.num_single_layers > 5 / 20
    assert pipelines["distilled"].text_encoder.config == TINY_9B_TEXT_ENCODER
    assert [p.model_info["variant"] for p in pipelines.values()] == ["distilled", "base"]


def test_tiny_9b_bfl_file_converts_like_the_diffusers_folder(checkpoints, tmp_path):
    source, klein = checkpoints["distilled"]
    state = load_file(str(source / "transformer" / "diffusion_pytorch_model.safetensors"))
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    bfl = make_bfl_transformer_file(tensors, tmp_path / "klein-9b.safetensors", prefix="model.diffusion_model.")
    out = tmp_path / "out"
    assert convert_main([str(source), str(out), "--transformer", str(bfl), "--dtype", "float32", "--no-progress"]) == 0
    ours, want = ((checkpoint.restore_params(f / "transformer" / "params",
                                             checkpoint.saved_shapes(f / "transformer" / "params")))
                  for f in (out, klein))
    assert ours.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(want[k]), err_msg=str(k))


# ---------------------------------------------------------------------------------------------------- parity


def test_text_to_image_matches_diffusers(pipelines, references):
    latents = noise(WIDTH, HEIGHT, seed=4)
    want = diffusers_images(references["distilled"], ["a red fox in the snow"], latents=latents, steps=4)
    got = pipelines["distilled"]("a red fox in the snow", width=WIDTH, height=HEIGHT, latents=latents,
                                 output_type="np")
    assert_max_abs(got, want)


def test_base_model_with_guidance_matches_diffusers(pipelines, references):
    pipe = pipelines["base"]
    assert pipe.default_steps == 50 and pipe.model_info["guidance_scale"] == 4.0
    latents = noise(WIDTH, HEIGHT, seed=5)
    want = diffusers_images(references["base"], ["a lighthouse"], latents=latents, steps=3)
    unguided = references["base"](prompt=["a lighthouse"], width=WIDTH, height=HEIGHT, num_inference_steps=3,
                                  guidance_scale=1.0, latents=torch.from_numpy(latents), output_type="np",
                                  text_encoder_out_layers=TINY_9B_TEXT_ENCODER.out_layers).images
    assert max_abs(want, unguided) >= SENSITIVITY * MAX_ABS, "guidance must move the output"
    got = pipe("a lighthouse", width=WIDTH, height=HEIGHT, latents=latents, num_inference_steps=3, output_type="np")
    assert_max_abs(got, want)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=str)
def test_reference_workflow_matches_diffusers(workflow, pipelines, references):
    reference = references[workflow.model]
    latents = noise(WIDTH, HEIGHT, workflow.batch, seed=workflow.references)
    images = reference_images(workflow.references)

    def run(refs):
        return diffusers_images(reference, PROMPTS[: workflow.batch], latents=latents, steps=STEPS[workflow.model],
                                images=refs)

    mutations = {"flipped": flipped(images)} | ({"reversed": images[::-1]} if len(images) > 1 else {})
    want = Expected(run(images), {name: run(refs) for name, refs in mutations.items()})
    moved = max_abs(run(reference_images(workflow.references, seed=10)), want.images)
    assert moved >= SENSITIVITY * MAX_ABS, f"other references move diffusers' output by only {moved:.2e}"
    got = pipelines[workflow.model](list(PROMPTS[: workflow.batch]), images=images, width=WIDTH, height=HEIGHT,
                                    latents=latents, num_inference_steps=STEPS[workflow.model], output_type="np")
    assert_max_abs(got, want.images)
    assert_closer_than_mutations(got, want)
