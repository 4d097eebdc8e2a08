"""Server test helpers: a fake pipeline, an in-process app client, loopback HTTP servers, a server subprocess."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import http.server
import io
import os
import pathlib
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import httpx
from PIL import Image

from klein_jax.request import check_prompt, check_reference_count, check_seed, check_size

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def session_compile_cache(tmp_path_factory) -> pathlib.Path:
    """The session's persistent JAX compilation cache, under pytest's base temp folder (tests/test_readme.py and
    tests/test_notebooks.py use the same folder). The contract test's servers and the fuzz test's demo pipeline
    share it: the demo and the converted tiny model have the same configs, so their programs compile once."""
    folder = tmp_path_factory.getbasetemp() / "jax-compile-cache"
    folder.mkdir(exist_ok=True)
    return folder


# ---- a pipeline with the batch API of klein_jax.pipeline.KleinPipeline, answering solid images ----

@dataclasses.dataclass(frozen=True)
class FakePrepared:
    prompt: str
    width: int
    height: int
    seed: int
    reference_sizes: tuple[tuple[int, int], ...]
    reference_colors: tuple[tuple[int, int, int], ...]

    @property
    def batch_key(self):
        return self.width, self.height, self.reference_sizes

    @property
    def references(self):
        return self.reference_sizes


class FakePipeline:
    """Solid-colour images whose colour hashes prompt, seed and the references in order."""

    def __init__(self, *, delay_s: float = 0.0, error: Exception | None = None,
                 compile_gate: threading.Event | None = None, is_demo: bool = False):
        self.delay_s = delay_s
        self.error = error
        self.compile_gate = compile_gate
        self.is_demo = is_demo
        self.model_info = {"name": "fake", "dtype": "float32", "is_distilled": True, "steps": 4}
        self.batches: list[list[FakePrepared]] = []
        self.compile_calls: list[dict] = []
        self.run_started = threading.Event()

    @property
    def compile_count(self) -> int:
        return len(self.compile_calls)

    def prepare(self, prompt, images=(), width=1024, height=1024, seed=None):
        check_prompt(prompt)
        check_size(width, height)
        check_reference_count(len(images))
        images = [image.convert("RGB") for image in images]  # the server hands over references in their own mode
        for image in images:
            if min(image.size) < 64:
                raise ValueError(f"reference image {image.size} is too small; both sides must be at least 64 px")
        seed = random.randrange(2**32) if seed is None else check_seed(seed)
        return FakePrepared(prompt, width, height, seed, tuple(i.size for i in images),
                            tuple(i.getpixel((0, 0)) for i in images))

    def run_batch(self, prepared):
        self.run_started.set()
        self.batches.append(list(prepared))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return [Image.new("RGB", (p.width, p.height), self.color(p)) for p in prepared]

    @staticmethod
    def color(p: FakePrepared) -> tuple[int, int, int]:
        digest = hashlib.sha256(repr((p.prompt, p.seed, p.reference_colors, p.reference_sizes)).encode()).digest()
        return digest[0], digest[1], digest[2]

    def compile(self, aspect_ratios="all", max_references=4, batch_sizes=(1,)):
        if self.compile_gate is not None:
            self.compile_gate.wait(60)
        self.compile_calls.append(dict(aspect_ratios=aspect_ratios, max_references=max_references,
                                       batch_sizes=batch_sizes))
        return 1


# ---- the app in-process: Quart's test app on a private event loop in a thread ----

class LoopThread:
    """An asyncio loop running in a daemon thread; run() submits a coroutine and waits for it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    def json(self):
        import json

        return json.loads(self.body)


class AppClient:
    """Starts create_app's lifespan (worker thread, compile) and sends requests through Quart's test client."""

    def __init__(self, app, *, wait_ready: bool = True):
        self.app = app
        self.loop = LoopThread()
        self.test_app = app.test_app()
        self.loop.run(self.test_app.startup())
        self.client = self.test_app.test_client()
        self.service = app.extensions["klein"]
        if wait_ready:
            self.service.worker.ready.wait(300)
            assert self.service.ready, self.service.worker.failure

    def close(self):
        self.loop.run(self.test_app.shutdown())
        self.loop.close()

    async def _open(self, path, method, headers, body):
        response = await self.client.open(path, method=method, headers=headers, data=body)
        return Answer(response.status_code, response.headers, await response.get_data())

    def request(self, method: str, path: str, *, headers: dict | None = None, body: bytes | None = None) -> Answer:
        return self.loop.run(self._open(path, method, headers or {}, body))

    def generate(self, fields=(), files=(), *, key: str | None = "test-key", headers: dict | None = None) -> Answer:
        body, content_type = encode_form(fields, files)
        all_headers = {"Content-Type": content_type, **(headers or {})}
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        return self.request("POST", "/v1/generate", headers=all_headers, body=body)

    def generate_async(self, fields=(), files=(), *, key: str | None = "test-key"):
        """Starts a request without waiting; returns a concurrent.futures.Future of its Answer."""
        body, content_type = encode_form(fields, files)
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {key}"}
        return asyncio.run_coroutine_threadsafe(self._open("/v1/generate", "POST", headers, body), self.loop.loop)


def encode_form(fields=(), files=()) -> tuple[bytes, str]:
    """A multipart body (or urlencoded when there are no files) from [(name, value)] and [(name, filename, bytes)]."""
    fields = list(fields.items()) if isinstance(fields, dict) else list(fields)
    if files:
        request = httpx.Request("POST", "http://x/", data=dict(_group(fields)),
                                files=[(name, (filename, data, "application/octet-stream"))
                                       for name, filename, data in files])
    else:
        request = httpx.Request("POST", "http://x/", data=dict(_group(fields)))
    return request.read(), request.headers.get("Content-Type", "application/x-www-form-urlencoded")


def _group(fields):
    grouped: dict[str, list] = {}
    for name, value in fields:
        grouped.setdefault(name, []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in grouped.items()}


# ---- images ----

def png_bytes(size=(96, 64), color=(200, 30, 60), mode="RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def jpeg_bytes(size=(96, 64), color=(10, 200, 60), exif_orientation: int | None = None) -> bytes:
    image = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def bomb_png(size=(20000, 20000)) -> bytes:
    """A 1-bit black PNG: 20000x20000 is 400 M pixels in ~50 kB."""
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_png(body: bytes) -> Image.Image:
    assert body[:8] == b"\x89PNG\r\n\x1a\n", body[:80]
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


# ---- a loopback HTTP server that records every request it gets ----

class RecordingServer:
    """ThreadingHTTPServer on a loopback address serving `routes` {path: (status, headers, body)}."""

    def __init__(self, host: str = "127.0.0.1", routes: dict | None = None):
        self.routes = dict(routes or {})
        self.requests: list[tuple[str, str, dict]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = outer.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "X-No-Length" not in headers:  # else HTTP/1.0: the body ends when the connection closes
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server_class = http.server.ThreadingHTTPServer
        if ":" in host:
            server_class = type("V6Server", (http.server.ThreadingHTTPServer,), {"address_family": 10})
        self.server = server_class((host, 0), Handler)
        self.host = host
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---- klein-serve in a subprocess ----

class ServerProcess:
    """`python -m server ARGS` on 127.0.0.1 (port chosen by the server); logs go to files under log_dir.

    launcher: the command before ARGS instead of `python -m server`, e.g. echo_server_command() (klein-serve with the
    EchoPipeline); wait=False returns once the process is started (call wait_serving() later).
    """

    def __init__(self, args: Sequence[str], log_dir: pathlib.Path, env: dict | None = None,
                 launcher: Sequence[str] | None = None, wait: bool = True):
        self.stdout_path = log_dir / "server.stdout"
        self.stderr_path = log_dir / "server.stderr"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [*(launcher or [PYTHON, "-m", "server"]), "--host", "127.0.0.1", "--port", "0", *args], cwd=REPO,
            env=full_env, stdout=open(self.stdout_path, "wb"), stderr=open(self.stderr_path, "wb"))
        self.base_url = self.wait_serving() if wait else None

    def wait_serving(self) -> str:
        """The base URL, once the log says the port is open."""
        self.base_url = self._wait_for_line(r"serving on (http://\S+)", timeout_s=240)
        return self.base_url

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def _wait_for_line(self, pattern: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, self.stderr())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no {pattern!r} in the server log:\n{self.stderr()[-3000:]}")

    def wait_ready(self, timeout_s: float = 300, until_any_answer: bool = False) -> list[httpx.Response]:
        """Polls /readyz until 200 (or any answer); returns every answer it got (503s while compiling)."""
        answers = []
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=10, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
                try:
                    answer = client.get("/readyz")
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                answers.append(answer)
                if answer.status_code == 200 or until_any_answer:
                    return answers
                if "failed" in answer.text:
                    raise RuntimeError(f"start-up failed: {answer.text}\n{self.stderr()[-3000:]}")
                time.sleep(0.2)
        raise TimeoutError(f"not ready after {timeout_s} s:\n{self.stderr()[-3000:]}")

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size of a process so far, from /proc."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


# ---- klein-serve with a stand-in model, for the tests that need exact timings, faults or to see the references ----

class InjectedFault(BaseException):
    """What the EchoPipeline raises for the prompt 'fault:base': not an Exception, as a C extension's abort would be."""


@dataclasses.dataclass(frozen=True)
class EchoPrepared:
    prompt: str
    width: int
    height: int
    seed: int
    references: tuple  # preprocessed arrays (h, w, 3) in [-1, 1]

    @property
    def batch_key(self):
        return self.width, self.height, tuple(r.shape for r in self.references)


class EchoPipeline:
    """The batch API of KleinPipeline, answering what it was given: references are preprocessed by
    klein_jax.images (diffusers' order), and the image is the first reference pasted at the top-left of a black
    canvas, or a grey of the seed without references. Each batch sleeps delay_s. The prompt 'fault:base' raises
    InjectedFault, 'fault:error' a RuntimeError."""

    def __init__(self, *, delay_s: float = 0.0, name: str = "echo"):
        self.delay_s = delay_s
        self.is_demo = False
        self.model_info = {"name": name, "dtype": "float32", "is_distilled": True, "steps": 4}
        self.compile_count = 0

    def prepare(self, prompt, images=(), width=1024, height=1024, seed=None):
        from klein_jax.images import preprocess_references

        check_prompt(prompt)
        check_size(width, height)
        seed = random.randrange(2**32) if seed is None else check_seed(seed)
        return EchoPrepared(prompt, width, height, seed, tuple(preprocess_references(list(images))))

    def run_batch(self, prepared):
        import numpy as np

        time.sleep(self.delay_s)
        for p in prepared:
            if p.prompt == "fault:base":
                raise InjectedFault("injected by the test")
            if p.prompt == "fault:error":
                raise RuntimeError("injected by the test")
        images = []
        for p in prepared:
            canvas = np.full((p.height, p.width, 3), p.seed % 256, np.uint8)
            if p.references:
                pixels = reference_to_uint8(p.references[0])[:p.height, :p.width]
                canvas[:pixels.shape[0], :pixels.shape[1]] = pixels
            images.append(Image.fromarray(canvas))
        return images

    def compile(self, aspect_ratios="all", max_references=4, batch_sizes=(1,)):
        return 1


def reference_to_uint8(reference):
    """A preprocessed reference ([-1, 1] floats) back to 8-bit pixels."""
    import numpy as np

    return np.clip(np.round((reference + 1.0) * 127.5), 0, 255).astype(np.uint8)


def echo_server_command(*, delay_s: float = 0.0, name: str = "echo") -> list[str]:
    """The launcher of klein-serve serving an EchoPipeline as the default model id (see ServerProcess)."""
    return [PYTHON, str(pathlib.Path(__file__).resolve()), "--delay-s", str(delay_s), "--name", name, "--"]


def _serve_echo(argv: list[str]) -> int:
    """python tests/server_support.py [--delay-s S] [--name NAME] -- KLEIN-SERVE ARGS: klein-serve's own main with
    the EchoPipeline in place of --demo's model."""
    import argparse

    from server import __main__ as klein_serve
    from server.settings import DEFAULT_MODEL_ID

    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--name", default="echo")
    options = parser.parse_args(argv[:split])
    pipe = EchoPipeline(delay_s=options.delay_s, name=options.name)
    klein_serve._load_models = lambda args, sources: {DEFAULT_MODEL_ID: pipe}
    return klein_serve.main(["--demo", *argv[split + 1:]])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # this checkout's server, as `python -m server` from REPO would import
    sys.exit(_serve_echo(sys.argv[1:]))
