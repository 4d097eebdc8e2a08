"""The server's host/device overlap, lever by lever: images/s and p50/p95 latency of klein-serve under load.

    .venv/bin/python benchmarks/server_pipelining.py                    # simulated accelerator, batch 1 and 4
    .venv/bin/python benchmarks/server_pipelining.py --model demo --requests-per-slot 2   # the demo model (slow)

Each case starts klein-serve's own main in a child process (`--serve`) and loads it with benchmarks/load_test.py
(4 x max_batch concurrent clients, 503s retried after 100 ms). The variants switch the two levers inside this
benchmark only: "one batch at a time" hides the pipeline's start_batch / finish_batch, so the worker runs each batch
whole as it did before (no batch dispatched while the previous one finishes); "PNG on 1 thread" gives the PNG pool one
thread instead of one per image of a batch.

`--model simulated` (the default) is KleinPipeline's batch API over a simulated accelerator: the device is an
in-order queue that takes `--device-ms` + `--device-ms-per-image` x batch per batch (a sleep, as a GPU computes
without the host's cores), while the host work is real: prompts tokenized by the demo tokenizer, 1 MP float32 images
converted to 8 bits and PIL, PNG encoding of a smooth image with noise (about 1.4 MB, like a photo). `--model demo` is
the demo model itself, whose CPU "device" time (many seconds per image here) hides the host work entirely. The table
replaces the section between the server-pipelining markers of docs/benchmarks.md (--no-doc: leave it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
VARIANTS = (  # (name, pipelined, png threads: None = the server's default)
    ("one batch at a time, PNG on 1 thread", False, 1),
    ("pipelined, PNG on 1 thread", True, 1),
    ("one batch at a time, parallel PNG", False, None),
    ("pipelined, parallel PNG (the server now)", True, None),
)


@dataclasses.dataclass(frozen=True, eq=False)
class SimulatedRequest:
    """KleinPipeline's PreparedRequest, as far as the server reads it."""

    prompt: str
    width: int
    height: int
    seed: int
    references: tuple = ()

    @property
    def batch_key(self) -> tuple:
        return self.width, self.height


class SimulatedDevice:
    """KleinPipeline's batch API over a simulated in-order accelerator, with the real host work around it."""

    is_demo = False
    compile_count = 0
    model_info = {"name": "simulated accelerator", "dtype": "bfloat16", "is_distilled": True, "steps": 4}

    def __init__(self, device_s: float, device_s_per_image: float):
        import numpy as np

        from klein_jax.demo_tokenizer import demo_prompt_tokenizer

        self.device_s, self.device_s_per_image = device_s, device_s_per_image
        self.tokenizer = demo_prompt_tokenizer(1024)
        self._free_s = 0.0  # when the simulated device finishes what it was given
        self._lock = threading.Lock()
        ramp = np.linspace(0.0, 1.0, 1024, dtype=np.float32)
        smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, ramp), 1 - np.add.outer(ramp, ramp) / 2], -1)
        noise = np.random.default_rng(0).normal(0.0, 0.01, smooth.shape).astype(np.float32)
        self._image = np.clip(smooth + noise, 0.0, 1.0)  # (H, W, 3) float32, as the VAE decode returns

    def prepare(self, prompt, images=(), width=1024, height=1024, seed=None, **_):
        from klein_jax.request import check_prompt, check_seed, check_size

        return SimulatedRequest(check_prompt(prompt), *check_size(width, height),
                                seed=0 if seed is None else check_seed(seed))

    def start_batch(self, prepared):
        self.tokenizer.encode([p.prompt for p in prepared], max_length=512)
        with self._lock:  # in order, as a device stream: it starts when the previous batch is done
            self._free_s = max(time.perf_counter(), self._free_s) + self.device_s + self.device_s_per_image * len(
                prepared)
            return self._free_s, list(prepared)

    def finish_batch(self, pending):
        import numpy as np

        from klein_jax.images import numpy_to_pil

        ready_s, prepared = pending
        time.sleep(max(ready_s - time.perf_counter(), 0.0))
        images = np.stack([np.roll(self._image, p.seed % 1024, axis=1)[:p.height, :p.width] for p in prepared])
        return numpy_to_pil(images)

    def run_batch(self, prepared):
        return self.finish_batch(self.start_batch(prepared))

    def compile(self, aspect_ratios="all", max_references=4, batch_sizes=(1,)):
        return 1


class OneBatchAtATime:
    """A pipeline seen without start_batch / finish_batch: the worker runs each batch whole (before pipelining)."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        if name in ("start_batch", "finish_batch"):
            raise AttributeError(name)
        return getattr(self._pipe, name)


def serve(argv: list[str]) -> int:
    """Child mode: klein-serve's main with the chosen model and levers; argv: options -- klein-serve flags."""
    from server import __main__ as klein_serve
    from server import service
    from server.settings import DEFAULT_MODEL_ID

    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("simulated", "demo"))
    p.add_argument("--serial", action="store_true")
    p.add_argument("--png-threads", type=int)
    p.add_argument("--device-ms", type=float)
    p.add_argument("--device-ms-per-image", type=float)
    args = p.parse_args(argv[:split])
    load = klein_serve._load_models
    if args.model == "simulated":
        def load(_args, _sources):
            return {DEFAULT_MODEL_ID: SimulatedDevice(args.device_ms / 1000, args.device_ms_per_image / 1000)}
    wrap = OneBatchAtATime if args.serial else (lambda pipe: pipe)
    klein_serve._load_models = lambda *a: {mid: wrap(pipe) for mid, pipe in load(*a).items()}
    if args.png_threads:
        threads = args.png_threads

        class FixedPngEncoder(service.PngEncoder):
            def __init__(self, compress_level: int, **_):
                super().__init__(compress_level, threads)

        service.PngEncoder = FixedPngEncoder
    return klein_serve.main(["--demo", *argv[split + 1:]])


def run_case(args, variant: tuple, max_batch: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import load_test

    name, pipelined, png_threads = variant
    launcher = [str(pathlib.Path(__file__).resolve()), "--serve", "--model", args.model,
                "--device-ms", str(args.device_ms), "--device-ms-per-image", str(args.device_ms_per_image)]
    launcher += ([] if pipelined else ["--serial"]) + ([] if png_threads is None else ["--png-threads",
                                                                                      str(png_threads)])
    extra = ["--batch-wait-ms", "5", "--drain-timeout-s", "1"] + (["--compile-cache", args.compile_cache] if args.compile_cache else [])
    queue = 4 * max_batch
    with tempfile.TemporaryDirectory() as log_dir:
        proc, url = load_test.start_demo_server(queue, max_batch, "square", 900.0, pathlib.Path(log_dir),
                                                extra=tuple(extra), launcher=(*launcher, "--"))
        load = os.getloadavg()
        try:
            result = load_test.run_load(url, requests=args.requests_per_slot * queue, concurrency=queue,
                                        server_pid=proc.pid, warmup=2 * max_batch, backoff_ms=100)
        finally:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    summary = result.summary()
    return {"variant": name, "max_batch": max_batch, "images_per_s": summary["images_per_s"],
            "p50_ms": summary["p50_ms_200"], "p95_ms": summary["p95_ms_200"], "statuses": summary["statuses"],
            "requests": summary["requests"], "load": [round(x, 1) for x in load]}


def write_doc(rows: list[dict], args, command: str) -> None:
    device = (f"simulated accelerator, {args.device_ms:g} ms + {args.device_ms_per_image:g} ms per image per batch"
              if args.model == "simulated" else "the demo model (its CPU device time)")
    lines = [f"Measured by `{command}` ({time.strftime('%Y-%m-%d %H:%M')}) on "
             f"{reporting.host()}: {device}, square (1024x1024) text-to-image, 4 x max_batch concurrent "
             f"clients, {args.requests_per_slot} x that many requests after a warm-up. The load average (1 min) is "
             "read as each case starts.", "",
             "| max batch | variant | images/s | p50 latency (ms) | p95 latency (ms) | statuses | load average |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['max_batch']} | {r['variant']} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
              f"{r['statuses']} | {r['load'][0]} |" for r in rows]
    reporting.write_section(DOC, "server-pipelining", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("simulated", "demo"), default="simulated")
    p.add_argument("--batch-sizes", default="1,4", help="max_batch of each case, comma-separated")
    p.add_argument("--requests-per-slot", type=int, default=12, help="requests per concurrent client")
    p.add_argument("--device-ms", type=float, default=50.0, help="simulated device time per batch")
    p.add_argument("--device-ms-per-image", type=float, default=70.0, help="and per image of the batch")
    p.add_argument("--compile-cache", help="klein-serve --compile-cache DIR (for --model demo)")
    p.add_argument("--json", type=pathlib.Path, help="write the rows here too")
    p.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    rows = []
    for max_batch in (int(b) for b in args.batch_sizes.split(",")):
        for variant in VARIANTS:
            rows.append(run_case(args, variant, max_batch))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.no_doc:
        write_doc(rows, args, "python benchmarks/server_pipelining.py " + " ".join(argv))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's server and klein_jax
    sys.exit(main())
