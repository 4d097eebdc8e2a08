"""LoRA adapters in klein-serve (the lora / lora_scale fields of shared/spec/api.md) and klein-generate --lora."""

import numpy as np
import pytest
from lora_support import kohya_tensors, write_tensors
from server_support import AppClient, decode_png

from klein_jax.cli import main as generate_main
from klein_jax.demo import build_demo_pipeline
from klein_jax.lora.files import parse_lora_spec
from server.__main__ import _parse_loras
from server.app import create_app
from server.settings import Settings

KEY = "test-key"


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-lora")
    return {name: write_tensors(root / f"{name}.safetensors", kohya_tensors(seed=seed, scale=1.0))
            for seed, name in enumerate(("ink", "style"))}


@pytest.fixture(scope="module")
def client(adapter_paths):
    pipe = build_demo_pipeline()
    pipe.lora.load(adapter_paths["ink"], "ink", default_scale=0.5)
    pipe.lora.load(adapter_paths["style"], "style")
    pipe.set_adapters([])
    settings = Settings(api_keys=(KEY,), aspect_ratios=("landscape",), compile_references=0, max_batch=1)
    app_client = AppClient(create_app({"flux2-klein-4b": pipe}, settings))
    app_client.pipe = pipe
    yield app_client
    app_client.close()


def image(answer) -> np.ndarray:
    assert answer.status == 200, answer.body[:300]
    return np.asarray(decode_png(answer.body))


def test_requests_pick_adapters_and_compile_nothing(client):
    before = client.pipe.compile_count  # start-up compiled the plain and the LoRA programs
    plain = image(client.generate({"prompt": "p", "seed": "1"}))
    ink = image(client.generate({"prompt": "p", "seed": "1", "lora": "ink"}))
    ink_strong = image(client.generate({"prompt": "p", "seed": "1", "lora": "ink", "lora_scale": "-3"}))
    style = image(client.generate({"prompt": "p", "seed": "1", "lora": "style"}))
    assert client.pipe.compile_count == before
    default = client.pipe.prepare("p", width=64, height=64, lora="ink")
    assert default.lora == (("ink", 0.5),)  # --lora NAME=PATH:0.5 is the default scale
    distinct = {a.tobytes() for a in (plain, ink, ink_strong, style)}
    assert len(distinct) == 4


def test_lora_fields_are_validated(client):
    answer = client.generate({"prompt": "p", "lora": "nope"})
    assert answer.status == 422 and answer.json() == {"detail": "lora 'nope' is not loaded; this server has: ink, style"}
    for scale in ("4.5", "nan", "x", "-inf"):
        answer = client.generate({"prompt": "p", "lora": "ink", "lora_scale": scale})
        assert answer.status == 422 and "lora_scale" in answer.json()["detail"], scale
    answer = client.generate({"prompt": "p", "lora_scale": "1"})
    assert answer.status == 422 and "without lora" in answer.json()["detail"]


def test_readyz_and_openapi_list_the_adapters(client):
    ready = client.request("GET", "/readyz").json()
    assert ready["lora_adapters"] == {"ink": {"default_scale": 0.5}, "style": {"default_scale": 1.0}}
    doc = client.request("GET", "/openapi.json").json()
    fields = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert fields["properties"]["lora"]["enum"] == ["ink", "style"]


def test_lora_arguments():
    assert parse_lora_spec("a/b.safetensors") == (None, "a/b.safetensors", None)
    assert parse_lora_spec("owner/name:0.8") == (None, "owner/name", 0.8)
    assert parse_lora_spec("c:/x.safetensors") == (None, "c:/x.safetensors", None)
    assert _parse_loras(["ink=x.safetensors:-1.5", "b=y"]) == [("ink", "x.safetensors", -1.5), ("b", "y", None)]
    with pytest.raises(ValueError, match="NAME=PATH"):
        _parse_loras(["x.safetensors"])
    with pytest.raises(ValueError, match="names repeat: a"):
        _parse_loras(["a=x", "a=y"])


def test_generate_cli_with_lora(adapter_paths, tmp_path, capsys):
    common = ["--demo", "--prompt", "p", "--width", "64", "--height", "64", "--seed", "3", "--no-progress",
              "--compilation-cache", "none"]
    assert generate_main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert generate_main([*common, "--lora", f"{adapter_paths['ink']}:2", "--out", str(tmp_path / "ink.png")]) == 0
    plain, ink = (np.asarray(decode_png((tmp_path / f"{n}.png").read_bytes())) for n in ("plain", "ink"))
    assert not np.array_equal(plain, ink)
    assert generate_main([*common, "--lora", str(tmp_path / "missing.safetensors")]) == 1
    assert "LoRA adapter not found" in capsys.readouterr().err
