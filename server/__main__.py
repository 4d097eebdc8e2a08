"""klein-serve: the HTTP server of shared/spec/api.md on Hypercorn. Flags fall back to KLEIN_* variables.

This is the only module of the server that reads the environment or sets process-wide state (logging,
Pillow's pixel limit, JAX's compilation cache).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import logging
import os
import re
import signal
import socket
import sys
import warnings

from klein_jax.cli import mesh_flag
from server.auth import parse_api_keys
from server.settings import (DEFAULT_MODEL_ID, Settings, parse_aspect_ratios, parse_dns_servers, parse_hosts,
                             parse_networks)

log = logging.getLogger("server")

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TRUE = ("1", "true", "yes", "on")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _env(name: str, default=None):
    return os.environ.get(f"KLEIN_{name}", default)


def _env_name(flag: str) -> str:
    """The KLEIN_* variable of a flag, less its prefix: --max-queue -> MAX_QUEUE."""
    return flag.removeprefix("--").upper().replace("-", "_")


def _option(p: argparse.ArgumentParser, flag: str, default: str | None = None, **kwargs) -> None:
    """A flag whose default is KLEIN_<FLAG> when that variable is set."""
    p.add_argument(flag, default=_env(_env_name(flag), default), **kwargs)


def _switch(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    """An on/off flag that KLEIN_<FLAG> (1, true, yes or on) also turns on."""
    p.add_argument(flag, action="store_true", default=_env(_env_name(flag), "").lower() in _TRUE, help=help)


def _repeatable(p: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """A repeatable flag whose first value is KLEIN_<FLAG> when that variable is set."""
    value = _env(_env_name(flag))
    p.add_argument(flag, action="append", default=[value] if value else [], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """klein-serve's flags; each default comes from KLEIN_<FLAG> when that variable is set."""
    p = _Parser(prog="klein-serve", description="Serve FLUX.2 [klein] over HTTP (POST /v1/generate). API keys come "
                "from KLEIN_API_KEYS (comma-separated) or KLEIN_API_KEYS_FILE (one per line).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    models = _env("MODEL")
    p.add_argument("--model", action="append", metavar="[ID=]SRC", default=models.split(",") if models else None,
                   help=f"a klein-convert folder, diffusers folder or hub id to serve as ID (default id "
                        f"{DEFAULT_MODEL_ID}); repeat for several models (env KLEIN_MODEL, comma-separated)")
    loras = _env("LORA")
    p.add_argument("--lora", action="append", metavar="NAME=PATH[:SCALE]", default=loras.split(",") if loras else [],
                   help="a LoRA adapter (.safetensors file, folder or hub id) that requests name with the lora field, "
                        "at SCALE by default (1.0); repeat for several (env KLEIN_LORA, comma-separated)")
    _switch(p, "--demo", f"serve a tiny in-memory model with random weights (noise images) as {DEFAULT_MODEL_ID}")
    _option(p, "--dtype", "bfloat16", choices=("bfloat16", "float32"), help="compute and parameter dtype of --model")
    _option(p, "--quantization", type=_quantization, metavar="fp8",
            help="fp8: the transformer's block kernels stored as float8 e4m3 with a scale per output channel "
                 "(half their memory; docs/benchmarks.md has its PSNR)")
    _option(p, "--attention", type=_attention, metavar="xla|chunked|fused|cudnn|pallas",
            help="the transformer's attention backend (default: fused on CPU in float32, chunked on CPU in bfloat16, "
                 "cudnn on GPU in bfloat16, else xla; pallas: the TPU splash kernel)")
    _option(p, "--host", "127.0.0.1", help="address to listen on")
    _option(p, "--port", "8000", type=int, help="port to listen on (0: any free port)")
    _switch(p, "--no-auth", "serve without API keys (only on a trusted network)")
    _switch(p, "--no-playground", "do not serve the playground page at / (then / is a 404)")
    _option(p, "--timeout-s", "120", type=float, help="limit on queue wait plus generation; past it, 504")
    _option(p, "--max-queue", "64", type=int, help="requests waiting for the device; past it, 503 with Retry-After")
    _option(p, "--max-batch", "4", type=int, help="requests of the same shape run together on the device")
    _option(p, "--batch-wait-ms", "5", type=float, help="how long a batch waits for more requests of its shape")
    _option(p, "--aspect-ratios", "all", type=_aspect_ratios, metavar="all|NAME,...",
            help="aspect ratios to compile and serve")
    _option(p, "--compile-references", type=int, metavar="N",
            help="compile programs for up to N reference images at start-up (0-4; default 4, and 0 with --demo so "
                 "that the CPU demo is ready in minutes); requests with more compile theirs on first use (a slow "
                 "first request)")
    _repeatable(p, "--allow-hosts", metavar="HOST,...", help="image_uris hosts fetched whatever they resolve to "
                                                             "('.example.com': every subdomain); repeatable")
    _repeatable(p, "--allow-networks", metavar="CIDR,...",
                help="addresses image_uris may connect to although private or loopback; repeatable")
    _option(p, "--max-body-bytes", str(64 * 2**20), type=int, help="request body limit; past it, 413")
    _option(p, "--max-image-bytes", str(16 * 2**20), type=int,
            help="limit per reference image (upload, fetched or data: URI); past it, 422")
    _option(p, "--max-image-pixels", str(4096 * 4096), type=int,
            help="pixel limit per reference image (decompression bombs); past it, 422")
    _option(p, "--fetch-timeout-s", "10", type=float, help="time limit per image_uris entry, redirects included")
    _option(p, "--max-redirects", "3", type=int, help="redirects followed per image_uris entry")
    _option(p, "--max-decoded-pixels", type=int, metavar="N",
            help="decoded reference pixels all requests may hold at once (default 4 x --max-image-pixels); "
                 "requests past it wait for their turn to decode")
    _option(p, "--dns-servers", "", metavar="IP[:PORT],...",
            help="DNS servers that resolve image_uris hosts (default: those of /etc/resolv.conf)")
    _option(p, "--dns-timeout-s", "5", type=float, help="time limit per image_uris host look-up; past it, 422")
    _option(p, "--drain-timeout-s", "30", type=float,
            help="after SIGTERM or SIGINT: time to answer what is queued or running before exiting 0")
    _option(p, "--mesh", type=mesh_flag, metavar="data=D,model=M",
            help="shard every model over D*M devices: D splits the batch, M the weights (docs/sharding.md); "
                 "default one device")
    _switch(p, "--distributed", "one process per host of a multi-host job (jax.distributed; docs/deployment.md): "
                                "process 0 serves HTTP, the others run its batches")
    _option(p, "--compile-cache", metavar="DIR",
            help="persistent JAX compilation cache: later starts load programs instead of compiling")
    _option(p, "--log-level", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def _attention(value: str) -> str:
    from klein_jax.models.attention import BACKENDS

    if value not in BACKENDS:
        raise argparse.ArgumentTypeError(f"attention {value!r} is not one of {', '.join(BACKENDS)}")
    return value


def _quantization(value: str) -> str:
    from klein_jax.quantization import check_quantization

    try:
        return check_quantization(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
        max_decoded_pixels=args.max_decoded_pixels or 4 * args.max_image_pixels,
        dns_servers=parse_dns_servers(args.dns_servers), dns_timeout_s=args.dns_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        allow_networks=parse_networks(args.allow_networks), playground=not args.no_playground,
    )


def _return_freed_images_to_the_os() -> None:
    """glibc keeps freed blocks above its adaptive mmap threshold (up to 32 MiB) in per-thread heaps: after decoding
    a few 16 Mpx references on pool threads the RSS stays hundreds of MiB up, whatever --max-decoded-pixels held at
    once. A fixed threshold serves image-sized blocks with mmap, which free returns to the system."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 4 * 2**20)
        except (OSError, AttributeError):  # not glibc
            pass


def _configure_process(args: argparse.Namespace, settings: Settings) -> None:
    """Logging (access log: JSON lines on stdout; the rest on stderr), Pillow's bomb limit, the compile cache, the
    allocator's threshold for returning memory."""
    _return_freed_images_to_the_os()
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

        models[DEFAULT_MODEL_ID] = build_demo_pipeline(mesh=args.mesh, quantization=args.quantization,
                                                       attention=args.attention)
        log.warning("--demo: serving a tiny model with random weights as %s; its images are noise", DEFAULT_MODEL_ID)
    if sources:
        from klein_jax import KleinPipeline

        for model_id, src in sources.items():
            models[model_id] = KleinPipeline.from_pretrained(src, dtype=args.dtype, mesh=args.mesh,
                                                             quantization=args.quantization,
                                                             attention=args.attention)
            log.info("loaded model %s from %s", model_id, src)
    for pipe in models.values():  # every model gets every adapter; a request picks one with the lora field
        for name, path, scale in args.loras:
            pipe.lora.load(path, name, default_scale=1.0 if scale is None else scale)
        pipe.set_adapters([])  # no adapter unless a request names one
    return models


def _parse_loras(values: list[str]) -> list[tuple[str, str, float | None]]:
    """--lora NAME=PATH[:SCALE] values -> (name, path, scale); ValueError on a malformed or repeated name."""
    from klein_jax.lora.files import parse_lora_spec

    loras = [parse_lora_spec(value, named=True) for value in values]
    names = [name for name, _, _ in loras]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--lora names repeat: {', '.join(repeated)}")
    return loras


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
    service = app.extensions["klein"]
    config.graceful_timeout = service.settings.drain_timeout_s + 5.0  # the app answers everything within its drain
    # Longer than clients' idle keep-alive (httpx, requests: 5 s; the same as hypercorn's default): a client then
    # drops an idle connection before the server does, instead of sending a request as the server closes it.
    config.keep_alive_timeout = 75.0
    stop = asyncio.Event()

    def drain(timeout_s: float) -> None:  # a second signal answers what is left at once
        log.info("stopping: no new connections; answering what is in flight within %g s", timeout_s)
        service.drain(timeout_s)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: drain(0.0 if stop.is_set() else service.settings.drain_timeout_s))
    loop.add_signal_handler(signal.SIGHUP, _reload_keys, app)
    await serve(app, config, shutdown_trigger=stop.wait)


def _reload_keys(app) -> None:
    """SIGHUP: the keys of KLEIN_API_KEYS and KLEIN_API_KEYS_FILE read again; on any problem the keys in use stay."""
    keys = app.extensions["klein.api_keys"]
    if keys is None:
        log.warning("SIGHUP: auth is off (--no-auth): no keys to reload")
        return
    try:
        new_keys = _read_keys()
    except (OSError, ValueError) as e:
        log.error("SIGHUP: keys not reloaded, the ones in use stay: %s", e)
        return
    if not new_keys:
        log.error("SIGHUP: keys not reloaded, the ones in use stay: no key configured")
        return
    keys.replace(new_keys)
    log.info("SIGHUP: %d API keys reloaded", len(new_keys))


def main(argv: list[str] | None = None) -> int:
    """Entry point of klein-serve; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo and not args.model:
        parser.error("nothing to serve: pass --model [ID=]SRC or --demo")
    try:
        sources = parse_models(args.model or [])
        args.loras = _parse_loras(args.lora)
        if args.demo and DEFAULT_MODEL_ID in sources:
            raise ValueError(f"--demo serves the id {DEFAULT_MODEL_ID}; name the other model: --model ID=SRC")
        keys = () if args.no_auth else _read_keys()
        settings = settings_from_args(args, keys)
    except OSError as e:
        parser.exit(1, f"klein-serve: error: cannot read KLEIN_API_KEYS_FILE: {e}\n")
    except ValueError as e:
        parser.error(str(e))
    _configure_process(args, settings)
    from klein_jax import distributed

    try:
        if args.distributed:
            distributed.initialize(os.environ)
        sock = _bind(settings.host, settings.port) if distributed.is_leader() else None
        models = _load_models(args, sources)
    except Exception as e:  # noqa: BLE001 - one readable line, exit 1
        log.error("cannot start: %s: %s", type(e).__name__, e)
        return 1
    if not distributed.is_leader():  # process 0 serves HTTP; this one runs its device calls until it stops
        distributed.follow(models)
        return 0
    if args.distributed:
        models = {model_id: distributed.Leader(model_id, pipe) for model_id, pipe in models.items()}
    from server.app import create_app

    settings = dataclasses.replace(settings, port=sock.getsockname()[1])
    log.info("serving on %s (auth %s); compiling programs, /readyz turns ready when done", settings.base_url,
             "on" if settings.auth else "OFF")
    asyncio.run(_serve(create_app(models, settings), sock))
    if args.distributed:
        distributed.stop_followers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
