"""One image of a converted klein checkpoint through KleinPipeline, on whatever device JAX finds: the load, the first
call (compilation included), a second call's stages and the process's peak RSS.

    .venv/bin/python benchmarks/image_time.py --model out/klein-4b [--dtype bfloat16] [--width 512 --height 512]

The pipeline runs stepwise (one program per step, then the decoder: `on_step`), so the text encode, denoise and
decode are timed apart, from the checkpoint's own number of steps unless --steps is given. The table replaces the
section between the image-time markers of docs/benchmarks.md (--no-doc: leave it); --json writes the figures too.
Whether the image is finite is reported: random weights of unit scale (benchmarks/convert_memory.py's) overflow in
bfloat16, which does not change the work done.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import time

import reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
STAGES = ("text_encode_ms", "denoise_ms", "decode_ms")


def run(model: str, dtype: str, width: int, height: int, steps: int | None) -> dict:
    import jax
    import numpy as np

    from klein_jax.pipeline import KleinPipeline

    start = time.perf_counter()
    pipe = KleinPipeline.from_pretrained(model, dtype)
    load_s = time.perf_counter() - start
    kwargs = dict(width=width, height=height, seed=0, output_type="np", on_step=lambda i, n: None)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    start = time.perf_counter()
    pipe(PROMPT, **kwargs)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    image = pipe(PROMPT, **kwargs)
    second_s = time.perf_counter() - start
    return {
        "model": str(model), "dtype": dtype, "width": width, "height": height,
        "steps": pipe.default_steps if steps is None else steps,
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "load_s": load_s,
        "first_call_s": first_s, "compile_s": pipe.sampler.compile_seconds, "second_call_s": second_s,
        **{name: pipe.last_timings[name] for name in STAGES},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "finite": bool(np.isfinite(image).all()), "load_average": os.getloadavg(),
    }


def markdown(r: dict) -> str:
    head = (f"Measured by `benchmarks/image_time.py` ({time.strftime('%Y-%m-%d')}) on {r['device']} "
            f"({platform.machine()}, {os.cpu_count()} CPU cores), jax {r['jax']}: `{r['model']}` in {r['dtype']}, "
            f"{r['width']}x{r['height']}, {r['steps']} steps, stepwise; load average "
            f"{reporting.format_load(r['load_average'])} at the end; the image "
            f"{'is finite' if r['finite'] else 'is not finite (random weights overflow)'}.")
    row = [f"{r['load_s']:.1f}", f"{r['first_call_s']:.1f}", f"{r['compile_s']:.1f}", f"{r['second_call_s']:.1f}",
           *(f"{r[name] / 1000:.1f}" for name in STAGES), f"{r['peak_rss_gib']:.2f}"]
    columns = ["load (s)", "first call (s)", "of which compile (s)", "second call (s)", "text encode (s)",
               "denoise (s)", "decode (s)", "peak RSS (GiB)"]
    return head + "\n\n" + reporting.table(columns, [row])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a klein-convert folder")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--steps", type=int, help="default: the checkpoint's (4 for the distilled models)")
    p.add_argument("--json", type=pathlib.Path, help="also write the figures to this file")
    p.add_argument("--no-doc", action="store_true", help="leave docs/benchmarks.md as is")
    args = p.parse_args(argv)
    figures = run(args.model, args.dtype, args.width, args.height, args.steps)
    text = markdown(figures)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    if not args.no_doc:
        reporting.write_section(DOC, "image-time", text, heading="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
