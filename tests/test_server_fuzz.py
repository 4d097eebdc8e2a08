"""Property-based fuzzing of POST /v1/generate (hypothesis) against create_app with the demo pipeline.

Properties: no 5xx; no body contains "Traceback"; every answer is a PNG at exactly the requested aspect ratio's
size, or JSON with only "detail" (401 or 422); the same seed gives the same bytes.
"""

from __future__ import annotations

import json

import jax
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jax.experimental.compilation_cache import compilation_cache
from server_support import AppClient, bomb_png, data_uri, decode_png, jpeg_bytes, png_bytes, session_compile_cache

from klein_jax.compilation_cache import enable_compilation_cache
from klein_jax.demo import build_demo_pipeline
from klein_jax.request import ASPECT_RATIOS, MAX_SEED
from server import Settings, create_app

KEY = "fuzz-key"
ENABLED = ("square", "wide")  # compiled at start-up; the other names must answer 422
IMAGES = {
    "png": png_bytes(size=(96, 80)), "jpeg": jpeg_bytes(size=(80, 96), exif_orientation=8),
    "tiny": png_bytes(size=(16, 16)), "garbage": b"\x89PNG\r\n\x1a\n garbage", "empty": b"", "bomb": bomb_png(),
    "text": b"GIF89a? no",
}
URIS = ["ftp://example.com/a.png", "http://127.0.0.1:9/a.png", "http://[::1]:9/a.png", "http://10.0.0.1/a.png",
        "http://169.254.169.254/latest/", "http://evil.test/a.png", "https://evil.test/a.png", "not a uri",
        "data:image/png;base64,!!!", "data:text/plain;base64,aGk=", data_uri(png_bytes(size=(64, 64))),
        data_uri(b"not an image"), "", "http://", "http://[::1", "javascript:alert(1)"]


async def _resolve_everything_to_loopback(host, port):
    return ["127.0.0.1"]  # never ask a real DNS server; the policy must refuse it


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The demo app; its programs come from the compilation cache the contract test's server filled, if it ran."""
    previous = jax.config.jax_compilation_cache_dir
    enable_compilation_cache(session_compile_cache(tmp_path_factory))
    settings = Settings(api_keys=(KEY,), aspect_ratios=ENABLED, max_batch=1, compile_references=0,
                        max_image_pixels=2**20, max_image_bytes=256 * 1024, fetch_timeout_s=2)
    app_client = AppClient(create_app({"flux2-klein-4b": build_demo_pipeline()}, settings,
                                      resolver=_resolve_everything_to_loopback))
    yield app_client
    app_client.close()
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


optional_text = st.one_of(st.none(), st.text(max_size=30))
anything = st.fixed_dictionaries({
    "key": st.sampled_from([KEY, KEY, KEY, None, "wrong", ""]),
    "auth_scheme": st.sampled_from(["Bearer", "Bearer", "bearer", "Basic", ""]),
    "prompt": st.one_of(st.none(), st.just("a red fox"), st.text(max_size=40), st.just(" \t ")),
    "model": st.one_of(st.none(), st.sampled_from(["flux2-klein-4b", "flux2-klein-9b", ""]), optional_text),
    "aspect_ratio": st.one_of(st.none(), st.sampled_from(list(ASPECT_RATIOS)), optional_text),
    "seed": st.one_of(st.none(), st.integers(0, MAX_SEED).map(str), st.integers(-9, -1).map(str),
                      st.integers(MAX_SEED + 1, 2**70).map(str), optional_text),
    "files": st.lists(st.sampled_from(sorted(IMAGES)), max_size=6),
    "image_uris": st.one_of(st.none(), optional_text, st.lists(st.sampled_from(URIS), max_size=6).map(json.dumps)),
})
# Mostly valid requests (each 200 costs a 1 MP generation on the CPU, so they are a small share of the examples).
mostly_valid = st.fixed_dictionaries({
    "key": st.just(KEY), "auth_scheme": st.just("Bearer"), "prompt": st.text(min_size=1, max_size=40),
    "model": st.sampled_from([None, "flux2-klein-4b"]), "aspect_ratio": st.sampled_from([None, *ENABLED]),
    "seed": st.one_of(st.none(), st.integers(0, MAX_SEED).map(str)),
    "files": st.lists(st.sampled_from(["png", "jpeg", "tiny"]), max_size=2),
    "image_uris": st.one_of(st.none(), st.just("[]"), st.lists(st.sampled_from(URIS[-6:]), max_size=2).map(json.dumps)),
})
requests = st.one_of(anything, anything, anything, anything, anything, anything, mostly_valid)


def _send(client, r):
    fields = [(name, r[name]) for name in ("prompt", "model", "aspect_ratio", "seed", "image_uris")
              if r[name] is not None]
    files = [("images", f"{name}.bin", IMAGES[name]) for name in r["files"]]
    headers = {"Authorization": f"{r['auth_scheme']} {r['key']}".strip()} if r["key"] is not None else {}
    return client.generate(fields, files, key=None, headers=headers)


def _check(answer, r):
    assert answer.status < 500, (answer.status, answer.body[:300])
    assert b"Traceback" not in answer.body
    if answer.status == 200:
        aspect_ratio = r["aspect_ratio"] or "landscape"
        assert aspect_ratio in ENABLED
        assert decode_png(answer.body).size == ASPECT_RATIOS[aspect_ratio]
        if r["seed"]:
            assert answer.headers["X-Klein-Seed"] == str(int(r["seed"]))
        return
    assert answer.status in (401, 422), answer.status
    assert answer.headers["Content-Type"] == "application/json"
    body = json.loads(answer.body)
    assert list(body) == ["detail"] and isinstance(body["detail"], str) and body["detail"]


@settings(max_examples=35, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(r=requests)
def test_generate_never_fails_and_answers_png_or_detail(client, r):
    answer = _send(client, r)
    event(f"status {answer.status}")  # pytest --hypothesis-show-statistics shows the mix
    _check(answer, r)


def test_same_seed_same_bytes(client):
    fields = {"prompt": "ünïcode prompt ✓", "seed": str(MAX_SEED), "aspect_ratio": "wide"}
    first, second = client.generate(fields, key=KEY), client.generate(fields, key=KEY)
    assert first.status == second.status == 200
    assert first.body == second.body and first.headers["X-Klein-Seed"] == str(MAX_SEED)
    assert decode_png(first.body).size == ASPECT_RATIOS["wide"]
