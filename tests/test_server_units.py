"""Unit tests of the server's parts: auth, settings, form validation, SSRF policy, image decoding, worker, CLI."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest
from server_support import FakePipeline, bomb_png, data_uri, jpeg_bytes, png_bytes
from werkzeug.datastructures import FileStorage, MultiDict

from klein_jax.aspect_ratios import ASPECT_RATIOS
from server import __main__ as cli
from server.auth import ApiKeys, parse_api_keys
from server.errors import RequestError
from server.fetch import AddressPolicy, _ip_literal, decode_data_uri, forbidden_reason
from server.forms import GenerateForm, validate_form
from server.images import PixelBudget, decode_image
from server.metrics import Metrics
from server.settings import Settings, parse_aspect_ratios, parse_dns_servers, parse_hosts, parse_networks
from server.worker import DeviceWorker, Overloaded, QueueFull, WorkerStopped

SETTINGS = Settings(api_keys=("k",), aspect_ratios=("square", "landscape", "wide"))
MODELS = ("flux2-klein-4b", "other")


# ---- auth ----

def test_parse_api_keys_merges_env_and_file_without_blanks_or_comments():
    assert parse_api_keys(" a, b ,,a", "# comment\nc\n\n  d  \n") == ("a", "b", "c", "d")
    assert parse_api_keys(None, None) == ()


@pytest.mark.parametrize("header, detail", [
    (None, "missing API key"),
    ("", "missing API key"),
    ("Basic dXNlcjpwdw==", "malformed"),
    ("Bearer", "malformed"),
    ("Bearer two words", "malformed"),
    ("Bearer clé", "malformed"),
    ("Bearer secret-2x", "unknown API key"),
])
def test_api_key_check_refuses_with_401_and_bearer_challenge(header, detail):
    with pytest.raises(RequestError) as info:
        ApiKeys(["secret-1", "secret-2"]).check(header)
    assert info.value.status == 401
    assert detail in info.value.detail
    assert info.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert "secret" not in info.value.detail


@pytest.mark.parametrize("header", ["Bearer secret-1", "bearer secret-2", "  Bearer   secret-2 "])
def test_api_key_check_accepts_every_configured_key(header):
    ApiKeys(["secret-1", "secret-2"]).check(header)


def test_api_keys_repr_hides_the_keys():
    assert "secret" not in repr(ApiKeys(["secret-1"])) and "1 keys" in repr(ApiKeys(["secret-1"]))


@pytest.mark.parametrize("env, file_text, where", [
    ("ok,has space", None, "KLEIN_API_KEYS entry 2"), ("clé", None, "KLEIN_API_KEYS entry 1"),
    (None, "# keys\nok\nquote\"d", "KLEIN_API_KEYS_FILE line 3"), ("a=b", None, "KLEIN_API_KEYS entry 1"),
])
def test_parse_api_keys_refuses_keys_a_bearer_header_cannot_carry(env, file_text, where):
    with pytest.raises(ValueError, match="RFC 6750") as info:
        parse_api_keys(env, file_text)
    assert where in str(info.value) and "space" not in str(info.value) and "clé" not in str(info.value)
    assert parse_api_keys("tok-EN_1.2~+/==", None) == ("tok-EN_1.2~+/==",)


def test_api_keys_replace():
    keys = ApiKeys(["old"])
    keys.replace(["new"])
    keys.check("Bearer new")
    with pytest.raises(RequestError):
        keys.check("Bearer old")


# ---- settings ----

@pytest.mark.parametrize("max_batch, sizes", [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 4)),
                                              (6, (1, 2, 4, 6))])
def test_batch_sizes_are_powers_of_two_and_max_batch(max_batch, sizes):
    assert Settings(auth=False, max_batch=max_batch).batch_sizes == sizes


def test_settings_refuse_auth_without_keys_and_bad_values():
    with pytest.raises(ValueError, match="KLEIN_API_KEYS"):
        Settings()
    with pytest.raises(ValueError, match="max_queue=0"):
        Settings(auth=False, max_queue=0)
    with pytest.raises(ValueError, match="huge"):
        Settings(auth=False, aspect_ratios=("huge",))


def test_parse_aspect_ratios_networks_and_hosts():
    assert parse_aspect_ratios("all") == tuple(ASPECT_RATIOS)
    assert parse_aspect_ratios("wide, square,wide") == ("wide", "square")
    with pytest.raises(ValueError, match="square, landscape"):
        parse_aspect_ratios("square,cinema")
    assert parse_networks(["127.0.0.2/32,10.0.0.0/8", "::1"]) == (
        ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks(["not-a-net"])
    assert parse_hosts(["Images.Example.com., .cdn.example"]) == ("images.example.com", ".cdn.example")


# ---- form validation ----

def _validate(fields, files=()):
    return validate_form(MultiDict(fields), MultiDict(files), SETTINGS, MODELS)


def _file(data: bytes, name="a.png"):
    import io

    return FileStorage(io.BytesIO(data), filename=name, name="images")


def test_validate_form_defaults_and_order():
    uris = ["https://example.com/a.png", data_uri(b"x")]
    form = _validate([("prompt", " a cat "), ("image_uris", __import__("json").dumps(uris)), ("seed", "42"),
                      ("unknown_extra", "ignored")], [("images", _file(b"1")), ("images", _file(b"2", "b.png"))])
    assert form == GenerateForm(prompt=" a cat ", model="flux2-klein-4b", aspect_ratio="landscape", seed=42,
                                uploads=form.uploads, image_uris=tuple(uris))
    assert [u.data for u in form.uploads] == [b"1", b"2"] and form.num_references == 4


def test_validate_form_skips_an_empty_browser_file_input_and_blank_seed():
    form = _validate([("prompt", "p"), ("seed", ""), ("model", "other"), ("aspect_ratio", "wide")],
                     [("images", _file(b"", name=""))])
    assert form.uploads == () and form.seed is None and form.model == "other" and form.aspect_ratio == "wide"


@pytest.mark.parametrize("fields, files, detail", [
    ([], [], "prompt is required"),
    ([("prompt", "")], [], "prompt is empty or whitespace only"),
    ([("prompt", " \t\n")], [], "prompt is empty or whitespace only"),
    ([("prompt", "x" * 20_001)], [], "at most 20000"),
    ([("prompt", "a"), ("prompt", "b")], [], "'prompt' was sent 2 times"),
    ([("prompt", "p"), ("model", "flux2-klein-9b")], [], "flux2-klein-4b, other"),
    ([("prompt", "p"), ("aspect_ratio", "cinema")], [], "square, landscape, portrait"),
    ([("prompt", "p"), ("aspect_ratio", "portrait")], [], "not enabled on this server; use one of square, landscape"),
    ([("prompt", "p"), ("seed", "-1")], [], "seed='-1' is not an integer"),
    ([("prompt", "p"), ("seed", "1.5")], [], "is not an integer"),
    ([("prompt", "p"), ("seed", "١٢")], [], "is not an integer"),
    ([("prompt", "p"), ("seed", str(2**64))], [], "is not an integer in 0..18446744073709551615"),
    ([("prompt", "p"), ("image_uris", "[not json")], [], "image_uris is not valid JSON"),
    ([("prompt", "p"), ("image_uris", "[" * 100_000)], [], "image_uris is not valid JSON"),
    ([("prompt", "p"), ("image_uris", '{"a": 1}')], [], "JSON array of strings"),
    ([("prompt", "p"), ("image_uris", "[1]")], [], "JSON array of strings"),
    ([("prompt", "p"), ("image_uris", '["ftp://x/a.png"]')], [], "image_uris[0]: only http://"),
    ([("prompt", "p"), ("image_uris", '["file:///etc/passwd"]')], [], "only http://"),
    ([("prompt", "p"), ("image_uris", '["/relative.png"]')], [], "only http://"),
    ([("prompt", "p"), ("images", "https://x/a.png")], [], "images must be uploaded files"),
    ([("prompt", "p")], [("image", "f")], "unexpected file field(s) 'image'"),
    ([("prompt", "p"), ("image_uris", '["http://a/1", "http://a/2"]')], [("images", "f")] * 3,
     "5 reference images given (3 files + 2 image_uris); at most 4"),
])
def test_validate_form_refuses_with_422(fields, files, detail):
    files = [(name, _file(b"img")) for name, _ in files]
    with pytest.raises(RequestError) as info:
        _validate(fields, files)
    assert info.value.status == 422
    assert detail in info.value.detail


# ---- SSRF policy ----

@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"), ("100.64.0.1", "non-global"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"), ("2002:7f00:1::", "loopback"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo whose client is 127.0.0.1
    ("8.8.8.8", None), ("1.1.1.1", None), ("2606:4700:4700::1111", None),
])
def test_forbidden_reason(address, reason):
    assert forbidden_reason(ipaddress.ip_address(address)) == reason


def test_address_policy_allow_lists():
    policy = AddressPolicy(allow_hosts=("images.internal", ".cdn.internal"),
                           allow_networks=parse_networks(["127.0.0.2/32"]))
    assert policy.check("images.internal", "10.0.0.1") is None
    assert policy.check("a.cdn.internal", "192.168.0.1") is None
    assert policy.check("cdn.internal.evil", "192.168.0.1") == "a private address"
    assert policy.check("x", "127.0.0.2") is None
    assert policy.check("x", "127.0.0.1") == "a loopback address"
    assert policy.check("x", "93.184.215.14") is None


def test_parse_dns_servers():
    assert parse_dns_servers("1.1.1.1, 127.0.0.1:5353,::1,[::1]:53") == ("1.1.1.1", "127.0.0.1:5353", "::1",
                                                                          "[::1]:53")
    assert parse_dns_servers("") == ()
    for bad in ("dns.example", "1.1.1.1:0", "1.1.1.1:x", "[::1]x"):
        with pytest.raises(ValueError, match="is not IP, IP:PORT"):
            parse_dns_servers(bad)


@pytest.mark.parametrize("host, address", [
    ("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("::1", "::1"),
    ("10.0.0.1", "10.0.0.1"), ("cafe.be", None), ("example.com", None), ("1.2.3.4.5", None),
])
def test_ip_literals_include_the_legacy_ipv4_forms(host, address):
    assert _ip_literal(host) == address


def test_decode_data_uri():
    assert decode_data_uri("data:image/png;base64,aGVsbG8=", max_bytes=10, label="u") == b"hello"
    assert decode_data_uri("DATA:image/jpeg;name=a.jpg;base64,aGVs\nbG8=", max_bytes=10, label="u") == b"hello"
    for uri, detail in [("data:text/plain;base64,aGVsbG8=", "must look like"), ("data:image/png,hello", "must look"),
                        ("data:image/png;base64,a*b=", "not valid base64"),
                        ("data:image/png;base64," + "A" * 40, "larger than 10 bytes"),
                        ("data:image/png;base64," + "A" * 10_000, "larger than 10 bytes")]:
        with pytest.raises(RequestError, match="u: ") as info:
            decode_data_uri(uri, max_bytes=10, label="u")
        assert info.value.status == 422 and detail in info.value.detail


# ---- image decoding ----

def test_decode_image_keeps_the_mode_but_reduces_16_bit_grey():
    # klein_jax.images converts to RGB after resizing, as diffusers does; only 16-bit grey is reduced here.
    for data, mode in ((png_bytes(), "RGB"), (png_bytes(mode="RGBA", color=(1, 2, 3, 4)), "RGBA"),
                       (png_bytes(mode="L", color=7), "L"), (png_bytes(mode="P", color=3), "P"), (jpeg_bytes(), "RGB")):
        image = decode_image(data, max_pixels=10_000, label="x")
        assert image.mode == mode and image.size == (96, 64)
    grey = decode_image(png_bytes(mode="I;16", color=0xABCD), max_pixels=10_000, label="x")
    assert grey.mode == "L" and grey.getpixel((0, 0)) == 0xAB


def test_pixel_budget_waits_in_order_and_gives_back_on_cancel():
    async def go():
        budget = PixelBudget(100)
        assert await budget.acquire(500) == 100  # capped to the whole budget: one image of any allowed size fits
        budget.release(100)
        assert await budget.acquire(60) == 60
        big = asyncio.ensure_future(budget.acquire(100))
        small = asyncio.ensure_future(budget.acquire(10))  # would fit, but waits behind `big`: first come first served
        cancelled = asyncio.ensure_future(budget.acquire(30))
        await asyncio.sleep(0)
        assert not big.done() and not small.done()
        cancelled.cancel()
        budget.release(60)
        assert await big == 100 and not small.done() and budget.used == 100
        budget.release(100)
        assert await small == 10 and budget.used == 10 and not budget._waiters

    asyncio.run(go())


def test_decode_image_applies_exif_orientation():
    image = decode_image(jpeg_bytes(size=(96, 64), exif_orientation=6), max_pixels=10_000, label="x")
    assert image.size == (64, 96)  # orientation 6: rotate 90 degrees


def test_decode_image_other_formats():
    import io

    from PIL import Image

    for fmt in ("WEBP", "GIF"):
        buffer = io.BytesIO()
        Image.new("RGB", (80, 70), (9, 9, 9)).save(buffer, format=fmt)
        assert decode_image(buffer.getvalue(), max_pixels=10_000, label="x").size == (80, 70)
    buffer = io.BytesIO()
    Image.new("RGB", (80, 70)).save(buffer, format="TIFF")
    with pytest.raises(RequestError, match="x is not a PNG, JPEG, WEBP, GIF image"):
        decode_image(buffer.getvalue(), max_pixels=10_000, label="x")


@pytest.mark.parametrize("data, detail", [
    (b"hello, not an image", "is not a PNG, JPEG, WEBP, GIF image"),
    (b"", "is not a PNG"),
    (png_bytes()[:60], "could not be decoded"),
    (png_bytes(size=(101, 100)), "101x100 = 10100 pixels; at most 10000"),
])
def test_decode_image_refuses_with_422(data, detail):
    with pytest.raises(RequestError) as info:
        decode_image(data, max_pixels=10_000, label="images[0]")
    assert info.value.status == 422 and detail in info.value.detail and "images[0]" in info.value.detail


def test_decode_image_refuses_a_decompression_bomb_before_decoding():
    data = bomb_png()
    assert len(data) < 200_000
    start = time.perf_counter()
    for max_pixels in (4096 * 4096, 10**12):  # our limit, and past it Pillow's own
        with pytest.raises(RequestError, match=r"x is a decompression bomb \(Image size \(400000000 pixels\)"):
            decode_image(data, max_pixels=max_pixels, label="x")
    with pytest.raises(RequestError, match="x is 5000x5000 = 25000000 pixels; at most 16777216"):
        decode_image(bomb_png((5000, 5000)), max_pixels=4096 * 4096, label="x")
    assert time.perf_counter() - start < 1.0


# ---- the device worker ----

def _worker(pipe, **kw):
    options = dict(max_queue=8, max_batch=4, batch_wait_s=0.05, metrics=Metrics(), warm_up=lambda: None) | kw
    worker = DeviceWorker({"m": pipe}, **options)
    worker.start()
    assert worker.ready.wait(5)
    return worker


def test_worker_batches_requests_with_the_same_key_and_keeps_others_apart():
    pipe = FakePipeline()
    worker = _worker(pipe)

    async def go():
        small = [pipe.prepare(f"p{i}", width=64, height=32, seed=i) for i in range(3)]
        large = pipe.prepare("q", width=32, height=64, seed=9)
        jobs = [worker.submit("m", p) for p in (small[0], large, small[1], small[2])]
        return await asyncio.gather(*(job.future for job in jobs)), jobs

    images, jobs = asyncio.run(go())
    worker.stop()
    assert [len(b) for b in pipe.batches] == [3, 1]
    assert [p.prompt for p in pipe.batches[0]] == ["p0", "p1", "p2"]
    assert [i.size for i in images] == [(64, 32), (32, 64), (64, 32), (64, 32)]
    assert [j.batch_size for j in jobs] == [3, 1, 3, 3]


def test_worker_queue_is_bounded_and_cancelled_jobs_never_run():
    pipe = FakePipeline(delay_s=0.3)
    worker = _worker(pipe, max_queue=2, max_batch=1, batch_wait_s=0.0)

    async def go():
        running = worker.submit("m", pipe.prepare("running", seed=1))
        await asyncio.to_thread(pipe.run_started.wait, 5)
        queued = [worker.submit("m", pipe.prepare(f"q{i}", seed=i)) for i in range(2)]
        with pytest.raises(QueueFull):
            worker.submit("m", pipe.prepare("overflow", seed=3))
        assert worker.cancel(queued[0]) and not worker.cancel(running)
        await asyncio.gather(running.future, queued[1].future)

    asyncio.run(go())
    worker.stop()
    assert [[p.prompt for p in b] for b in pipe.batches] == [["running"], ["q1"]]


def test_worker_admits_only_what_can_finish_in_time():
    pipe = FakePipeline(delay_s=0.4)
    worker = _worker(pipe, max_queue=8, max_batch=1, batch_wait_s=0.0)

    async def go():
        await worker.submit("m", pipe.prepare("measure", seed=0), max_wait_s=1.0).future  # one measured batch
        running = worker.submit("m", pipe.prepare("running", seed=1), max_wait_s=1.0)
        await asyncio.to_thread(time.sleep, 0.05)
        queued = worker.submit("m", pipe.prepare("queued", seed=2), max_wait_s=1.0)  # ~0.35 + 0.4 s: in time
        with pytest.raises(Overloaded) as info:  # ~0.35 + 2 x 0.4 s > 1 s
            worker.submit("m", pipe.prepare("late", seed=9), max_wait_s=1.0)
        assert info.value.depth == 1 and 1.0 < info.value.estimate_s < 1.6, info.value.estimate_s
        await asyncio.gather(running.future, queued.future)
        worker.submit("m", pipe.prepare("idle", seed=5), max_wait_s=0.01)  # an idle device takes anything

    asyncio.run(go())
    worker.stop()


def test_worker_drain_refuses_what_cannot_finish_and_runs_the_rest():
    pipe = FakePipeline(delay_s=0.6)
    worker = _worker(pipe, max_queue=8, max_batch=1, batch_wait_s=0.0)

    async def go():
        await worker.submit("m", pipe.prepare("measure", seed=0)).future
        jobs = [worker.submit("m", pipe.prepare(f"p{i}", seed=i)) for i in range(4)]
        while jobs[0].started_s is None:
            await asyncio.sleep(0.005)
        # The deadline counts in measured batch times from the running job's start, so that the drain's own
        # arithmetic (not the machine's load) decides: the running one ends at 1 x, the next at 2 x (kept), the
        # third at 3 x (refused now). The next one's start may be late by 0.9 x (~0.54 s) and still fit.
        measured_s = worker._batch_time(jobs[0].key)
        worker.drain(jobs[0].started_s + 2.9 * measured_s)
        with pytest.raises(WorkerStopped):
            worker.submit("m", pipe.prepare("new", seed=7))
        return await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)

    results = asyncio.run(go())
    worker.stop()
    assert [type(r).__name__ for r in results] == ["Image", "Image", "WorkerStopped", "WorkerStopped"]
    assert "drain time" in str(results[2])


def test_worker_survives_a_batch_that_raises_a_base_exception():
    class Abort(BaseException):
        pass

    pipe = FakePipeline(error=Abort("no"))
    worker = _worker(pipe, max_batch=1)

    async def go():
        with pytest.raises(RuntimeError, match="batch raised Abort"):
            await worker.submit("m", pipe.prepare("a", seed=1)).future
        pipe.error = None
        return await worker.submit("m", pipe.prepare("b", seed=2)).future

    assert asyncio.run(go()).size == (1024, 1024) and worker.alive
    assert worker.metrics.batch_failures._value.get() == 1
    worker.stop()


def test_metrics_count_unknown_methods_as_other():
    metrics = Metrics()
    for method in ("GET", "BREW", "PROPFIND", "get"):
        metrics.count_request("/healthz", method, 200)
    text = metrics.render()[0].decode()
    assert 'method="other",route="/healthz",status="200"} 3.0' in text and "BREW" not in text


def test_worker_failed_warm_up_is_reported():
    def fail():
        raise RuntimeError("no device")

    worker = DeviceWorker({"m": FakePipeline()}, max_queue=1, max_batch=1, batch_wait_s=0, metrics=Metrics(),
                          warm_up=fail)
    worker.start()
    worker._thread.join(5)
    assert not worker.ready.is_set() and worker.failure == "RuntimeError: no device"


# ---- the command line (without starting a server) ----

def test_parse_models():
    assert cli.parse_models(["/models/klein", "big=/models/9b", "org/repo"][:2]) == {
        "flux2-klein-4b": "/models/klein", "big": "/models/9b"}
    assert cli.parse_models(["black-forest-labs/FLUX.2-klein-4B"]) == {
        "flux2-klein-4b": "black-forest-labs/FLUX.2-klein-4B"}
    with pytest.raises(ValueError, match="given twice"):
        cli.parse_models(["a", "b"])


@pytest.mark.parametrize("argv, env, status, message", [
    ([], {}, 2, "nothing to serve"),
    (["--demo"], {}, 2, "no API key configured"),
    (["--demo", "--port", "x"], {}, 2, "invalid int value"),
    (["--demo", "--aspect-ratios", "square,cinema"], {}, 2, "use 'all' or names from"),
    (["--demo", "--model", "/x"], {"KLEIN_API_KEYS": "k"}, 2, "--demo serves the id flux2-klein-4b"),
    (["--demo", "--max-batch", "0"], {"KLEIN_API_KEYS": "k"}, 2, "max_batch=0 must be at least 1"),
    (["--demo"], {"KLEIN_API_KEYS_FILE": "/nonexistent/keys"}, 1, "cannot read KLEIN_API_KEYS_FILE"),
    (["--demo", "--allow-networks", "nope"], {"KLEIN_API_KEYS": "k"}, 2, "network 'nope'"),
    (["--demo", "--compile-references", "5"], {"KLEIN_API_KEYS": "k"}, 2, "compile_references=5 must be in 0..4"),
])
def test_cli_refuses_bad_arguments_with_one_line(monkeypatch, capsys, argv, env, status, message):
    for name in ("KLEIN_API_KEYS", "KLEIN_API_KEYS_FILE", "KLEIN_MODEL", "KLEIN_DEMO", "KLEIN_NO_AUTH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == status
    assert message in err and err.count("\n") == 1, err


def test_cli_help_lists_every_contract_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--demo", "--host", "--port", "--no-auth", "--timeout-s", "--max-queue", "--max-batch",
                 "--aspect-ratios", "--allow-hosts", "--allow-networks"):
        assert flag in out


def test_cli_flags_fall_back_to_klein_environment(monkeypatch):
    monkeypatch.setenv("KLEIN_MAX_QUEUE", "7")
    monkeypatch.setenv("KLEIN_ASPECT_RATIOS", "square,wide")
    monkeypatch.setenv("KLEIN_ALLOW_NETWORKS", "127.0.0.2/32")
    args = cli.build_parser().parse_args(["--demo"])
    settings = cli.settings_from_args(args, ("k",))
    assert settings.max_queue == 7 and settings.aspect_ratios == ("square", "wide")
    assert settings.allow_networks == (ipaddress.ip_network("127.0.0.2/32"),)
    assert cli.settings_from_args(cli.build_parser().parse_args(["--max-queue", "3"]), ("k",)).max_queue == 3
