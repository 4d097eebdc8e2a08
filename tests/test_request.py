"""klein_jax/request.py: the limits at their edges, the workflow names, and one spec for pipeline, CLI and server."""

import json
import pathlib
import re

import numpy as np
import PIL.Image
import pytest
from werkzeug.datastructures import MultiDict

from klein_jax import request as spec
from klein_jax import sampler
from klein_jax.demo import build_demo_pipeline
from klein_jax.request import MAX_PROMPT_CHARS, MAX_REFERENCES, MAX_SEED, Workflow
from server.errors import RequestError
from server.forms import validate_form
from server.openapi import build_openapi
from server.settings import DEFAULT_MODEL_ID, Settings

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_limits_are_the_contracts():
    assert (MAX_SEED, MAX_REFERENCES, MAX_PROMPT_CHARS) == (18446744073709551615, 4, 20000)
    assert (spec.MIN_STEPS, spec.MAX_STEPS) == (1, 1000)


@pytest.mark.parametrize("seed", [0, 1, MAX_SEED, np.uint64(MAX_SEED), np.int32(7)])
def test_seed_edges_accepted(seed):
    assert spec.check_seed(seed) == int(seed) and type(spec.check_seed(seed)) is int


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, True, 1.0, "1", None])
def test_seed_edges_refused(seed):
    with pytest.raises(ValueError, match=rf"seed=.* is not an integer in 0\.\.{MAX_SEED}$"):
        spec.check_seed(seed)


@pytest.mark.parametrize("text, want", [("0", 0), (" 42\n", 42), (str(MAX_SEED), MAX_SEED), ("007", 7)])
def test_parse_seed(text, want):
    assert spec.parse_seed(text) == want


@pytest.mark.parametrize("text", [str(MAX_SEED + 1), "-1", "1.5", "1e3", "1_0", "١٢", "", "0x10", "9" * 21])
def test_parse_seed_refuses(text):
    with pytest.raises(ValueError, match=r"is not an integer in 0\.\."):
        spec.parse_seed(text)


def test_prompt_edges():
    assert spec.check_prompt("a") == "a"
    assert spec.check_prompt(" a ") == " a "  # kept as given: the tokenizer sees what the user wrote
    assert spec.check_prompt("x" * MAX_PROMPT_CHARS) == "x" * MAX_PROMPT_CHARS
    with pytest.raises(ValueError, match=f"prompt is {MAX_PROMPT_CHARS + 1} characters; at most {MAX_PROMPT_CHARS}"):
        spec.check_prompt("x" * (MAX_PROMPT_CHARS + 1))
    for empty in ("", " ", "\t\n "):
        with pytest.raises(ValueError, match="prompt is empty or whitespace only"):
            spec.check_prompt(empty)
    with pytest.raises(ValueError, match="prompt must be a str, got bytes"):
        spec.check_prompt(b"a cat")


def test_steps_edges():
    assert spec.check_steps(1) == 1 and spec.check_steps(1000) == 1000 and spec.check_steps(np.int64(4)) == 4
    for steps in (0, 1001, -4, 4.0, True, None):
        with pytest.raises(ValueError, match=r"num_inference_steps=.* must be an integer in 1\.\.1000"):
            spec.check_steps(steps)


def test_guidance_scale():
    assert spec.check_guidance_scale(None) is None
    assert spec.check_guidance_scale(4) == 4.0 and type(spec.check_guidance_scale(np.float32(4.5))) is float
    for scale in (float("nan"), float("inf"), "4", True):
        with pytest.raises(ValueError, match="must be a finite number"):
            spec.check_guidance_scale(scale)


def test_size_edges():
    assert spec.check_size(16, 16) == (16, 16) and spec.check_size(np.int64(1568), 672) == (1568, 672)
    assert spec.check_size(4, 8, multiple_of=4) == (4, 8)
    for (width, height), message in [((0, 16), "width=0 must be a positive multiple of 16"),
                                     ((16, 24), "height=24 must be a positive multiple of 16"),
                                     ((-16, 16), "width=-16 must be"),
                                     ((16.0, 16), "width=16.0 must be an integer number of pixels"),
                                     ((True, 16), "width=True must be an integer")]:
        with pytest.raises(ValueError, match=message):
            spec.check_size(width, height)


def test_reference_count_and_workflow_names():
    assert [Workflow.for_references(n) for n in range(MAX_REFERENCES + 1)] == [
        "text-to-image", "image-to-image", "multi-reference", "multi-reference", "multi-reference"]
    assert [w.value for w in Workflow] == ["text-to-image", "image-to-image", "multi-reference"]
    assert f"{Workflow.IMAGE_TO_IMAGE}" == str(Workflow.IMAGE_TO_IMAGE) == "image-to-image"
    assert spec.check_reference_count(MAX_REFERENCES) == MAX_REFERENCES
    with pytest.raises(ValueError, match="^5 reference images given; at most 4 are allowed$"):
        Workflow.for_references(MAX_REFERENCES + 1)
    with pytest.raises(ValueError, match=r"^5 reference images given \(2 files \+ 3 URIs\); at most 4 are allowed$"):
        spec.check_reference_count(5, sources="2 files + 3 URIs")


def test_aspect_ratios():
    assert spec.resolve_aspect_ratio("landscape") == (1344, 768) == spec.resolve_aspect_ratio(spec.DEFAULT_ASPECT_RATIO)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in spec.ASPECT_RATIOS.values())
    for name in ("huge", "", None, "Square"):
        with pytest.raises(ValueError, match="is not one of square, landscape, portrait, photo, photo_v, standard"):
            spec.resolve_aspect_ratio(name)


# ---- one spec: the server, the pipeline and the sampler take their limits from klein_jax/request.py ----

@pytest.fixture(scope="module")
def demo():
    return build_demo_pipeline()  # prepare() validates on the host and compiles nothing


def _server_form(**fields):
    return validate_form(MultiDict(fields), MultiDict(), Settings(api_keys=("k",)), [DEFAULT_MODEL_ID])


def _references(count):
    return [PIL.Image.new("RGB", (64, 64))] * count


@pytest.mark.parametrize("field, ok, bad, limit", [
    ("seed", MAX_SEED, MAX_SEED + 1, f"0..{MAX_SEED}"),
    ("prompt", "x" * MAX_PROMPT_CHARS, "x" * (MAX_PROMPT_CHARS + 1), f"at most {MAX_PROMPT_CHARS}"),
    ("prompt", "a cat", " \t", "empty or whitespace only"),
    ("references", MAX_REFERENCES, MAX_REFERENCES + 1, f"at most {MAX_REFERENCES}"),
])
def test_server_and_pipeline_refuse_the_same_requests(demo, field, ok, bad, limit):
    def server(value):
        if field == "references":  # image_uris are only counted by the form, not fetched
            return _server_form(prompt="p", image_uris=json.dumps(["data:image/png;base64,AA=="] * value))
        return _server_form(**{"prompt": "p", field: str(value) if field == "seed" else value})

    def pipeline(value):
        if field == "references":
            return demo.prepare("p", _references(value), width=64, height=64)
        return demo.prepare(**{"prompt": "p", field: value, "width": 64, "height": 64})

    server(ok), pipeline(ok)
    with pytest.raises(RequestError) as refused:
        server(bad)
    assert refused.value.status == 422 and limit in refused.value.detail
    with pytest.raises(ValueError, match=re.escape(limit)):
        pipeline(bad)
    assert demo.compile_count == 0


def test_openapi_and_settings_state_the_spec_limits():
    document = build_openapi([DEFAULT_MODEL_ID], Settings(api_keys=("k",)))
    form = document["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = form["properties"]
    assert fields["prompt"]["maxLength"] == MAX_PROMPT_CHARS and fields["images"]["maxItems"] == MAX_REFERENCES
    seed = re.compile(fields["seed"]["pattern"])
    assert seed.fullmatch(str(MAX_SEED)) and not seed.fullmatch(str(MAX_SEED) + "0")
    assert str(MAX_SEED) in fields["seed"]["description"]
    assert fields["aspect_ratio"]["enum"] == list(spec.ASPECT_RATIOS)
    assert document["components"]["headers"]["X-Klein-Workflow"]["enum"] == [w.value for w in Workflow]
    assert Settings(api_keys=("k",)).compile_references == MAX_REFERENCES
    assert sampler.MAX_REFERENCES is MAX_REFERENCES  # the programs' reference slots


def test_no_module_keeps_a_copy_of_the_spec():
    """Limits, seed range and workflow names are written only in klein_jax/request.py."""
    copies = re.compile(r"^\s*(MAX_SEED|M(IN|AX)_STEPS|MAX_REFERENCES|MAX_PROMPT_CHARS)\s*[:=]|2\*\*64|"
                        r"\"(text-to-image|image-to-image|multi-reference|edit)\"", re.MULTILINE)
    found = [f"{path.relative_to(REPO)}: {match.group(0).strip()}"
             for folder in ("klein_jax", "server") for path in sorted((REPO / folder).rglob("*.py"))
             if path.name != "request.py" for match in copies.finditer(path.read_text())]
    assert not found, found
