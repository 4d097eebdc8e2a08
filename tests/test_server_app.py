"""create_app in-process (Quart's test client) with a fake pipeline: routes, errors, SSRF, queueing, batching."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time

import pytest
from server_support import (
    AppClient,
    FakePipeline,
    RecordingServer,
    bomb_png,
    data_uri,
    decode_png,
    jpeg_bytes,
    png_bytes,
)

from klein_jax.aspect_ratios import ASPECT_RATIOS
from server import Settings, create_app
from server.settings import parse_networks

KEY = "test-key"
RED, BLUE, GREEN = png_bytes(color=(255, 0, 0)), png_bytes(color=(0, 0, 255)), png_bytes(color=(0, 255, 0))
MAX_IMAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def servers():
    """An allow-listed image server on 127.0.0.2, and traps on 127.0.0.1 and ::1 that must never be reached."""
    trap = RecordingServer("127.0.0.1")
    trap6 = RecordingServer("::1")
    images = RecordingServer("127.0.0.2")
    images.routes.update({
        "/red.png": (200, {"Content-Type": "image/png"}, RED),
        "/blue.png": (200, {}, BLUE),
        "/to-trap": (302, {"Location": trap.url("/red.png")}, b""),
        "/to-good": (301, {"Location": "/blue.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big.png": (200, {}, b"\x89PNG" + b"0" * MAX_IMAGE_BYTES),
        "/big-stream.png": (200, {"X-No-Length": "1"}, b"\x89PNG" + b"0" * MAX_IMAGE_BYTES),
        "/text": (200, {"Content-Type": "text/plain"}, b"just text"),
        "/bomb.png": (200, {}, bomb_png()),
    })
    trap.routes["/red.png"] = (200, {}, RED)
    yield {"trap": trap, "trap6": trap6, "images": images}
    for server in (trap, trap6, images):
        server.close()


def _resolver(servers):
    table = {"evil.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"], "intranet.test": ["10.0.0.7"],
             "mixed.test": ["93.184.215.14", "127.0.0.1"], "images.test": ["127.0.0.2"]}

    async def resolve(host, port):
        if host not in table:
            raise OSError(f"unknown test host {host}")  # never ask a real DNS server
        return table[host]

    return resolve


@pytest.fixture(scope="module")
def client(servers):
    pipe = FakePipeline()
    settings = Settings(api_keys=(KEY, "second-key"), max_batch=4, batch_wait_ms=1, max_body_bytes=1024 * 1024,
                        max_form_parts=12, max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=512 * 512,
                        allow_networks=parse_networks(["127.0.0.2/32"]), fetch_timeout_s=5)
    app_client = AppClient(create_app({"flux2-klein-4b": pipe, "fake-2": FakePipeline()}, settings,
                                      resolver=_resolver(servers)))
    app_client.pipe = pipe
    yield app_client
    app_client.close()


def _detail_only(answer, status):
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str), body
    assert "Traceback" not in body["detail"]
    assert answer.headers["X-Request-ID"]
    return body["detail"]


@pytest.mark.parametrize("aspect_ratio", list(ASPECT_RATIOS))
def test_generate_answers_png_at_the_aspect_ratio_size(client, aspect_ratio):
    answer = client.generate({"prompt": "a cat", "aspect_ratio": aspect_ratio, "seed": "5"})
    assert answer.status == 200 and answer.headers["Content-Type"] == "image/png"
    assert decode_png(answer.body).size == ASPECT_RATIOS[aspect_ratio]
    assert answer.headers["X-Klein-Seed"] == "5" and answer.headers["X-Klein-Model"] == "flux2-klein-4b"
    assert answer.headers["X-Klein-Workflow"] == "text-to-image"
    assert "X-Klein-Demo" not in answer.headers


def test_generate_headers_and_urlencoded_body(client):
    answer = client.generate({"prompt": "a cat"}, headers={"X-Request-ID": "client-id-1"})
    assert answer.status == 200 and decode_png(answer.body).size == (1344, 768)  # default: landscape
    assert answer.headers["X-Request-ID"] == "client-id-1"
    assert int(answer.headers["X-Klein-Seed"]) >= 0
    stages = [part.split(";")[0] for part in answer.headers["Server-Timing"].split(", ")]
    assert stages == ["parse", "fetch", "decode", "prepare", "queue", "generate", "encode"]
    assert float(answer.headers["X-Klein-Queue-Ms"]) >= 0 and float(answer.headers["X-Klein-Generate-Ms"]) >= 0
    assert client.generate({"prompt": "x"}, headers={"X-Request-ID": "bad id\x01"}).headers["X-Request-ID"] != "bad id"


@pytest.mark.parametrize("files, uris, workflow", [
    ([RED], [], "image-to-image"),
    ([], ["red"], "image-to-image"),
    ([RED, BLUE], [], "multi-reference"),
    ([], ["red", "blue", "data"], "multi-reference"),
    ([RED, BLUE], ["blue", "data"], "multi-reference"),
])
def test_workflows_by_files_and_image_uris(client, servers, files, uris, workflow):
    urls = {"red": servers["images"].url("/red.png"), "blue": "http://images.test:%d/blue.png" % servers["images"].port,
            "data": data_uri(GREEN)}
    answer = client.generate({"prompt": "p", "seed": "1", "image_uris": json.dumps([urls[u] for u in uris])},
                             [("images", f"{i}.png", data) for i, data in enumerate(files)])
    assert answer.status == 200, answer.body
    assert answer.headers["X-Klein-Workflow"] == workflow
    assert client.pipe.batches[-1][0].reference_colors == tuple(
        {RED: (255, 0, 0), BLUE: (0, 0, 255)}[f] for f in files) + tuple(
        {"red": (255, 0, 0), "blue": (0, 0, 255), "data": (0, 255, 0)}[u] for u in uris)


def test_same_seed_same_bytes_and_files_come_before_uris(client):
    def run(files, uris, seed="7"):
        answer = client.generate({"prompt": "p", "seed": seed, "image_uris": json.dumps(uris)},
                                 [("images", "f.png", f) for f in files])
        assert answer.status == 200, answer.body
        return answer.body

    mixed = run([RED], [data_uri(BLUE)])
    assert mixed == run([RED, BLUE], []) == run([RED], [data_uri(BLUE)])
    assert mixed != run([BLUE, RED], []) and mixed != run([RED], [data_uri(BLUE)], seed="8")


def test_exif_orientation_is_applied_before_the_pipeline(client):
    answer = client.generate({"prompt": "p"}, [("images", "phone.jpg", jpeg_bytes(size=(96, 64), exif_orientation=6))])
    assert answer.status == 200
    assert client.pipe.batches[-1][0].reference_sizes == ((64, 96),)


@pytest.mark.parametrize("header, detail", [
    (None, "missing API key"), ("Token abc", "malformed Authorization"), ("Bearer wrong", "unknown API key")])
def test_401(client, header, detail):
    answer = client.generate({"prompt": "p"}, key=None, headers={"Authorization": header} if header else {})
    assert detail in _detail_only(answer, 401)
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_second_key_is_accepted(client):
    assert client.generate({"prompt": "p"}, key="second-key").status == 200


def test_404_405(client):
    assert "not found" in _detail_only(client.request("GET", "/v1/nothing"), 404)
    answer = client.request("GET", "/v1/generate")
    assert "POST" in _detail_only(answer, 405) and "POST" in answer.headers["Allow"]
    assert _detail_only(client.request("POST", "/healthz"), 405)


def test_413_body_and_parts_limits(client):
    assert "at most 1048576 bytes" in _detail_only(
        client.generate({"prompt": "p"}, [("images", "big.png", b"0" * (1024 * 1024 + 1))]), 413)
    answer = client.generate([("prompt", "p")] + [(f"f{i}", "x") for i in range(20)], [("images", "a.png", RED)])
    assert "12 form fields" in _detail_only(answer, 413)


@pytest.mark.parametrize("fields, files, detail", [
    ({"prompt": "  "}, [], "prompt is empty or whitespace only"),
    ({}, [], "prompt is required"),
    ({"prompt": "p", "aspect_ratio": "cinema"}, [], "is not one of square, landscape"),
    ({"prompt": "p", "model": "flux2-klein-9b"}, [], "this server has: flux2-klein-4b, fake-2"),
    ({"prompt": "p", "image_uris": "[broken"}, [], "image_uris is not valid JSON"),
    ({"prompt": "p", "image_uris": '["gopher://x/a.png"]'}, [], "only http://, https:// and data:"),
    ({"prompt": "p"}, [("images", "x.png", b"plain text")], "images[0] ('x.png') is not a PNG"),
    ({"prompt": "p"}, [("images", "x.png", png_bytes()[:50])], "could not be decoded"),
    ({"prompt": "p"}, [("images", "bomb.png", bomb_png())], "decompression bomb"),
    ({"prompt": "p"}, [("images", "big.png", png_bytes(size=(600, 600), compress_level=9))],
     "600x600 = 360000 pixels; at most 262144"),
    ({"prompt": "p"}, [("images", "huge.png", b"0" * (MAX_IMAGE_BYTES + 1))], "larger than 65536 bytes"),
    ({"prompt": "p"}, [("images", "tiny.png", png_bytes(size=(8, 8)))], "too small"),  # the pipeline's own check
    ({"prompt": "p", "image_uris": json.dumps([data_uri(RED)] * 3)}, [("images", "a.png", RED)] * 2,
     "5 reference images given (2 files + 3 image_uris); at most 4"),
    ({"prompt": "p", "image_uris": json.dumps(["data:image/png;base64,%%%"])}, [], "not valid base64"),
    ({"prompt": "p", "image_uris": json.dumps([data_uri(b"0" * (MAX_IMAGE_BYTES + 1))])}, [], "larger than 65536"),
])
def test_422_field_errors(client, fields, files, detail):
    assert detail in _detail_only(client.generate(fields, files), 422)


def test_422_content_types(client):
    answer = client.request("POST", "/v1/generate", body=b'{"prompt": "p"}',
                            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert "multipart/form-data or application/x-www-form-urlencoded" in _detail_only(answer, 422)
    answer = client.request("POST", "/v1/generate", body=b"--x\r\nbroken",
                            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data"})
    assert "malformed multipart/form-data body" in _detail_only(answer, 422)


@pytest.mark.parametrize("target, detail", [
    ("http://127.0.0.1:{trap}/red.png", "a loopback address"),
    ("http://[::1]:{trap6}/red.png", "a loopback address"),
    ("http://evil.test:{trap}/red.png", "'evil.test' resolves to a loopback address"),
    ("http://mixed.test:{trap}/red.png", "a loopback address"),  # one bad DNS answer refuses the host
    ("http://meta.test/latest/meta-data/", "a link-local address"),
    ("http://169.254.169.254/latest/meta-data/", "a link-local address"),
    ("http://10.0.0.7/x.png", "a private address"),
    ("http://intranet.test/x.png", "a private address"),
    ("http://0.0.0.0:{trap}/red.png", "an unspecified address".replace("an ", "a ")),
    ("http://[::ffff:127.0.0.1]:{trap}/red.png", "a loopback address"),
    ("http://{images}/to-trap", "a loopback address"),  # an allowed host redirecting to loopback
    ("http://user:pw@{images}/red.png", "credentials"),
    ("http://unknown.test/x.png", "could not be resolved"),
])
def test_ssrf_attempts_are_refused_before_connecting(client, servers, target, detail):
    trap, trap6, images = servers["trap"], servers["trap6"], servers["images"]
    uri = target.format(trap=trap.port, trap6=trap6.port, images=f"127.0.0.2:{images.port}")
    answer = client.generate({"prompt": "p", "image_uris": json.dumps([uri])})
    assert detail in _detail_only(answer, 422)
    assert trap.requests == [] and trap6.requests == []


@pytest.mark.parametrize("path, detail", [
    ("/missing.png", "answered HTTP 404"), ("/loop", "more than 3 redirects"),
    ("/big.png", "larger than 65536 bytes (Content-Length"),
    ("/big-stream.png", "larger than 65536 bytes"),
    ("/text", "is not a PNG"), ("/bomb.png", "decompression bomb"),
])
def test_fetch_limits(client, servers, path, detail):
    answer = client.generate({"prompt": "p", "image_uris": json.dumps([servers["images"].url(path)])})
    assert detail in _detail_only(answer, 422)


def test_allowed_redirect_is_followed_with_host_header(client, servers):
    images = servers["images"]
    before = len(images.requests)
    answer = client.generate({"prompt": "p", "image_uris": json.dumps([f"http://images.test:{images.port}/to-good"])})
    assert answer.status == 200, answer.body
    hops = images.requests[before:]
    assert [path for _, path, _ in hops] == ["/to-good", "/blue.png"]
    assert all(headers["Host"] == f"images.test:{images.port}" for _, _, headers in hops)


def test_openapi_documents_every_route_and_status(client):
    doc = client.request("GET", "/openapi.json").json()
    routes = {rule.rule: rule.methods - {"HEAD", "OPTIONS"} for rule in client.app.url_map.iter_rules()}
    assert set(doc["paths"]) == set(routes)
    for path, methods in routes.items():
        assert set(doc["paths"][path]) == {m.lower() for m in methods}
    post = doc["paths"]["/v1/generate"]["post"]
    assert set(post["responses"]) == {"200", "401", "405", "408", "413", "422", "500", "503", "504"}
    multipart = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(multipart) == {"prompt", "model", "aspect_ratio", "images", "image_uris", "seed", "lora", "lora_scale"}
    assert multipart["aspect_ratio"]["enum"] == list(ASPECT_RATIOS)


def test_health_ready_metrics(client):
    assert client.request("GET", "/healthz").json() == {"status": "ok"}
    ready = client.request("GET", "/readyz").json()
    assert ready["status"] == "ready" and ready["models"]["flux2-klein-4b"]["steps"] == 4
    client.generate({"prompt": "p"})
    text = client.request("GET", "/metrics").body.decode()
    assert 'klein_requests_total{method="POST",route="/v1/generate",status="200"}' in text
    assert 'klein_requests_total{method="POST",route="/v1/generate",status="422"}' in text
    for stage in ("parse", "fetch", "decode", "prepare", "queue", "generate", "encode", "total"):
        assert f'klein_stage_seconds_count{{stage="{stage}"}}' in text
    assert "klein_queue_depth 0.0" in text and "klein_batch_size_count" in text and "klein_ready 1.0" in text


def test_access_log_is_one_json_line_per_request_without_secrets(client, caplog):
    with caplog.at_level(logging.INFO, logger="server.access"):
        client.generate({"prompt": "a secret prompt", "seed": "3", "aspect_ratio": "square"})
        client.generate({"prompt": "p"}, key="wrong-secret-key")
    lines = [r.getMessage() for r in caplog.records if r.name == "server.access"]
    assert len(lines) == 2
    ok, refused = map(json.loads, lines)
    assert ok["status"] == 200 and ok["workflow"] == "text-to-image" and ok["resolution"] == "1024x1024"
    assert ok["seed"] == 3 and ok["request_id"] and ok["queue_ms"] >= 0 and ok["generate_ms"] >= 0
    assert refused["status"] == 401
    assert all("secret" not in line and KEY not in line for line in lines)


def test_500_is_generic_with_request_id_and_logs_the_traceback(caplog):
    pipe = FakePipeline(error=RuntimeError("secret internals"))
    client = AppClient(create_app({"flux2-klein-4b": pipe}, Settings(auth=False)))
    try:
        with caplog.at_level(logging.ERROR, logger="server.errors"):
            answer = client.generate({"prompt": "p"}, key=None)
    finally:
        client.close()
    detail = _detail_only(answer, 500)
    assert answer.headers["X-Request-ID"] in detail and "secret" not in detail
    logged = [r for r in caplog.records if r.name == "server.errors"]
    assert logged and answer.headers["X-Request-ID"] in logged[0].getMessage() and logged[0].exc_info


def test_504_and_a_timed_out_queued_request_never_runs():
    pipe = FakePipeline(delay_s=1.0)
    client = AppClient(create_app({"flux2-klein-4b": pipe}, Settings(auth=False, timeout_s=0.3, max_batch=1)))
    try:
        first = client.generate_async({"prompt": "first"}, key=None)
        pipe.run_started.wait(5)
        second = client.generate({"prompt": "second"}, key=None)  # queued behind `first`, times out there
        assert "took longer than the server's limit of 0.3 s" in _detail_only(second, 504)
        assert _detail_only(first.result(10), 504)  # its batch goes on running; the result is dropped
        time.sleep(1.0)
        client.generate({"prompt": "third"}, key=None)  # starts on the idle device (and times out there too)
    finally:
        client.close()
    assert [[p.prompt for p in batch] for batch in pipe.batches] == [["first"], ["third"]]


def test_503_while_compiling_then_ready():
    gate = threading.Event()
    client = AppClient(create_app({"flux2-klein-4b": FakePipeline(compile_gate=gate)}, Settings(auth=False)),
                       wait_ready=False)
    try:
        for answer in (client.request("GET", "/readyz"), client.generate({"prompt": "p"}, key=None)):
            assert "compiling" in _detail_only(answer, 503) and answer.headers["Retry-After"] == "5"
        assert client.request("GET", "/healthz").status == 200
        gate.set()
        client.service.worker.ready.wait(5)
        assert client.request("GET", "/readyz").status == 200
        assert client.generate({"prompt": "p"}, key=None).status == 200
    finally:
        gate.set()
        client.close()


def test_503_when_the_queue_is_full_and_every_admitted_request_is_answered():
    pipe = FakePipeline(delay_s=0.3)
    client = AppClient(create_app({"flux2-klein-4b": pipe}, Settings(auth=False, max_queue=2, max_batch=1)))
    try:
        futures = [client.generate_async({"prompt": f"p{i}"}, key=None) for i in range(8)]
        answers = [f.result(30) for f in concurrent.futures.as_completed(futures)]
    finally:
        client.close()
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * 3 + [503] * 5, statuses  # capacity: 2 queued + 1 running
    for answer in answers:
        if answer.status == 503:
            assert "at capacity" in _detail_only(answer, 503) and answer.headers["Retry-After"] == "1"
    assert sum(len(b) for b in pipe.batches) == 3


def test_concurrent_requests_of_one_shape_share_a_batch():
    pipe = FakePipeline(delay_s=0.3)
    client = AppClient(create_app({"flux2-klein-4b": pipe}, Settings(auth=False, max_batch=4, batch_wait_ms=20)))
    try:
        first = client.generate_async({"prompt": "first", "aspect_ratio": "square"}, key=None)
        pipe.run_started.wait(5)
        rest = [client.generate_async({"prompt": f"p{i}", "aspect_ratio": "square", "seed": str(i)}, key=None)
                for i in range(3)]
        other = client.generate_async({"prompt": "wide", "aspect_ratio": "wide"}, key=None)
        answers = [f.result(30) for f in rest]
        assert first.result(30).headers["X-Klein-Batch-Size"] == "1"
        assert other.result(30).headers["X-Klein-Batch-Size"] == "1"
    finally:
        client.close()
    assert [a.headers["X-Klein-Batch-Size"] for a in answers] == ["3"] * 3
    assert [a.headers["X-Klein-Seed"] for a in answers] == ["0", "1", "2"]
    assert sorted(len(b) for b in pipe.batches) == [1, 1, 3]


def test_demo_header_and_compile_arguments():
    pipe = FakePipeline(is_demo=True)
    client = AppClient(create_app({"flux2-klein-4b": pipe}, Settings(auth=False, max_batch=3,
                                                                     aspect_ratios=("square", "wide"))))
    try:
        answer = client.generate({"prompt": "p", "aspect_ratio": "wide"}, key=None)
        assert answer.status == 200 and answer.headers["X-Klein-Demo"].startswith("true")
        assert client.request("GET", "/healthz").headers["X-Klein-Demo"].startswith("true")
        assert "not enabled on this server" in _detail_only(client.generate({"prompt": "p"}, key=None), 422)
    finally:
        client.close()
    assert pipe.compile_calls == [dict(aspect_ratios=["square", "wide"], max_references=0, batch_sizes=(1, 2, 3)),
                                  dict(aspect_ratios=["square", "wide"], max_references=4, batch_sizes=(1,))]


def test_requests_with_references_run_one_at_a_time():
    # Reference programs are compiled for batch size 1 only, so the worker must never batch such requests.
    pipe = FakePipeline(delay_s=0.3)
    client = AppClient(create_app({"flux2-klein-4b": pipe}, Settings(auth=False, max_batch=4, batch_wait_ms=20)))
    try:
        first = client.generate_async({"prompt": "first", "aspect_ratio": "square"}, key=None)
        pipe.run_started.wait(5)
        rest = [client.generate_async({"prompt": f"p{i}", "aspect_ratio": "square", "seed": str(i)},
                                      [("images", "ref.png", RED)], key=None) for i in range(3)]
        answers = [f.result(30) for f in rest]
        assert first.result(30).status == 200
    finally:
        client.close()
    assert [a.headers["X-Klein-Batch-Size"] for a in answers] == ["1"] * 3
    assert sorted(len(b) for b in pipe.batches) == [1, 1, 1, 1]
