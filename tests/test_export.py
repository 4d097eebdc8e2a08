"""convert/export.py: the demo pipeline written as a diffusers folder is the same model for klein-convert,
KleinPipeline.from_pretrained and diffusers' Flux2KleinPipeline (the oracle)."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import assert_close
from diffusers import Flux2KleinPipeline
from flax import nnx
from safetensors import safe_open

from convert.cli import main as klein_convert
from convert.export import (
    ExportError,
    export_diffusers_folder,
    invert_params,
    module_params,
    pipeline_modules,
)
from klein_jax.loading.keymaps.transformer import transformer_rules
from klein_jax.loading.safetensors import SafetensorsFile
from klein_jax import latents as latent_ops
from klein_jax.configs import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TextEncoderConfig, TransformerConfig, VAEConfig
from klein_jax.demo import DEMO_VAE, build_demo_pipeline
from klein_jax.pipeline import KleinPipeline

PROMPT = "a red fox in the snow"
COMPONENTS = ("transformer", "vae", "text_encoder")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo pipeline, its export, the klein-convert output of the export, and that output loaded."""
    root = tmp_path_factory.mktemp("export")
    demo = build_demo_pipeline()
    folder = export_diffusers_folder(demo, root / "diffusers")
    assert klein_convert([str(folder), str(root / "converted"), "--dtype", "float32", "--no-progress"]) == 0
    loaded = KleinPipeline.from_pretrained(root / "converted", dtype="float32")
    return {"demo": demo, "folder": folder, "converted": root / "converted", "loaded": loaded}


@pytest.fixture(scope="module")
def oracle(exported):
    return Flux2KleinPipeline.from_pretrained(exported["folder"], dtype=torch.float32)


def test_layout_and_configs(exported):
    folder = exported["folder"]
    for name, weights in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):
        assert (folder / name / "config.json").is_file() and (folder / name / f"{weights}.safetensors").is_file()
    assert {p.name for p in (folder / "tokenizer").iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                                  "chat_template.jinja"}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert index["_text_encoder_out_layers"] == [1, 2, 3]  # not klein's (9, 18, 27): recorded
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] and scheduler["time_shift_type"] == "exponential"
    # the configs read back to the demo model's own
    assert TransformerConfig.from_json(folder / "transformer" / "config.json") == TINY_TRANSFORMER
    assert VAEConfig.from_json(folder / "vae" / "config.json") == DEMO_VAE
    assert TextEncoderConfig.from_json(folder / "text_encoder" / "config.json",
                                       out_layers=(1, 2, 3)) == TINY_TEXT_ENCODER


def test_text_encoder_keeps_its_depth(exported):
    """Layer 3 is never read (out_layers (1, 2, 3) need layers 0-2): it is written as zeros, model.norm as ones."""
    with safe_open(exported["folder"] / "text_encoder" / "model.safetensors", "np") as f:
        keys = set(f.keys())
        assert {k.split(".")[2] for k in keys if k.startswith("model.layers.")} == {"0", "1", "2", "3"}
        assert not f.get_tensor("model.layers.3.mlp.down_proj.weight").any()
        np.testing.assert_array_equal(f.get_tensor("model.norm.weight"), np.ones(TINY_TEXT_ENCODER.hidden_size))
        assert "lm_head.weight" not in keys  # tied to the embedding, as in Qwen3-4B


def test_converted_parameters_are_identical(exported):
    demo, loaded = pipeline_modules(exported["demo"]), pipeline_modules(exported["loaded"])
    for name in COMPONENTS:
        want, got = module_params(demo[name]), module_params(loaded[name])
        assert got.keys() == want.keys(), name
        for path in want:
            assert got[path].dtype == want[path].dtype == np.float32, (name, path)
            np.testing.assert_array_equal(got[path], want[path], err_msg=f"{name} {path}")


def test_converted_image_is_identical(exported):
    kwargs = {"width": 64, "height": 48, "seed": 3, "output_type": "np"}
    want = exported["demo"](PROMPT, **kwargs)
    got = exported["loaded"](PROMPT, **kwargs)
    assert got.shape == (1, 48, 64, 3)
    np.testing.assert_array_equal(got, want)


def test_diffusers_transformer_matches(exported, oracle):
    rng = np.random.default_rng(0)
    T, (h, w) = 7, (3, 4)
    x = rng.standard_normal((2, h * w, 128)).astype(np.float32)
    text = rng.standard_normal((2, T, TINY_TRANSFORMER.joint_attention_dim)).astype(np.float32)
    sigma = np.array([0.9, 0.3], np.float32)
    img_ids, txt_ids = np.asarray(latent_ops.latent_ids(h, w)), np.asarray(latent_ops.text_ids(T))
    with torch.no_grad():
        want = oracle.transformer(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(text),
                                  timestep=torch.from_numpy(sigma), img_ids=torch.from_numpy(img_ids).long(),
                                  txt_ids=torch.from_numpy(txt_ids).long(), guidance=None).sample.numpy()
    ours = pipeline_modules(exported["demo"])["transformer"]
    got = nnx.jit(lambda m, *a: m(*a))(ours, *map(jnp.asarray, (x, text, sigma, img_ids, txt_ids)))
    assert np.abs(want).max() > 0.1
    assert_close(got, want, rel=1e-5, name="transformer")


def test_diffusers_text_encoder_and_vae_match(exported, oracle):
    with torch.no_grad():
        want_text, _ = oracle.encode_prompt([PROMPT], device="cpu", max_sequence_length=512,
                                            text_encoder_out_layers=TINY_TEXT_ENCODER.out_layers)
    modules = pipeline_modules(exported["demo"])
    input_ids, attention_mask = exported["demo"].tokenizer.encode([PROMPT])
    got_text = nnx.jit(lambda m, i, a: m(i, a))(modules["text_encoder"], jnp.asarray(input_ids),
                                                jnp.asarray(attention_mask))
    assert_close(got_text, want_text.numpy(), rel=1e-5, name="prompt_embeds")

    latents = np.random.default_rng(1).standard_normal((1, 2, 3, DEMO_VAE.latent_channels)).astype(np.float32)
    with torch.no_grad():
        want_images = oracle.vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).sample.numpy()
    got_images = nnx.jit(lambda m, z: m.decode(z))(modules["vae"], jnp.asarray(latents))
    assert_close(got_images, want_images.transpose(0, 2, 3, 1), rel=1e-5, name="vae decode")


def test_bfloat16_export(exported, tmp_path):
    """A bf16 pipeline exports bf16 tensors: the fp32 export's values rounded to bf16."""
    bf16 = KleinPipeline.from_pretrained(exported["converted"], dtype="bfloat16")
    folder = export_diffusers_folder(bf16, tmp_path / "bf16")
    name = "transformer/diffusion_pytorch_model.safetensors"
    with safe_open(folder / name, "pt") as f:
        assert f.get_tensor("x_embedder.weight").dtype == torch.bfloat16
    got, want = SafetensorsFile(folder / name), SafetensorsFile(exported["folder"] / name)
    for key in ("x_embedder.weight", "single_transformer_blocks.1.attn.to_qkv_mlp_proj.weight"):
        assert got[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[key], want[key].astype(ml_dtypes.bfloat16))


def test_refuses_a_non_empty_folder(exported, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_diffusers_folder(exported["demo"], tmp_path)


def test_parameter_without_a_rule_is_named():
    with pytest.raises(ExportError, match="bogus_block.kernel: no source keys"):
        invert_params({("bogus_block", "kernel"): np.zeros((2, 3), np.float32)}, transformer_rules(TINY_TRANSFORMER))
