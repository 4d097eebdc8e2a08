"""The BFL single-file transformer layout: rename table against diffusers' own converter, and conversion to the
same parameters as the diffusers folder made from the same weights."""

import json

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors.numpy import load_file, save_file
from tiny_pipeline import diffusers_to_bfl, make_bfl_transformer_file, make_tiny_diffusers_pipeline, tiny_transformer

from klein_jax.loading import checkpoint
from convert.cli import main
from klein_jax.loading import MANIFEST
from klein_jax.loading.keymaps.bfl import BFLTransformer, bfl_to_diffusers, is_bfl_layout, split_qkv, swap_halves
from klein_jax.configs import TransformerConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny diffusers pipeline, its transformer as a BFL single file, and the folder converted (float32)."""
    root = tmp_path_factory.mktemp("bfl")
    src = make_tiny_diffusers_pipeline(root / "src", seed=5)
    state = load_file(str(src / "transformer" / "diffusion_pytorch_model.safetensors"))
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    bfl = make_bfl_transformer_file(tensors, root / "flux-2-klein.safetensors")
    out = root / "out"
    assert main([str(src), str(out), "--dtype", "float32", "--no-progress"]) == 0
    return {"root": root, "src": src, "state": state, "bfl": bfl, "out": out}


def _params(folder, component="transformer") -> dict:
    path = folder / component / "params"
    return {k: np.asarray(v) for k, v in checkpoint.restore_params(path, checkpoint.saved_shapes(path)).items()}


def _assert_same(a, b, components=("transformer",)):
    for component in components:
        pa, pb = _params(a, component), _params(b, component)
        assert pa.keys() == pb.keys()
        for k in pa:
            assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), f"{component} {k}"


def test_split_and_swap_by_hand():
    w = np.arange(12).reshape(6, 2)
    q, k, v = split_qkv(w)
    np.testing.assert_array_equal(q, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(k, [[4, 5], [6, 7]])
    np.testing.assert_array_equal(v, [[8, 9], [10, 11]])
    np.testing.assert_array_equal(swap_halves(np.arange(8).reshape(4, 2)), [[4, 5], [6, 7], [0, 1], [2, 3]])


@pytest.mark.parametrize("config", [
    TransformerConfig(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
                      joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2)),
    TransformerConfig(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=3,
                      joint_attention_dim=12, timestep_guidance_channels=32, mlp_ratio=2.0,
                      axes_dims_rope=(4, 4, 4, 4)),
])
def test_rename_table_equals_diffusers_converter(config):
    """Our lazy BFL view == diffusers' convert_flux2_transformer_checkpoint_to_diffusers on the same BFL dict."""
    state = tiny_transformer(config, seed=1).state_dict()
    bfl = diffusers_to_bfl(state)
    want = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in bfl.items()})
    assert want.keys() == state.keys()  # the fixture's inverse mapping round-trips through diffusers' converter
    for k in state:
        assert torch.equal(want[k], state[k]), k
    view = BFLTransformer({k: v.numpy() for k, v in bfl.items()})
    assert set(view) == set(want)
    for k in want:
        np.testing.assert_array_equal(view[k], want[k].numpy(), err_msg=k)


def test_prefix_and_layout_detection():
    tensors = {"model.diffusion_model.img_in.weight": np.ones((2, 2)), "model.diffusion_model.foo": np.zeros(1)}
    assert is_bfl_layout(tensors)
    view = bfl_to_diffusers(tensors)
    assert set(view) == {"x_embedder.weight", "foo"}  # unknown names pass through, to be reported as unexpected
    assert view.source_name("x_embedder.weight") == "model.diffusion_model.img_in.weight"
    plain = {"x_embedder.weight": np.ones((2, 2))}
    assert not is_bfl_layout(plain) and bfl_to_diffusers(plain) is plain


def test_bfl_file_converts_to_the_same_params(tiny, tmp_path):
    out = tmp_path / "out"
    assert main([str(tiny["src"]), str(out), "--transformer", str(tiny["bfl"]), "--dtype", "float32",
                 "--no-progress"]) == 0
    _assert_same(out, tiny["out"], components=("transformer", "vae", "text_encoder"))
    assert json.loads((out / MANIFEST).read_text())["transformer_file"] == str(tiny["bfl"])


def test_comfy_prefixed_bfl_file(tiny, tmp_path):
    state = {k: torch.from_numpy(v) for k, v in tiny["state"].items()}
    bfl = make_bfl_transformer_file(state, tmp_path / "comfy.safetensors", prefix="model.diffusion_model.")
    out = tmp_path / "out"
    assert main([str(tiny["src"]), str(out), "--transformer", str(bfl), "--dtype", "float32", "--no-progress"]) == 0
    _assert_same(out, tiny["out"])


def test_diffusers_named_single_file(tiny, tmp_path):
    """--transformer also takes a diffusers-named single file (e.g. a fine-tune saved by diffusers)."""
    out = tmp_path / "out"
    file = tiny["src"] / "transformer" / "diffusion_pytorch_model.safetensors"
    assert main([str(tiny["src"]), str(out), "--transformer", str(file), "--dtype", "float32", "--no-progress"]) == 0
    _assert_same(out, tiny["out"])


def _error_line(argv, capsys) -> str:
    out = argv[1]
    assert main([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("klein-convert: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    from pathlib import Path
    assert not Path(out).exists()
    return lines[0]


def _rewrite(tiny, tmp_path, edit):
    tensors = edit(load_file(str(tiny["bfl"])))
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path))
    return path


def test_bfl_unexpected_key_listed(tiny, tmp_path, capsys):
    # FLUX.2-dev has a guidance embedder, klein does not
    path = _rewrite(tiny, tmp_path, lambda t: {**t, "guidance_in.in_layer.weight": np.zeros((4, 4), np.float32)})
    line = _error_line([str(tiny["src"]), str(tmp_path / "out"), "--transformer", str(path)], capsys)
    assert "unexpected keys (1)" in line and "guidance_in.in_layer.weight" in line


def test_bfl_missing_qkv_listed(tiny, tmp_path, capsys):
    gone = "double_blocks.0.txt_attn.qkv.weight"
    path = _rewrite(tiny, tmp_path, lambda t: {k: v for k, v in t.items() if k != gone})
    line = _error_line([str(tiny["src"]), str(tmp_path / "out"), "--transformer", str(path)], capsys)
    assert "missing weights (3)" in line
    for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
        assert f"transformer_blocks.0.attn.{name}.kernel" in line


def test_bfl_shape_mismatch_named(tiny, tmp_path, capsys):
    path = _rewrite(tiny, tmp_path, lambda t: {**t, "final_layer.linear.weight": np.zeros((64, 32), np.float32)})
    line = _error_line([str(tiny["src"]), str(tmp_path / "out"), "--transformer", str(path)], capsys)
    assert "shape mismatches" in line and "proj_out.weight (BFL final_layer.linear.weight)" in line
    assert "[32, 64]" in line and "[32, 128]" in line


def test_bad_transformer_files(tiny, tmp_path, capsys):
    line = _error_line([str(tiny["src"]), str(tmp_path / "out"), "--transformer", str(tmp_path / "none.safetensors")],
                       capsys)
    assert "transformer file not found" in line
    path = tmp_path / "other.safetensors"
    save_file({"encoder.conv_in.weight": np.zeros((2, 2), np.float32)}, str(path))
    line = _error_line([str(tiny["src"]), str(tmp_path / "out"), "--transformer", str(path)], capsys)
    assert "unknown transformer layout" in line
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny["bfl"].read_bytes()[:-100])
    line = _error_line([str(tiny["src"]), str(tmp_path / "out"), "--transformer", str(truncated)], capsys)
    assert "truncated" in line
