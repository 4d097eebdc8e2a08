"""Contract tests of shared/spec/api.md against the real server in a subprocess.

`python -m server --demo` on a loopback port serves the demo model (as flux2-klein-4b, every aspect ratio); a second
`python -m server --model tiny=...` serves a tiny model converted with klein-convert. Both take API keys from
KLEIN_API_KEYS and allow-list 127.0.0.2/32 for the test's image server. Traffic only ever goes to loopback addresses:
the SSRF cases must be refused before connecting, and trap servers on 127.0.0.1 and ::1 assert that no request
reached them. The 500 and 504 rows need a failing or slow model and are covered in-process by test_server_app.py,
as are batching and the queue-full 503 with exact counts. A demo image of 1 MP takes seconds on a CPU, so this module
generates few: the eight sizes, two workflow requests, the tiny model's, and the load test's.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import sys

import httpx
import pytest
from server_support import (
    REPO,
    RecordingServer,
    ServerProcess,
    bomb_png,
    data_uri,
    decode_png,
    png_bytes,
    session_compile_cache,
)

from klein_jax.aspect_ratios import ASPECT_RATIOS

KEY = "contract-key"
MAX_QUEUE, MAX_BATCH = 2, 1  # batching itself is tested in-process (test_server_app.py)
RED, BLUE = png_bytes(size=(128, 96), color=(230, 20, 20)), png_bytes(size=(96, 128), color=(20, 20, 230))
GREEN = png_bytes(size=(64, 64), color=(20, 230, 20))


def _convert_tiny_model(root):
    """A random tiny diffusers pipeline (16 px per token, like the real VAE), converted by klein-convert."""
    from convert.cli import main as convert_main
    from klein_jax.demo import DEMO_VAE
    from tiny_pipeline import make_tiny_diffusers_pipeline

    source = make_tiny_diffusers_pipeline(root / "diffusers", vae_config=DEMO_VAE)
    assert convert_main([str(source), str(root / "converted"), "--dtype", "float32", "--no-progress"]) == 0
    return root / "converted"


@pytest.fixture(scope="module")
def images():
    """Loopback servers: allow-listed images on 127.0.0.2, traps on 127.0.0.1 and ::1."""
    trap, trap6, good = RecordingServer("127.0.0.1"), RecordingServer("::1"), RecordingServer("127.0.0.2")
    trap.routes["/red.png"] = trap6.routes["/red.png"] = (200, {}, RED)
    good.routes.update({"/red.png": (200, {}, RED), "/blue.png": (200, {}, BLUE),
                        "/to-loopback": (302, {"Location": trap.url("/red.png")}, b""),
                        "/bomb.png": (200, {}, bomb_png()), "/notes.txt": (200, {}, b"plain text")})
    yield {"trap": trap, "trap6": trap6, "good": good}
    for server in (trap, trap6, good):
        server.close()


# --timeout-s 300: a full queue drains in (MAX_QUEUE + MAX_BATCH) x ~10 s here, so overload must show as 503, not 504.
COMMON_ARGS = ["--max-queue", str(MAX_QUEUE), "--max-batch", str(MAX_BATCH), "--timeout-s", "300",
               "--compile-references", "0", "--allow-networks", "127.0.0.2/32",
               "--max-body-bytes", str(2 * 2**20), "--max-image-bytes", str(2**20),
               "--max-image-pixels", str(2048 * 2048), "--fetch-timeout-s", "10"]


@pytest.fixture(scope="module")
def servers(images, tmp_path_factory):
    """The --demo server (every aspect ratio) and a server of the converted tiny model (square only).

    The demo server compiles while this process converts the tiny model: the two overlap.
    """
    env = {"KLEIN_API_KEYS": f"{KEY},second-key", "KLEIN_COMPILE_CACHE": str(session_compile_cache(tmp_path_factory))}
    demo = ServerProcess(["--demo", *COMMON_ARGS], tmp_path_factory.mktemp("demo-server"), env=env)
    try:
        first_answer = demo.wait_ready(timeout_s=30, until_any_answer=True)[-1]
        tiny_model = _convert_tiny_model(tmp_path_factory.mktemp("tiny"))
        tiny = ServerProcess(["--model", f"tiny={tiny_model}", "--dtype", "float32", "--aspect-ratios",
                              "square", *COMMON_ARGS], tmp_path_factory.mktemp("tiny-server"), env=env)
    except BaseException:
        demo.stop()
        raise
    try:
        demo.early_answers = [first_answer] + demo.wait_ready()
        tiny.wait_ready()
        yield {"demo": demo, "tiny": tiny}
    finally:
        codes = demo.stop(), tiny.stop()
    assert codes == (0, 0), demo.stderr()[-2000:] + tiny.stderr()[-2000:]


@pytest.fixture(scope="module")
def server(servers):
    return servers["demo"]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120, trust_env=False) as client:
        yield client


def generate(http, fields=None, files=(), key=KEY, headers=None):
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    fields = {"prompt": "a lighthouse at dusk", **(fields or {})}
    files = [("images", (f"ref{i}.png", data, "image/png")) for i, data in enumerate(files)] or None
    return http.post("/v1/generate", data=fields, files=files, headers=headers)


def detail(response, status):
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["detail"] and body["detail"] and "Traceback" not in body["detail"]
    assert response.headers["x-request-id"]
    return body["detail"]


def png_size(response) -> tuple[int, int]:
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "image/png"
    return decode_png(response.content).size


# ---- start-up ----

def test_not_ready_answers_and_ready_line(server, http):
    # The first /readyz right after the port opens is a 503 unless the compilation cache was warm enough to load
    # every program in that instant (test_server_app.py checks the 503 deterministically with a blocked compile).
    for answer in server.early_answers:
        if answer.status_code == 200:
            continue
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert "compiling" in answer.json()["detail"] and list(answer.json()) == ["detail"]
    ready = http.get("/readyz").json()
    assert ready["status"] == "ready" and list(ready["models"]) == ["flux2-klein-4b"]
    assert ready["models"]["flux2-klein-4b"]["is_demo"]
    log = server.stderr()
    assert len(re.findall(r"klein-serve ready on http://127\.0\.0\.1:\d+", log)) == 1
    assert "--demo: serving a tiny model with random weights" in log
    assert http.get("/healthz").json() == {"status": "ok"}


# ---- 200 at each size, each model, each workflow (every 1 MP image costs seconds on a CPU: few of them) ----

@pytest.mark.parametrize("aspect_ratio", list(ASPECT_RATIOS))
def test_demo_png_at_each_aspect_ratio(http, aspect_ratio):
    if aspect_ratio == "landscape":  # the default, asked for without the field, urlencoded
        response = http.post("/v1/generate", content="prompt=a+lighthouse+at+dusk&seed=11", headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
    else:
        response = generate(http, {"aspect_ratio": aspect_ratio, "seed": "11"})
    assert png_size(response) == ASPECT_RATIOS[aspect_ratio]
    assert response.headers["x-klein-demo"].startswith("true")
    assert response.headers["x-klein-workflow"] == "text-to-image" and response.headers["x-klein-seed"] == "11"
    assert "generate;dur=" in response.headers["server-timing"]


def test_workflows_files_uris_mixed_in_order(http, images):
    """[file RED] + image_uris [http BLUE, data GREEN] is the same request as files [RED, BLUE, GREEN]: the same
    seed gives the same bytes, and files come first (their order against the URIs is checked in-process too)."""
    fields = {"aspect_ratio": "square", "seed": "5"}
    mixed = generate(http, {**fields, "image_uris": json.dumps([images["good"].url("/blue.png"), data_uri(GREEN)])},
                     [RED])
    assert png_size(mixed) == (1024, 1024) and mixed.headers["x-klein-workflow"] == "multi-reference"
    files = generate(http, fields, [RED, BLUE, GREEN])
    assert files.headers["x-klein-workflow"] == "multi-reference"
    assert files.content == mixed.content


def test_converted_tiny_model(servers):
    tiny = servers["tiny"]
    with httpx.Client(base_url=tiny.base_url, timeout=120, trust_env=False) as http:
        ready = http.get("/readyz").json()
        assert list(ready["models"]) == ["tiny"] and not ready["models"]["tiny"]["is_demo"]
        response = generate(http, {"model": "tiny", "aspect_ratio": "square", "seed": "3"})
        assert png_size(response) == (1024, 1024)
        assert response.headers["x-klein-model"] == "tiny" and "x-klein-demo" not in response.headers
        assert "model 'flux2-klein-4b' is not loaded; this server has: tiny" in detail(generate(http), 422)


# ---- every error row ----

@pytest.mark.parametrize("headers, text", [
    ({}, "missing API key"), ({"Authorization": "Basic YTpi"}, "malformed"),
    ({"Authorization": "Bearer nope"}, "unknown API key")])
def test_401(http, headers, text):
    response = generate(http, key=None, headers=headers)
    assert text in detail(response, 401) and response.headers["www-authenticate"].startswith("Bearer")


def test_second_key_is_accepted(http):
    assert "aspect_ratio 'bogus'" in detail(generate(http, {"aspect_ratio": "bogus"}, key="second-key"), 422)


def test_404_405_413(http):
    assert detail(http.get("/v2/generate"), 404)
    response = http.get("/v1/generate")
    assert detail(response, 405) and "POST" in response.headers["allow"]
    big = generate(http, files=[b"\0" * (2 * 2**20 + 1)])
    assert "at most 2097152 bytes" in detail(big, 413) and big.headers["connection"] == "close"


@pytest.mark.parametrize("fields, files, text", [
    ({"prompt": ""}, [], "prompt is empty or whitespace only"),
    ({"prompt": "   "}, [], "prompt is empty or whitespace only"),
    ({"aspect_ratio": "ultrawide"}, [], "square, landscape, portrait, photo, photo_v, standard, standard_v, wide"),
    ({"model": "flux2-klein-9b"}, [], "model 'flux2-klein-9b' is not loaded; this server has: flux2-klein-4b"),
    ({"image_uris": "[oops"}, [], "not valid JSON"),
    ({"image_uris": '["file:///etc/passwd"]'}, [], "only http://, https:// and data:"),
    ({"image_uris": "{good}/missing.png"}, [], "answered HTTP 404"),
    ({}, [b"not an image at all"], "is not a PNG, JPEG, WEBP, GIF image"),
    ({"image_uris": "{good}/notes.txt"}, [], "is not a PNG"),
    ({}, [RED, BLUE, GREEN, RED, BLUE], "at most 4"),
    ({"image_uris": json.dumps([data_uri(RED)] * 3)}, [RED, BLUE],
     "5 reference images given (2 files + 3 image_uris); at most 4"),
    ({}, [b"\x89PNG" + b"\0" * 2**20], "larger than 1048576 bytes"),
    ({}, [png_bytes(size=(2100, 2100), mode="1", color=0)], "4410000 pixels"),  # limit 2048 x 2048
    ({}, [bomb_png()], "decompression bomb"),
    ({"image_uris": "{good}/bomb.png"}, [], "decompression bomb"),
    ({}, [png_bytes(size=(32, 32))], "too small"),
])
def test_422(http, images, fields, files, text):
    if "image_uris" in fields and "{good}" in fields["image_uris"]:
        fields = {**fields, "image_uris": json.dumps([fields["image_uris"].format(good=images["good"].url(""))])}
    assert text in detail(generate(http, fields, files), 422)


@pytest.mark.parametrize("uri", [
    "http://127.0.0.1:{trap}/red.png", "http://[::1]:{trap6}/red.png", "http://localhost:{trap}/red.png",
    "http://2130706433:{trap}/red.png", "http://127.1:{trap}/red.png", "http://0.0.0.0:{trap}/red.png",
    "http://[::ffff:127.0.0.1]:{trap}/red.png", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/x.png", "http://10.255.255.1:{trap}/x.png", "http://192.168.0.1/x.png",
    "{good}/to-loopback",
])
def test_ssrf_refused_without_connecting(http, images, uri):
    trap, trap6 = images["trap"], images["trap6"]
    uri = uri.format(trap=trap.port, trap6=trap6.port, good=images["good"].url(""))
    text = detail(generate(http, {"image_uris": json.dumps([uri])}), 422)
    assert "which this server does not fetch from" in text
    assert trap.requests == [] and trap6.requests == []


# ---- load (short version of benchmarks/load_test.py), then metrics and logs ----

def test_load_at_twice_the_queue_capacity(server):
    spec = importlib.util.spec_from_file_location("load_test", REPO / "benchmarks" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = load_test  # dataclasses look their module up while the class is built
    spec.loader.exec_module(load_test)
    # 25 s is enough: 4 clients against room for 3 get 503s within a second, and RSS is sampled every 0.5 s.
    result = load_test.run_load(server.base_url, requests=100, concurrency=2 * MAX_QUEUE, duration_s=25,
                                api_key=KEY, server_pid=server.proc.pid, warmup=1, backoff_ms=20)
    print(result.summary())
    assert load_test.check(result, max_rss_growth_mib=64) == []
    assert result.requests == result.answered == sum(result.statuses.values())
    assert result.statuses.get(503, 0) > 0  # the overload was real


def test_metrics_and_access_log(server, http):
    text = http.get("/metrics").text
    for needle in ('klein_requests_total{method="POST",route="/v1/generate",status="200"}',
                   'klein_requests_total{method="POST",route="/v1/generate",status="422"}',
                   'klein_requests_total{method="POST",route="/v1/generate",status="503"}',
                   'klein_stage_seconds_bucket{le="0.5",stage="generate"}', "klein_queue_depth ",
                   "klein_batch_size_count ", "klein_ready 1.0"):
        assert needle in text, needle
    lines = [json.loads(line) for line in server.stdout().splitlines() if line.strip()]
    assert lines and all({"request_id", "status", "total_ms"} <= set(line) for line in lines)
    generated = [line for line in lines if line["status"] == 200 and line["path"] == "/v1/generate"]
    assert generated and all({"workflow", "resolution", "seed", "queue_ms", "generate_ms"} <= set(line)
                             for line in generated)
    everything = server.stdout() + server.stderr()
    assert KEY not in everything and "second-key" not in everything
    assert base64.b64encode(RED).decode()[:40] not in everything
