"""klein-convert and load_components on generated tiny pipelines, against the diffusers/transformers reference."""

import contextlib
import io
import json
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import assert_close
from fake_hub import serve_folder_as_hub_repo
from flax import nnx
from safetensors.numpy import load_file, save_file
from tiny_pipeline import OUT_LAYERS_KEY, load_reference_pipeline, make_tiny_diffusers_pipeline

from klein_jax.loading import checkpoint
from convert.cli import main
from klein_jax.loading import MANIFEST, load_components, open_source
from klein_jax.loading import OUT_LAYERS_KEY as COMPONENTS_OUT_LAYERS_KEY
from klein_jax.loading.keymaps.text_encoder import text_encoder_rules
from klein_jax.configs import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE

PROMPTS = ["a red fox in the snow", "", "two cats, one black and one white, on a sofa"]
REPO_ID = "black-forest-labs/FLUX.2-klein-tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny diffusers pipeline, its reference modules, and its klein-convert output (float32)."""
    root = tmp_path_factory.mktemp("convert")
    src = make_tiny_diffusers_pipeline(root / "src", seed=3)
    out = root / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main([str(src), str(out), "--dtype", "float32"]) == 0
    return {"root": root, "src": src, "out": out, "ref": load_reference_pipeline(src),
            "ours": load_components(out, "float32"), "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


_forward = nnx.jit(lambda module, *inputs: module(*inputs))


def _params(folder: pathlib.Path, component: str) -> dict:
    """The saved arrays of one component of a klein-convert folder, as numpy."""
    path = folder / component / "params"
    restored = checkpoint.restore_params(path, checkpoint.saved_shapes(path))
    return {k: np.asarray(v) for k, v in restored.items()}


def _assert_same_params(a: pathlib.Path, b: pathlib.Path, components=("transformer", "vae", "text_encoder")):
    for component in components:
        pa, pb = _params(a, component), _params(b, component)
        assert pa.keys() == pb.keys(), component
        for k in pa:
            assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), f"{component} {k}"


# --------------------------------------------------------------------------------------------- the output folder


def test_fixture_layout(tiny):
    """The fixture is the hub layout: sharded text encoder with an index, out_layers that fit the tiny depth."""
    src = tiny["src"]
    assert sorted(p.name for p in src.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                     "transformer", "vae"]
    assert len(list((src / "text_encoder").glob("model-*-of-*.safetensors"))) >= 2
    assert (src / "text_encoder" / "model.safetensors.index.json").is_file()
    index = json.loads((src / "model_index.json").read_text())
    assert index["is_distilled"] is True and index[OUT_LAYERS_KEY] == [1, 2, 3]
    assert OUT_LAYERS_KEY == COMPONENTS_OUT_LAYERS_KEY
    assert tiny["ref"].config.is_distilled is True
    assert tiny["ref"].transformer.config.joint_attention_dim == 3 * tiny["ref"].text_encoder.config.hidden_size


def test_output_layout_and_manifest(tiny):
    src, out = tiny["src"], tiny["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"])
    assert not list(out.parent.glob(".out.partial-*"))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["dtype"] == "float32"
    assert manifest["source"] == str(src) and manifest["is_distilled"] is True
    ref = tiny["ref"]
    n_text = sum(p.numel() for n, p in ref.text_encoder.named_parameters()
                 if n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1.", "model.layers.2.")))
    want = {
        "transformer": sum(p.numel() for p in ref.transformer.parameters()),
        "vae": sum(p.numel() for p in ref.vae.parameters()) + 2 * ref.vae.bn.running_mean.numel(),
        "text_encoder": n_text,  # layer 3 and model.norm are never run with out_layers (1, 2, 3)
    }
    for name, count in want.items():
        assert manifest["components"][name]["params"] == count, name
        assert manifest["components"][name]["bytes"] == 4 * count, name
    for f in (src / "tokenizer").iterdir():
        assert (out / "tokenizer" / f.name).read_bytes() == f.read_bytes()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == json.loads(
        (src / "scheduler" / "scheduler_config.json").read_text())
    assert json.loads((out / "model_index.json").read_text())["is_distilled"] is True
    ours = tiny["ours"]
    assert ours.is_distilled is True and ours.transformer.config == TINY_TRANSFORMER and ours.vae.config == TINY_VAE
    assert ours.text_encoder.config.out_layers == (1, 2, 3)
    assert ours.scheduler_config["use_dynamic_shifting"] is True


def test_progress_bars_and_summary(tiny):
    for name in ("transformer", "vae", "text_encoder"):
        assert name in tiny["stderr"] and name in tiny["stdout"]
    assert "100%" in tiny["stderr"]
    assert "wrote" in tiny["stdout"] and "params" in tiny["stdout"] and "on disk" in tiny["stdout"]


# ------------------------------------------------------------------------------------- parity with the reference


def _grid_ids(h: int, w: int) -> np.ndarray:
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([np.zeros(h * w), r.ravel(), c.ravel(), np.zeros(h * w)], -1).astype(np.int64)


def test_transformer_matches_reference(tiny):
    rng = np.random.default_rng(0)
    T, (h, w) = 9, (3, 4)
    inputs = {
        "hidden_states": rng.standard_normal((2, h * w, 128)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((2, T, 96)).astype(np.float32),
        "timestep": np.array([0.9, 0.25], np.float32),
        "img_ids": _grid_ids(h, w),
        "txt_ids": np.stack([np.zeros(T), np.zeros(T), np.zeros(T), np.arange(T)], -1).astype(np.int64),
    }
    with torch.no_grad():
        want = tiny["ref"].transformer(**{k: torch.from_numpy(v) for k, v in inputs.items()}, guidance=None).sample
    got = _forward(tiny["ours"].transformer, *(jnp.asarray(inputs[k]) for k in
                   ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")))
    assert_close(got, want.numpy(), rel=1e-5, name="transformer")


def test_vae_matches_reference(tiny):
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 8, 12, 32)).astype(np.float32)
    vae = tiny["ref"].vae
    with torch.no_grad():
        want_mean = vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).latent_dist.mode()
        want_images = vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).sample
    ours = tiny["ours"].vae
    got_mean = nnx.jit(lambda m, x: m.encode(x))(ours, jnp.asarray(images))
    got_images = nnx.jit(lambda m, z: m.decode(z))(ours, jnp.asarray(latents))
    assert_close(got_mean, want_mean.numpy().transpose(0, 2, 3, 1), rel=1e-5, name="encode")
    assert_close(got_images, want_images.numpy().transpose(0, 2, 3, 1), rel=1e-5, name="decode")
    np.testing.assert_array_equal(np.asarray(ours.bn.running_mean[...]), vae.bn.running_mean.numpy())
    np.testing.assert_array_equal(np.asarray(ours.bn.running_var[...]), vae.bn.running_var.numpy())


def test_text_encoder_matches_reference(tiny):
    with torch.no_grad():
        want, _ = tiny["ref"].encode_prompt(PROMPTS, device="cpu", max_sequence_length=512,
                                            text_encoder_out_layers=TINY_TEXT_ENCODER.out_layers)
    input_ids, attention_mask = tiny["ours"].tokenizer.encode(PROMPTS)
    got = _forward(tiny["ours"].text_encoder, jnp.asarray(input_ids), jnp.asarray(attention_mask))
    assert_close(got, want.numpy(), rel=1e-5, name="prompt_embeds")


def test_diffusers_folder_loads_to_the_same_params(tiny):
    """load_components on the diffusers folder (in-memory conversion) == restoring the converted folder."""
    direct = load_components(tiny["src"], "float32")
    for name in ("transformer", "vae", "text_encoder"):
        a = checkpoint.flatten(checkpoint.nest(_state(getattr(direct, name))))
        b = _state(getattr(tiny["ours"], name))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == np.float32 and np.array_equal(a[k], b[k]), f"{name} {k}"


def _state(module) -> dict:
    from flax import nnx

    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module))}


def test_bfloat16_output(tiny, tmp_path):
    out = tmp_path / "bf16"
    out.mkdir()  # an existing empty OUT is fine
    assert main([str(tiny["src"]), str(out), "--no-progress"]) == 0  # bfloat16 is the default
    assert json.loads((out / MANIFEST).read_text())["dtype"] == "bfloat16"
    for name in ("transformer", "vae", "text_encoder"):
        saved = checkpoint.saved_shapes(out / name / "params")
        assert {d for _, d in saved.values()} == {np.dtype(ml_dtypes.bfloat16)}, name
        f32 = _params(tiny["out"], name)
        for k, v in _params(out, name).items():
            np.testing.assert_array_equal(v, f32[k].astype(ml_dtypes.bfloat16), err_msg=f"{name} {k}")
    loaded = load_components(out, "bfloat16")
    for name in ("transformer", "vae", "text_encoder"):
        assert {v.dtype for v in _state(getattr(loaded, name)).values()} == {np.dtype(ml_dtypes.bfloat16)}, name
    saved = checkpoint.saved_shapes(out / "vae" / "params")
    upcast = checkpoint.restore_params(out / "vae" / "params", {k: (s, jnp.float32) for k, (s, _) in saved.items()})
    assert {v.dtype for v in upcast.values()} == {np.dtype(np.float32)}  # orbax casts on read


def test_base_model_is_not_distilled(tiny, tmp_path):
    src = tmp_path / "base"
    shutil.copytree(tiny["src"], src)
    index = json.loads((src / "model_index.json").read_text())
    del index["is_distilled"]  # the klein-base repos omit it: diffusers' default is False
    (src / "model_index.json").write_text(json.dumps(index))
    assert open_source(src).is_distilled is False
    assert open_source(tiny["src"]).is_distilled is True


# ------------------------------------------------------------------------------------------------- bad inputs


def _copy_src(tiny, tmp_path) -> pathlib.Path:
    src = tmp_path / "src"
    shutil.copytree(tiny["src"], src)
    return src


def _edit_weights(folder: pathlib.Path, edit) -> None:
    """Rewrites the single safetensors file of a component folder with `edit(dict) -> dict`."""
    (file,) = folder.glob("*.safetensors")
    tensors = edit(load_file(str(file)))
    save_file(tensors, str(file))


def _fails(argv, capsys, *needles) -> str:
    """main(argv) must exit 1 with one 'klein-convert: error:' line on stderr containing every needle."""
    out = pathlib.Path(argv[1])
    before = sorted(out.iterdir()) if out.is_dir() else None
    assert main([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("klein-convert: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert (sorted(out.iterdir()) if out.is_dir() else None) == before, "OUT was touched"
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "a temporary folder was left behind"
    return lines[0]


def test_missing_source(tmp_path, capsys):
    _fails([str(tmp_path / "nowhere" / "klein"), str(tmp_path / "out")], capsys, "source not found", "nowhere")


def test_unknown_layouts(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails([str(tmp_path / "empty"), str(tmp_path / "out")], capsys, "unknown source layout", "model_index.json")
    file = tiny["src"] / "vae" / "diffusion_pytorch_model.safetensors"
    _fails([str(file), str(tmp_path / "out")], capsys, "unknown source layout", "--transformer")
    _fails([str(tiny["out"]), str(tmp_path / "out")], capsys, "already a klein-convert folder")


def test_truncated_safetensors(tiny, tmp_path, capsys):
    src = _copy_src(tiny, tmp_path)
    file = src / "transformer" / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _fails([str(src), str(tmp_path / "out")], capsys, "truncated", "diffusion_pytorch_model.safetensors")


def test_missing_shard_and_config(tiny, tmp_path, capsys):
    src = _copy_src(tiny, tmp_path)
    shard = sorted((src / "text_encoder").glob("model-*.safetensors"))[-1]
    shard.unlink()
    _fails([str(src), str(tmp_path / "out")], capsys, "not found", shard.name)
    shutil.rmtree(src)
    src = _copy_src(tiny, tmp_path)
    (src / "vae" / "config.json").unlink()
    _fails([str(src), str(tmp_path / "out")], capsys, "not found", "config.json")
    shutil.rmtree(src)
    src = _copy_src(tiny, tmp_path)
    shutil.rmtree(src / "tokenizer")
    _fails([str(src), str(tmp_path / "out")], capsys, "tokenizer folder not found")


def test_unexpected_key_listed(tiny, tmp_path, capsys):
    src = _copy_src(tiny, tmp_path)
    _edit_weights(src / "vae", lambda t: {**t, "encoder.extra_block.weight": np.zeros((2, 2), np.float32)})
    _fails([str(src), str(tmp_path / "out")], capsys, "unexpected keys (1)", "encoder.extra_block.weight")


def test_missing_keys_listed(tiny, tmp_path, capsys):
    src = _copy_src(tiny, tmp_path)
    gone = ("transformer_blocks.0.attn.to_k.weight", "proj_out.weight")
    _edit_weights(src / "transformer", lambda t: {k: v for k, v in t.items() if k not in gone})
    _fails([str(src), str(tmp_path / "out")], capsys, "missing weights (2)", "transformer_blocks.0.attn.to_k.kernel",
           "proj_out.kernel")


def test_shape_mismatch_named(tiny, tmp_path, capsys):
    src = _copy_src(tiny, tmp_path)
    _edit_weights(src / "transformer", lambda t: {**t, "x_embedder.weight": np.zeros((32, 100), np.float32)})
    _fails([str(src), str(tmp_path / "out")], capsys, "shape mismatches", "x_embedder.weight", "[100, 32]",
           "[128, 32]")


def test_out_not_empty_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails([str(tiny["src"]), str(out)], capsys, "not an empty folder")
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_while_writing_leaves_out_untouched(tiny, tmp_path, capsys, monkeypatch):
    save = checkpoint.save_params

    def failing_save(path, params):
        if "text_encoder" in str(path):
            raise OSError(28, "No space left on device", str(path))
        save(path, params)

    monkeypatch.setattr(checkpoint, "save_params", failing_save)
    (tmp_path / "out").mkdir()
    _fails([str(tiny["src"]), str(tmp_path / "out")], capsys, "No space left on device")


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--dtype", "--transformer", "bfloat16", "float32", "SRC".lower()):
        assert flag in help_text
    with pytest.raises(SystemExit) as e:
        main(["src", "out", "--dtype", "float16"])
    assert e.value.code == 2
    done = subprocess.run([sys.executable, "-m", "convert", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "klein-convert" in done.stdout


# ------------------------------------------------------------------------------------------------------ hub


@pytest.fixture
def fake_hub(tiny, tmp_path, monkeypatch):
    """A stand-in for huggingface_hub.snapshot_download serving the tiny pipeline (plus a root BFL file)."""
    remote = tmp_path / "remote"
    shutil.copytree(tiny["src"], remote)
    (remote / "flux-2-klein-tiny.safetensors").write_bytes(b"BFL single file: must never be downloaded")
    cache = tmp_path / "hub-cache" / "snapshot"
    calls = serve_folder_as_hub_repo(remote, REPO_ID, cache, monkeypatch)
    return {"calls": calls, "cache": cache, "remote": remote}


def test_hub_id_downloads_only_needed_files(tiny, fake_hub, tmp_path):
    out = tmp_path / "out"
    assert main([REPO_ID, str(out), "--dtype", "float32", "--no-progress"]) == 0
    _assert_same_params(out, tiny["out"])
    assert json.loads((out / MANIFEST).read_text())["source"] == REPO_ID
    assert len(fake_hub["calls"]) == 2  # metadata, then weights
    cache = fake_hub["cache"]
    assert not (cache / "flux-2-klein-tiny.safetensors").exists()
    assert (cache / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    # only the text-encoder shards that hold layers 0..2 or the embedding (layer 3 is never run)
    index = json.loads((tiny["src"] / "text_encoder" / "model.safetensors.index.json").read_text())["weight_map"]
    rules = text_encoder_rules(TINY_TEXT_ENCODER)
    needed = {f for k, f in index.items() if any(r._regex.fullmatch(k) and r.target for r in rules)}
    assert {p.name for p in (cache / "text_encoder").glob("*.safetensors")} == needed
    assert needed != set(index.values()), "the fixture should have a shard that is not needed"


def test_hub_with_bfl_transformer_skips_transformer_weights(tiny, fake_hub, tmp_path):
    from tiny_pipeline import make_bfl_transformer_file

    bfl = make_bfl_transformer_file(tiny["ref"].transformer.state_dict(), tmp_path / "bfl.safetensors")
    assert main([REPO_ID, str(tmp_path / "out"), "--transformer", str(bfl), "--no-progress"]) == 0
    assert not (fake_hub["cache"] / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert (fake_hub["cache"] / "transformer" / "config.json").exists()
    loaded = load_components(REPO_ID, "float32")  # hub ids load in memory too
    assert loaded.transformer.config == TINY_TRANSFORMER


def test_hub_errors_are_one_line(fake_hub, tmp_path, capsys):
    _fails(["someone/not-a-repo", str(tmp_path / "out")], capsys, "could not download", "someone/not-a-repo",
           "404")


def test_unsupported_scheduler_config_is_refused(tiny, tmp_path, capsys):
    """use_karras_sigmas=true would change the schedule: exit 1 with one line naming it, nothing written; the
    loader refuses it too."""
    from klein_jax.loading import ConversionError

    src = _copy_src(tiny, tmp_path)
    path = src / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_karras_sigmas": True}))
    _fails([str(src), str(tmp_path / "out")], capsys, str(path), "use_karras_sigmas=true (supported: false)")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="use_karras_sigmas=true"):
        load_components(src, "float32")
