"""Peak host memory and time of one jit-compiled VAE decode per API resolution (real FLUX2_VAE config, CPU).

Each resolution runs in its own child process, so that the peak RSS (getrusage ru_maxrss) is that case's
alone: random float32 weights, batch 1, `Flux2VAE.decode_packed` compiled ahead of time, run once.
Results replace the matching rows of the table in docs/vae.md (other rows are kept).

    .venv/bin/python benchmarks/vae_memory.py                       # all 8 resolutions
    .venv/bin/python benchmarks/vae_memory.py --sizes 1024x1024 1568x672
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import time

import reporting

API_SIZES = ("1024x1024", "1344x768", "768x1344", "1248x832", "832x1248", "1184x896", "896x1184", "1568x672")
DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "vae.md"
SECTION = "vae-memory"
HEADER = ("| W x H | packed latents (w x h x C) | peak RSS after compile (GiB) | peak RSS after decode (GiB) "
          "| XLA temp buffers (GiB) | compile (s) | decode (s) |\n|---|---|---|---|---|---|---|")


def _gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(size: str) -> dict:
    """Child process: build, compile and run one decode; returns the measurements."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from klein_jax.configs import FLUX2_VAE
    from klein_jax.models.vae import Flux2VAE

    width, height = (int(v) for v in size.split("x"))
    vae = Flux2VAE(FLUX2_VAE, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(vae)
    del vae

    def decode(state, latents):
        return nnx.merge(graphdef, state).decode_packed(latents)

    shape = (1, height // 16, width // 16, FLUX2_VAE.packed_channels)
    t0 = time.perf_counter()
    compiled = jax.jit(decode).lower(state, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    compile_s = time.perf_counter() - t0
    rss_compiled = _max_rss_bytes()
    memory = compiled.memory_analysis()
    latents = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
    t0 = time.perf_counter()
    images = jax.block_until_ready(compiled(state, latents))
    decode_s = time.perf_counter() - t0
    if images.shape != (1, height, width, 3):
        raise RuntimeError(f"decode returned {images.shape} for {size}")
    return dict(size=size, latents=f"{shape[2]}x{shape[1]}x{shape[3]}", rss_compiled=_gib(rss_compiled),
                rss_peak=_gib(_max_rss_bytes()), temp=_gib(memory.temp_size_in_bytes) if memory else float("nan"),
                compile_s=compile_s, decode_s=decode_s, finite=bool(np.isfinite(np.asarray(images)).all()))


def _row(r: dict) -> str:
    return (f"| {r['size']} | {r['latents']} | {r['rss_compiled']:.2f} | {r['rss_peak']:.2f} | {r['temp']:.2f} "
            f"| {r['compile_s']:.0f} | {r['decode_s']:.0f} |")


def _read_rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (\d+x\d+) \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def write_doc(results: list[dict], machine: str) -> None:
    """Merges `results` into the table between the markers of docs/vae.md (creating the section if needed)."""
    old = reporting.read_section(DOC, SECTION) or ""
    rows = _read_rows(old)
    rows.update({r["size"]: _row(r) for r in results})
    ordered = [rows[s] for s in API_SIZES if s in rows] + [v for k, v in rows.items() if k not in API_SIZES]
    machine_lines = [line for line in old.splitlines() if line.startswith("Measured on")]
    machine_line = f"Measured on {machine}." if results else (machine_lines[0] if machine_lines else "")
    text = "\n".join([
        machine_line, "",
        "Command: `.venv/bin/python benchmarks/vae_memory.py [--sizes WxH ...]` (one child process per size).", "",
        HEADER, *ordered,
    ])
    reporting.write_section(DOC, SECTION, text, heading="## Decode memory on CPU")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(API_SIZES), help="WxH sizes, multiples of 16")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--no-doc", action="store_true", help="print results only, do not update docs/vae.md")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child)), flush=True)
        return 0
    for size in args.sizes:
        if not re.fullmatch(r"\d+x\d+", size) or any(int(v) % 16 for v in size.split("x")):
            p.error(f"size {size!r} is not WxH with multiples of 16")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, float32, batch 1"
    results = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", size], capture_output=True, text=True)
        if out.returncode:
            print(f"{size}: child failed (exit {out.returncode}):\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(_row(result), "" if result["finite"] else "(non-finite output!)", flush=True)
        results.append(result)
        if not args.no_doc:
            write_doc(results, machine)  # after each case, so that a long run keeps what it measured
    return 0 if len(results) == len(args.sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
