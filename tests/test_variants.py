"""Model variants (shared/spec/interfaces.md): model_index.json's _class_name (and is_distilled) decides between
distilled, base and kv; every other pipeline class is refused, by klein-convert and by from_pretrained alike."""

import json
import pathlib
import shutil

import pytest
from fake_hub import serve_folder_as_hub_repo

from convert.cli import main as convert_main
from klein_jax.configs import Variant
from klein_jax.loading import MANIFEST, ConversionError, load_components, open_source
from klein_jax.loading.source import pipeline_variant
from klein_jax.pipeline import KleinPipeline
from server.__main__ import parse_models

KV_REPO_ID = "black-forest-labs/FLUX.2-klein-9b-kv"
SUPPORTED = ("Flux2KleinPipeline (FLUX.2 [klein] 4B/9B, distilled or base)",
             "Flux2KleinKVPipeline (FLUX.2 [klein] 9B KV)")
# model_index.json classes klein-jax must refuse (FLUX.2 [dev], klein inpainting, another family) and what the
# message says about each; None: no _class_name at all.
REFUSED = {
    "Flux2Pipeline": "has _class_name 'Flux2Pipeline'",
    "Flux2KleinInpaintPipeline": "has _class_name 'Flux2KleinInpaintPipeline'",
    "StableDiffusionXLPipeline": "has _class_name 'StableDiffusionXLPipeline'",
    None: "has no _class_name",
}


@pytest.mark.parametrize("index, variant", [
    ({"_class_name": "Flux2KleinPipeline", "is_distilled": True}, Variant.DISTILLED),
    ({"_class_name": "Flux2KleinPipeline", "is_distilled": False}, Variant.BASE),
    ({"_class_name": "Flux2KleinPipeline"}, Variant.BASE),  # the klein-base repos omit is_distilled
    ({"_class_name": "Flux2KleinKVPipeline"}, Variant.KV),  # FLUX.2-klein-9b-kv has no is_distilled either
    ({"_class_name": "Flux2KleinKVPipeline", "is_distilled": False}, Variant.KV),
])
def test_variant_of_model_index(index, variant):
    got = pipeline_variant(index, "model_index.json")
    assert got is variant and got.is_distilled == (variant is not Variant.BASE)


@pytest.mark.parametrize("class_name", list(REFUSED), ids=str)
def test_other_pipeline_classes_are_refused_by_name(class_name):
    index = {"is_distilled": True} if class_name is None else {"_class_name": class_name, "is_distilled": True}
    with pytest.raises(ConversionError) as info:
        pipeline_variant(index, "/x/model_index.json")
    message = str(info.value)
    assert message == f"/x/model_index.json {REFUSED[class_name]}: klein-jax runs only {', '.join(SUPPORTED)}"


# ---------------------------------------------------------------------------------- folders, converter, loader


def _with_class(folder: pathlib.Path, class_name: str | None) -> None:
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.pop("_class_name")
    if class_name is not None:
        index["_class_name"] = class_name
    path.write_text(json.dumps(index))


def _convert_fails(argv: list[str], capsys) -> str:
    """klein-convert exits 1 with one error line, writes nothing; returns the line."""
    out = pathlib.Path(argv[1])
    assert convert_main([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("klein-convert: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))
    return lines[0]


@pytest.mark.parametrize("class_name", list(REFUSED), ids=str)
def test_klein_convert_and_from_pretrained_refuse_other_classes(class_name, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint.diffusers, src)
    _with_class(src, class_name)
    line = _convert_fails([str(src), str(tmp_path / "out")], capsys)
    want = f"{src / 'model_index.json'} {REFUSED[class_name]}: klein-jax runs only {', '.join(SUPPORTED)}"
    assert line == f"klein-convert: error: {want}"
    with pytest.raises(ConversionError) as info:
        KleinPipeline.from_pretrained(src, "float32")
    assert str(info.value) == want
    converted = tmp_path / "converted"  # a klein-convert folder whose model_index.json names another class
    shutil.copytree(tiny_checkpoint.klein, converted)
    _with_class(converted, class_name)
    with pytest.raises(ConversionError, match=REFUSED[class_name]):
        load_components(converted, "float32")


def test_kv_folder_loads_as_kv(tiny_kv_checkpoint, tiny_kv_pipeline, tiny_pipeline, tiny_base_pipeline):
    """The KV checkpoint (no is_distilled) is kv, never base: 4 steps, no guidance, kept through klein-convert."""
    source_index = json.loads((tiny_kv_checkpoint.diffusers / "model_index.json").read_text())
    assert source_index["_class_name"] == "Flux2KleinKVPipeline" and "is_distilled" not in source_index
    assert open_source(tiny_kv_checkpoint.diffusers).variant is Variant.KV
    converted_index = json.loads((tiny_kv_checkpoint.klein / "model_index.json").read_text())
    assert converted_index["_class_name"] == "Flux2KleinKVPipeline"
    assert json.loads((tiny_kv_checkpoint.klein / MANIFEST).read_text())["variant"] == "kv"
    info = tiny_kv_pipeline.model_info
    assert (info["variant"], info["is_distilled"], info["steps"], info["guidance_scale"]) == ("kv", True, 4, None)
    assert tiny_kv_pipeline.kv_cache and tiny_kv_pipeline.prepare("a cat", guidance_scale=4.0).guidance_scale is None
    assert tiny_pipeline.model_info["variant"] == "distilled" and not tiny_pipeline.kv_cache
    assert tiny_base_pipeline.model_info["variant"] == "base" and tiny_base_pipeline.model_info["steps"] == 50


def test_kv_cache_needs_a_distilled_model(tiny_kv_pipeline):
    modules = (tiny_kv_pipeline.transformer, tiny_kv_pipeline.vae, tiny_kv_pipeline.text_encoder,
               tiny_kv_pipeline.tokenizer)
    with pytest.raises(ValueError, match="cannot be a base model"):
        KleinPipeline(*modules, is_distilled=False, kv_cache=True)


# ------------------------------------------------------------------------------------------------------- hub


def test_kv_hub_id_converts_and_loads_as_kv(tiny_kv_checkpoint, tmp_path, monkeypatch):
    calls = serve_folder_as_hub_repo(tiny_kv_checkpoint.diffusers, KV_REPO_ID, tmp_path / "hub-cache", monkeypatch)
    out = tmp_path / "out"
    assert convert_main([KV_REPO_ID, str(out), "--dtype", "float32", "--no-progress"]) == 0
    assert len(calls) == 2  # metadata, then weights
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "Flux2KleinKVPipeline"
    assert json.loads((out / MANIFEST).read_text())["variant"] == "kv"
    pipe = KleinPipeline.from_pretrained(KV_REPO_ID, "float32")  # in memory from the hub id too
    assert pipe.model_info["variant"] == "kv" and pipe.kv_cache
    # klein-serve --model ID=SRC serves it under its own id (docs/kv.md)
    assert parse_models([f"flux2-klein-9b-kv={KV_REPO_ID}", "models/klein-4b"]) == {
        "flux2-klein-9b-kv": KV_REPO_ID, "flux2-klein-4b": "models/klein-4b"}


def test_refused_hub_repo_downloads_no_weights(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    remote = tmp_path / "remote"
    shutil.copytree(tiny_checkpoint.diffusers, remote)
    _with_class(remote, "Flux2Pipeline")
    calls = serve_folder_as_hub_repo(remote, "black-forest-labs/FLUX.2-dev", tmp_path / "hub-cache", monkeypatch)
    line = _convert_fails(["black-forest-labs/FLUX.2-dev", str(tmp_path / "out")], capsys)
    assert "black-forest-labs/FLUX.2-dev: model_index.json has _class_name 'Flux2Pipeline'" in line
    assert len(calls) == 1 and not any(p.endswith(".safetensors") for p in calls[0][2])  # the metadata pass only
