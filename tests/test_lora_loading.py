"""Reading adapter files: the namings agree with each other, PEFT scaling, and every bad key is named."""

import numpy as np
import pytest
import torch
from flax import nnx
from lora_support import bfl_tensors, kohya_tensors, lokr_parts, lokr_tensors, write_peft_adapter, write_tensors

from klein_jax.configs import TINY_TRANSFORMER
from klein_jax.lora import LORA_WEIGHT_NAME, LoraAdapters, linear_targets, read_lora_file
from klein_jax.lora.adapter import peft_scaling
from klein_jax.lora.lokr import kron_matmul
from klein_jax.models.transformer import Flux2Transformer

D = TINY_TRANSFORMER.inner_dim


@pytest.fixture(scope="module")
def targets():
    return linear_targets(nnx.eval_shape(lambda: Flux2Transformer(TINY_TRANSFORMER, rngs=nnx.Rngs(0))))


def registry(targets) -> LoraAdapters:
    return LoraAdapters(targets, np.float32)


def test_targets_are_every_linear_layer(targets):
    assert targets["transformer_blocks.0.attn.to_out"] == (D, D)  # diffusers' to_out.0
    assert targets["single_transformer_blocks.1.attn.to_qkv_mlp_proj"] == (D, 3 * D + 2 * TINY_TRANSFORMER.mlp_hidden_dim)
    assert len(targets) == 9 + 12 * TINY_TRANSFORMER.num_layers + 2 * TINY_TRANSFORMER.num_single_layers


def test_kohya_and_bfl_namings_give_the_same_adapter(targets, tmp_path):
    kohya = kohya_tensors(seed=0, rank=8, alpha=1.0)
    lora = registry(targets)
    lora.load(write_tensors(tmp_path / "k.safetensors", kohya), "kohya")
    lora.load(write_tensors(tmp_path / "b.safetensors", bfl_tensors(kohya)), "bfl")
    a, b = lora.adapters["kohya"].factors, lora.adapters["bfl"].factors
    assert a.keys() == b.keys() and "transformer_blocks.0.attn.add_k_proj" in a
    for path in a:
        delta_a, delta_b = a[path][0] @ a[path][1], b[path][0] @ b[path][1]
        np.testing.assert_allclose(delta_a, delta_b, rtol=1e-5, atol=1e-7)
    # kohya's fused qkv: lora_down shared, lora_up split in three; alpha / rank = 1/8 applied
    down = kohya["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].numpy()
    up = kohya["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"].numpy()
    want = (up[D:2 * D] @ down).T / 8  # the k rows
    got = a["transformer_blocks.0.attn.add_k_proj"][0] @ a["transformer_blocks.0.attn.add_k_proj"][1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_peft_folder_metadata_scaling(targets, tmp_path):
    folder = write_peft_adapter(tmp_path / "peft", seed=0, rank=4, alpha=8.0)
    file = read_lora_file(folder)
    assert file.path.name == LORA_WEIGHT_NAME and file.metadata["transformer.lora_alpha"] == 8.0
    lora = registry(targets)
    lora.load(folder, "style")
    down, up = lora.adapters["style"].factors["transformer_blocks.0.attn.to_q"]
    want = (file.tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
            @ file.tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]).T * 8 / 4
    np.testing.assert_allclose(down @ up, want, rtol=1e-6)
    meta = {"r": 4, "lora_alpha": 8, "rank_pattern": {"proj_out": 2}, "alpha_pattern": {"x_embedder": 3}}
    assert peft_scaling("proj_out", 2, meta) == 4.0 and peft_scaling("x_embedder", 4, meta) == 0.75
    assert peft_scaling("a.to_q", 4, {**meta, "use_rslora": True}) == 4.0
    assert peft_scaling("a.to_q", 4, None) == 1.0  # no metadata: alpha = r, as diffusers' get_peft_kwargs


def _diffusers_file(tmp_path, tensors):
    return write_tensors(tmp_path / "x.safetensors", {f"transformer.{k}": torch.as_tensor(v) for k, v in tensors.items()})


def _pair(module: str, rank: int, fan_in: int, fan_out: int) -> dict:
    return {f"{module}.lora_A.weight": np.ones((rank, fan_in), np.float32),
            f"{module}.lora_B.weight": np.ones((fan_out, rank), np.float32)}


def test_every_bad_key_is_named(targets, tmp_path):
    lora = registry(targets)
    tensors = {**_pair("transformer_blocks.0.attn.to_q", 2, D, D), "transformer_blocks.0.attn.to_q.lora_C.weight":
               np.ones(2, np.float32), "text_model.layer.lora_A.weight": np.ones((2, 3), np.float32)}
    with pytest.raises(ValueError, match=r"2 keys .*lora_C.*text_model.layer \(has no lora_B"):
        lora.load(_diffusers_file(tmp_path, tensors))
    tensors = {**_pair("transformer_blocks.7.attn.to_q", 2, D, D), **_pair("transformer_blocks.0.attn.to_k", 2, D + 1, D),
               **_pair("guidance_embedder.linear_1", 2, 4, D)}
    with pytest.raises(ValueError, match=r"2 layers the transformer does not have: guidance_embedder.linear_1, "
                                         r"transformer_blocks.7.attn.to_q; 1 shape mismatches: transformer_blocks.0.attn.to_k"):
        lora.load(_diffusers_file(tmp_path, tensors))
    kohya = kohya_tensors(seed=0)
    kohya["lora_te1_text_model_encoder.lora_down.weight"] = torch.ones(2, 4)
    with pytest.raises(ValueError, match="lora_te1_text_model_encoder"):
        lora.load(write_tensors(tmp_path / "k.safetensors", kohya))
    assert lora.adapters == {}  # nothing half-loaded


def test_names_weights_and_scales_are_checked(targets, tmp_path):
    lora = registry(targets)
    path = write_tensors(tmp_path / "k.safetensors", kohya_tensors(seed=0))
    assert lora.load(path) == "default_0" and lora.load(path) == "default_1"
    with pytest.raises(ValueError, match="already in use"):
        lora.load(path, "default_0")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'x'; loaded: default_0, default_1"):
        lora.set_active(["x"])
    with pytest.raises(ValueError, match="1 adapter weights given for 2"):
        lora.set_active(["default_0", "default_1"], [0.5])
    lora.set_active(["default_0", "default_1"], [0.5, None])
    assert lora.active == (("default_0", 0.5), ("default_1", 1.0))
    with pytest.raises(ValueError, match=r"lora 'nope' is not a loaded adapter; available: default_0, default_1"):
        lora.choose("nope", 1.0)
    with pytest.raises(ValueError, match=r"lora_scale=4.5 must be a finite number in \[-4, 4\]"):
        lora.choose("default_0", 4.5)
    with pytest.raises(ValueError, match="lora_scale was given without lora"):
        lora.choose(None, 1.0)
    assert lora.choose("default_1", -2) == (("default_1", -2.0),)
    lora.unload()
    assert lora.adapters == {} and lora.active == ()


def test_inputs_are_padded_and_weighted(targets, tmp_path):
    lora = registry(targets)
    lora.load(write_tensors(tmp_path / "a.safetensors", kohya_tensors(seed=0, rank=4)), "a")
    lora.load(write_tensors(tmp_path / "b.safetensors", kohya_tensors(seed=1, rank=6)), "b")
    single, inputs = lora.inputs((("a", 0.5),))
    assert single.rank == 8 and lora.inputs((("b", 2.0),))[0] == single  # one program serves either adapter
    np.testing.assert_array_equal(inputs["weights"], [0.5] * 4 + [0] * 4)
    both, inputs = lora.inputs((("a", 0.5), ("b", 2.0)))
    assert both.rank == 16 and both.targets == single.targets
    np.testing.assert_array_equal(inputs["weights"], [0.5] * 4 + [2.0] * 6 + [0] * 6)
    index = [t[0] for t in both.targets].index("x_embedder")
    down, up = np.asarray(inputs["down"][index]), np.asarray(inputs["up"][index])
    a, b = lora.adapters["a"].factors["x_embedder"], lora.adapters["b"].factors["x_embedder"]
    np.testing.assert_array_equal(down[:, :4], a[0])
    np.testing.assert_array_equal(up[4:10], b[1])
    assert not down[:, 10:].any() and not up[10:].any()


def test_kron_matmul_is_x_times_kron_transposed():
    rng = np.random.default_rng(0)
    w1, w2, x = rng.standard_normal((3, 4)), rng.standard_normal((5, 2)), rng.standard_normal((7, 8))
    np.testing.assert_allclose(np.asarray(kron_matmul(x, w1, w2)), x @ np.kron(w1, w2).T, rtol=1e-5)


def test_lokr_placements(targets, tmp_path):
    """A BFL fused-qkv delta lands on our q/k/v layers as rows 0:D, D:2D, 2D:3D."""
    lora = registry(targets)
    lora.load(write_tensors(tmp_path / "bfl.safetensors", lokr_tensors(lokr_parts(seed=0, fused=True), "bfl")), "bfl")
    terms = [t for t in lora.adapters["bfl"].lokr if t.path.startswith("transformer_blocks.0.attn.to_")]
    assert sorted((t.start, t.stop, t.path.rsplit(".", 1)[1]) for t in terms) == [
        (0, D, "to_out"), (0, D, "to_q"), (D, 2 * D, "to_k"), (2 * D, 3 * D, "to_v")]


def test_bad_lokr_files_are_named(targets, tmp_path):
    lora = registry(targets)
    parts = lokr_parts(seed=0, fused=False)
    tensors = lokr_tensors(parts, "bare")
    del tensors["transformer_blocks.0.attn.to_q.lokr_w1"]
    tensors["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.ones(2, D)
    with pytest.raises(ValueError, match=r"2 keys .*to_q.lora_A.weight; transformer_blocks.0.attn.to_q \(has no lokr_w1"):
        lora.load(write_tensors(tmp_path / "a.safetensors", tensors))
    tensors = lokr_tensors(parts, "bare")
    tensors["transformer_blocks.9.attn.to_q.lokr_w1"] = tensors.pop("transformer_blocks.0.attn.to_q.lokr_w1")
    tensors["transformer_blocks.9.attn.to_q.lokr_w2"] = tensors.pop("transformer_blocks.0.attn.to_q.lokr_w2")
    tensors["transformer_blocks.9.attn.to_q.alpha"] = tensors.pop("transformer_blocks.0.attn.to_q.alpha")
    tensors["transformer_blocks.0.ff.linear_in.lokr_w1"] = tensors["transformer_blocks.0.ff.linear_in.lokr_w1"][:2].clone()
    with pytest.raises(ValueError, match=r"1 layers the transformer does not have: transformer_blocks.9.attn.to_q; "
                                         r"1 shape mismatches: transformer_blocks.0.ff.linear_in"):
        lora.load(write_tensors(tmp_path / "b.safetensors", tensors))
    with pytest.raises(ValueError, match=r"1 keys .*transformer.transformer_blocks.0.attn.to_q.alpha"):
        lora.load(write_tensors(tmp_path / "c.safetensors", lokr_tensors(parts, "transformer") | {
            "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(2.0)}))
    assert lora.adapters == {}
