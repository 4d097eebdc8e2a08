"""klein-serve: the HTTP server of shared/spec/api.md on Hypercorn. Flags fall back to KLEIN_* variables.

This is the only module of the server that reads the environment or sets process-wide state (logging,
Pillow's pixel limit, JAX's compilation cache).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import signal
import socket
import sys
import warnings

from server.auth import parse_api_keys
from server.settings import DEFAULT_MODEL_ID, Settings, parse_aspect_ratios, parse_hosts, parse_networks

log = logging.getLogger("server")

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TRUE = ("1", "true", "yes", "on")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _env(name: str, default=None):
    return os.environ.get(f"KLEIN_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    """klein-serve's flags; each default comes from KLEIN_<FLAG> when that variable is set."""
    p = _Parser(prog="klein-serve", description="Serve FLUX.2 [klein] over HTTP (POST /v1/generate). API keys come "
                "from KLEIN_API_KEYS (comma-separated) or KLEIN_API_KEYS_FILE (one per line).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    models = _env("MODEL")
    p.add_argument("--model", action="append", metavar="[ID=]SRC", default=models.split(",") if models else None,
                   help=f"a klein-convert folder, diffusers folder or hub id to serve as ID (default id "
                        f"{DEFAULT_MODEL_ID}); repeat for several models (env KLEIN_MODEL, comma-separated)")
    p.add_argument("--demo", action="store_true", default=_env("DEMO", "").lower() in _TRUE,
                   help=f"serve a tiny in-memory model with random weights (noise images) as {DEFAULT_MODEL_ID}")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=_env("DTYPE", "bfloat16"),
                   help="compute and parameter dtype of --model")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address to listen on")
    p.add_argument("--port", type=int, default=_env("PORT", "8000"), help="port to listen on (0: any free port)")
    p.add_argument("--no-auth", action="store_true", default=_env("NO_AUTH", "").lower() in _TRUE,
                   help="serve without API keys (only on a trusted network)")
    p.add_argument("--timeout-s", type=float, default=_env("TIMEOUT_S", "120"),
                   help="limit on queue wait plus generation; past it, 504")
    p.add_argument("--max-queue", type=int, default=_env("MAX_QUEUE", "64"),
                   help="requests waiting for the device; past it, 503 with Retry-After")
    p.add_argument("--max-batch", type=int, default=_env("MAX_BATCH", "4"),
                   help="requests of the same shape run together on the device")
    p.add_argument("--batch-wait-ms", type=float, default=_env("BATCH_WAIT_MS", "5"),
                   help="how long a batch waits for more requests of its shape")
    p.add_argument("--aspect-ratios", type=_aspect_ratios, default=_env("ASPECT_RATIOS", "all"),
                   metavar="all|NAME,...", help="aspect ratios to compile and serve")
    p.add_argument("--compile-references", type=int, default=_env("COMPILE_REFERENCES"), metavar="N",
                   help="compile programs for up to N reference images at start-up (0-4; default 4, and 0 with "
                        "--demo so that the CPU demo is ready in minutes); requests with more compile theirs on "
                        "first use (a slow first request)")
    p.add_argument("--allow-hosts", action="append", default=[_env("ALLOW_HOSTS")] if _env("ALLOW_HOSTS") else [],
                   metavar="HOST,...", help="image_uris hosts fetched whatever they resolve to ('.example.com': "
                                            "every subdomain); repeatable")
    p.add_argument("--allow-networks", action="append", metavar="CIDR,...",
                   default=[_env("ALLOW_NETWORKS")] if _env("ALLOW_NETWORKS") else [],
                   help="addresses image_uris may connect to although private or loopback; repeatable")
    p.add_argument("--max-body-bytes", type=int, default=_env("MAX_BODY_BYTES", str(64 * 2**20)),
                   help="request body limit; past it, 413")
    p.add_argument("--max-image-bytes", type=int, default=_env("MAX_IMAGE_BYTES", str(16 * 2**20)),
                   help="limit per reference image (upload, fetched or data: URI); past it, 422")
    p.add_argument("--max-image-pixels", type=int, default=_env("MAX_IMAGE_PIXELS", str(4096 * 4096)),
                   help="pixel limit per reference image (decompression bombs); past it, 422")
    p.add_argument("--fetch-timeout-s", type=float, default=_env("FETCH_TIMEOUT_S", "10"),
                   help="time limit per image_uris entry, redirects included")
    p.add_argument("--max-redirects", type=int, default=_env("MAX_REDIRECTS", "3"),
                   help="redirects followed per image_uris entry")
    p.add_argument("--compile-cache", default=_env("COMPILE_CACHE"), metavar="DIR",
                   help="persistent JAX compilation cache: later starts load programs instead of compiling")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def _aspect_ratios(value: str) -> tuple[str, ...]:
    try:
        return parse_aspect_ratios(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_models(values: list[str]) -> dict[str, str]:
    """'[ID=]SRC' strings -> {id: src}; ValueError on a repeated id."""
    models: dict[str, str] = {}
    for value in values:
        model_id, sep, src = value.partition("=")
        if not sep or not _MODEL_ID.fullmatch(model_id):
            model_id, src = DEFAULT_MODEL_ID, value
        if model_id in models:
            raise ValueError(f"model id {model_id!r} given twice; name the others: --model ID=SRC")
        models[model_id] = src
    return models


def _read_keys() -> tuple[str, ...]:
    """KLEIN_API_KEYS and KLEIN_API_KEYS_FILE (OSError if the file cannot be read)."""
    path = os.environ.get("KLEIN_API_KEYS_FILE")
    file_text = None
    if path:
        with open(path, encoding="utf-8") as f:
            file_text = f.read()
    return parse_api_keys(os.environ.get("KLEIN_API_KEYS"), file_text)


def _compile_references(args: argparse.Namespace) -> int:
    """--compile-references, defaulting to every reference count, or none for the CPU demo."""
    if args.compile_references is not None:
        return int(args.compile_references)
    return 0 if args.demo else Settings.compile_references


def settings_from_args(args: argparse.Namespace, api_keys: tuple[str, ...]) -> Settings:
    """Settings from parsed flags (ValueError on bad values)."""
    return Settings(
        host=args.host, port=args.port, api_keys=api_keys, auth=not args.no_auth, timeout_s=args.timeout_s,
        max_queue=args.max_queue, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        aspect_ratios=args.aspect_ratios, compile_references=_compile_references(args),
        max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, fetch_timeout_s=args.fetch_timeout_s,
        max_redirects=args.max_redirects, allow_hosts=parse_hosts(args.allow_hosts),
        allow_networks=parse_networks(args.allow_networks),
    )


def _configure_process(args: argparse.Namespace, settings: Settings) -> None:
    """Logging (access log: JSON lines on stdout; the rest on stderr), Pillow's bomb limit, the compile cache."""
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint read at INFO
    access = logging.getLogger("server.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)  # images.py answers it with a 422
    if args.compile_cache:
        from klein_jax.compilation_cache import enable_compilation_cache

        enable_compilation_cache(args.compile_cache)


def _load_models(args: argparse.Namespace, sources: dict[str, str]) -> dict:
    models = {}
    if args.demo:
        from klein_jax.demo import build_demo_pipeline

        models[DEFAULT_MODEL_ID] = build_demo_pipeline()
        log.warning("--demo: serving a tiny model with random weights as %s; its images are noise", DEFAULT_MODEL_ID)
    if sources:
        from klein_jax import KleinPipeline

        for model_id, src in sources.items():
            models[model_id] = KleinPipeline.from_pretrained(src, dtype=args.dtype)
            log.info("loaded model %s from %s", model_id, src)
    return models


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def _serve(app, sock: socket.socket) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn listens on the socket bound above
    config.accesslog = None  # the app writes its own JSON access log
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 5.0
    # Longer than clients' idle keep-alive (httpx, requests: 5 s; the same as hypercorn's default): a client then
    # drops an idle connection before the server does, instead of sending a request as the server closes it.
    config.keep_alive_timeout = 75.0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(app, config, shutdown_trigger=stop.wait)


def main(argv: list[str] | None = None) -> int:
    """Entry point of klein-serve; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo and not args.model:
        parser.error("nothing to serve: pass --model [ID=]SRC or --demo")
    try:
        sources = parse_models(args.model or [])
        if args.demo and DEFAULT_MODEL_ID in sources:
            raise ValueError(f"--demo serves the id {DEFAULT_MODEL_ID}; name the other model: --model ID=SRC")
        keys = () if args.no_auth else _read_keys()
        settings = settings_from_args(args, keys)
    except OSError as e:
        parser.exit(1, f"klein-serve: error: cannot read KLEIN_API_KEYS_FILE: {e}\n")
    except ValueError as e:
        parser.error(str(e))
    _configure_process(args, settings)
    try:
        sock = _bind(settings.host, settings.port)
        models = _load_models(args, sources)
    except Exception as e:  # noqa: BLE001 - one readable line, exit 1
        log.error("cannot start: %s: %s", type(e).__name__, e)
        return 1
    from server.app import create_app

    settings = dataclasses.replace(settings, port=sock.getsockname()[1])
    log.info("serving on %s (auth %s); compiling programs, /readyz turns ready when done", settings.base_url,
             "on" if settings.auth else "OFF")
    asyncio.run(_serve(create_app(models, settings), sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
