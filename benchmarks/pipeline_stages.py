"""Per-stage time of one image, KleinPipeline beside diffusers' Flux2KleinPipeline, float32 on CPU.

Two random diffusers pipelines of the reference classes (benchmarks/accelerator.py's build_diffusers), saved in the
hub layout and converted with klein-convert, so that both run the same weights:
- tiny: the TINY_* configs of the tests (4-pixel tokens), 128x128, 1024 image tokens;
- medium: a 4-head, 2+4-block transformer (D=256), a 4-level VAE with 16-pixel tokens and mid-block attention, a
  6-layer text encoder, 512x512, 1024 image tokens.
Both pipelines run text-to-image, 4 steps, from the same initial noise (their outputs are compared), in float32 or,
with --dtype bfloat16, both in bfloat16 (the same float32 weights rounded to it by each framework). Ours runs the
stepwise path (one compiled program per step, then the decoder) so that denoise and decode are timed apart, and the
call users make (denoise + decode in one program); diffusers' stages are timed by wrapping its stage methods
(accelerator.py's StageClock: the loop runs from the prepared latents to the decode). After a warm-up (which holds
our compilation) the two pipelines take turns, one image each per round, for --repeats rounds: a change of the
shared machine's speed falls on both, and the speed-up is the median of the rounds' own ratios. The table replaces
the section between the markers of its dtype in docs/benchmarks.md.

    .venv/bin/python benchmarks/pipeline_stages.py [--repeats 3] [--dtype float32|bfloat16] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SECTIONS = {"float32": "pipeline-stages", "bfloat16": "pipeline-stages-bfloat16"}  # dtype -> docs section
STEPS = 4
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def configs():
    """name -> Setup (benchmarks/accelerator.py) in float32."""
    from accelerator import Setup

    from klein_jax.configs import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE

    text = dataclasses.replace(TINY_TEXT_ENCODER, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, out_layers=(2, 4, 6))
    transformer = dataclasses.replace(TINY_TRANSFORMER, num_layers=2, num_single_layers=4, num_attention_heads=4,
                                      attention_head_dim=64, joint_attention_dim=3 * 64,
                                      timestep_guidance_channels=256, axes_dims_rope=(16, 16, 16, 16))
    vae = dataclasses.replace(TINY_VAE, block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return {
        "tiny": Setup("tiny", TINY_TRANSFORMER, TINY_VAE, TINY_TEXT_ENCODER, 128, 128,
                      TINY_TEXT_ENCODER.num_hidden_layers, dtype="float32"),
        "medium": Setup("medium", transformer, vae, text, 512, 512, text.num_hidden_layers, dtype="float32"),
    }


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def ours_runner(folder: pathlib.Path, size: tuple[int, int], latents, dtype: str = "float32"):
    """KleinPipeline at `folder` in `dtype`, compiled by two warm-up calls; returns (run, info): run() times one image
    (stage seconds and the image as np), info holds the compile time and the first calls' wall time."""
    from klein_jax.images import numpy_to_pil
    from klein_jax.pipeline import KleinPipeline

    pipe = KleinPipeline.from_pretrained(folder, dtype)
    width, height = size
    start = time.perf_counter()
    pipe(PROMPT, width=width, height=height, latents=latents, output_type="np", on_step=lambda i, n: None)
    pipe(PROMPT, width=width, height=height, latents=latents, output_type="np")
    info = {"compile_s": pipe.sampler.compile_seconds, "first_call_s": time.perf_counter() - start}

    def run() -> tuple[dict, object]:
        start = time.perf_counter()  # stepwise: one program per step, then the decoder, so that stages time apart
        image = pipe(PROMPT, width=width, height=height, latents=latents, output_type="np", on_step=lambda i, n: None)
        timings = pipe.last_timings
        png = time.perf_counter()
        numpy_to_pil(image)[0].save(io.BytesIO(), format="PNG")
        end = time.perf_counter()
        seconds = {"text_encode_ms": timings["text_encode_ms"] / 1000, "denoise_ms": timings["denoise_ms"] / 1000,
                   "decode_ms": timings["decode_ms"] / 1000, "png_ms": end - png, "total_ms": end - start}
        start = time.perf_counter()  # the path users run: denoise and decode in one program
        fused = pipe(PROMPT, width=width, height=height, latents=latents, output_type="np")
        numpy_to_pil(fused)[0].save(io.BytesIO(), format="PNG")
        seconds["end_to_end_ms"] = time.perf_counter() - start
        return seconds, image

    return run, info


def diffusers_runner(pipe, size: tuple[int, int], latents, out_layers):
    """diffusers' Flux2KleinPipeline (latents given in its dtype) after one warm-up call; returns run() -> (stage
    seconds, the image as np)."""
    import torch
    from accelerator import StageClock

    clock = StageClock(pipe, sync=lambda: None)
    width, height = size

    def run() -> tuple[dict, object]:
        clock.spans.clear()
        start = time.perf_counter()
        with torch.no_grad():
            image = pipe(prompt=PROMPT, width=width, height=height, num_inference_steps=STEPS, output_type="np",
                         latents=torch.from_numpy(latents).to(pipe.dtype),
                         text_encoder_out_layers=out_layers).images
        png = time.perf_counter()
        pipe.image_processor.numpy_to_pil(image)[0].save(io.BytesIO(), format="PNG")
        end = time.perf_counter()
        spans = clock.stages_ms()
        seconds = {name: spans[name] / 1000 for name in ("text_encode_ms", "denoise_ms", "decode_ms")}
        seconds.update(png_ms=end - png, total_ms=end - start, end_to_end_ms=end - start)
        return seconds, image

    run()  # warm-up
    return run


def interleaved(runners: dict, repeats: int) -> tuple[dict, dict]:
    """Runs each runner once per round, `repeats` rounds, so that a change of the machine's speed during the runs
    falls on every pipeline alike; returns ({name: median stage ms}, {name: its last image}) and, per runner after
    the first, "ratio_to_first": the median over rounds of its end-to-end time over the first runner's."""
    samples = {name: [] for name in runners}
    images = {}
    for _ in range(repeats):
        for name, run in runners.items():
            seconds, images[name] = run()
            samples[name].append(seconds)
    first = next(iter(runners))
    medians = {}
    for name, rounds in samples.items():
        medians[name] = {key: _median_ms([r[key] for r in rounds]) for key in rounds[0]}
        medians[name]["ratio_to_first"] = statistics.median(
            r["end_to_end_ms"] / f["end_to_end_ms"] for r, f in zip(rounds, samples[first]))
    return medians, images


def make_source(setup, folder: pathlib.Path):
    """A random diffusers pipeline saved at `folder` in the hub layout (with the text encoder's out layers in
    model_index.json, as klein-convert reads them); returns the in-memory pipeline."""
    from accelerator import build_diffusers

    from klein_jax.loading import OUT_LAYERS_KEY

    pipe = build_diffusers(setup, "cpu", folder.parent / "tokenizer")
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index[OUT_LAYERS_KEY] = list(setup.text_encoder.out_layers)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return pipe


def run(repeats: int, dtype: str = "float32") -> list[dict]:
    import numpy as np
    import torch

    from convert.cli import main as convert_main

    rows = []
    for name, setup in configs().items():
        with tempfile.TemporaryDirectory() as tmp:
            reference = make_source(setup, pathlib.Path(tmp) / "diffusers")
            folder = pathlib.Path(tmp) / "klein"
            if convert_main([str(pathlib.Path(tmp) / "diffusers"), str(folder), "--dtype", "float32",
                             "--no-progress"]) != 0:
                raise SystemExit("conversion failed")
            pixels_per_token = 2 * setup.vae.spatial_scale
            size = width, height = setup.width, setup.height
            latents = np.random.default_rng(0).standard_normal(
                (1, 128, height // pixels_per_token, width // pixels_per_token)).astype(np.float32)
            run_ours, info = ours_runner(folder, size, latents, dtype)
            reference = reference.to(getattr(torch, dtype))
            run_theirs = diffusers_runner(reference, size, latents, setup.text_encoder.out_layers)
            medians, images = interleaved({"ours": run_ours, "diffusers": run_theirs}, repeats)
            ours, theirs = {**medians["ours"], **info}, medians["diffusers"]
            ours_image, their_image = images["ours"], images["diffusers"]
        tokens = (height // pixels_per_token) * (width // pixels_per_token)
        difference = np.asarray(ours_image, np.float32) - np.asarray(their_image, np.float32)
        rows.append(dict(name=name, size=f"{width}x{height}", tokens=tokens, ours=ours, diffusers=theirs,
                         max_abs=float(np.abs(difference).max()), load_average=os.getloadavg()))
        print(name, rows[-1], flush=True)
    return rows


def table(rows: list[dict], repeats: int, dtype: str = "float32") -> str:
    import jax

    lines = [
        f"Measured by `benchmarks/pipeline_stages.py` ({time.strftime('%Y-%m-%d')}) on "
        f"{reporting.host()} (shared with other jobs), "
        f"jax {jax.__version__} CPU, {dtype} (both pipelines), {STEPS} steps, text-to-image, {repeats} rounds after a "
        "warm-up, each round one image of each pipeline in turn; medians. Stages are timed on our stepwise path (one "
        "program per step, then the decoder; `total`); `end to end` is the call users make (denoise and decode in one "
        "program), PNG included. `diffusers / ours` is the median over rounds of diffusers' end to end over ours in "
        "the same round. Times in ms; the load average (1, 5, 15 min) is read after each config's rounds.",
        "",
        "| config | size (image tokens) | pipeline | text encode | denoise | decode | PNG | total | end to end | "
        "diffusers / ours | compile (s) | max abs diff vs diffusers | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, d = r["ours"], r["diffusers"]
        load = reporting.format_load(r["load_average"])
        lines.append(f"| {r['name']} | {r['size']} ({r['tokens']}) | klein-jax | {o['text_encode_ms']:.0f} | "
                     f"{o['denoise_ms']:.0f} | {o['decode_ms']:.0f} | {o['png_ms']:.1f} | {o['total_ms']:.0f} | "
                     f"{o['end_to_end_ms']:.0f} | {d['ratio_to_first']:.2f}x | {o['compile_s']:.1f} | "
                     f"{r['max_abs']:.1e} | {load} |")
        lines.append(f"| {r['name']} | {r['size']} ({r['tokens']}) | diffusers | {d['text_encode_ms']:.0f} | "
                     f"{d['denoise_ms']:.0f} | {d['decode_ms']:.0f} | {d['png_ms']:.1f} | {d['total_ms']:.0f} | "
                     f"{d['end_to_end_ms']:.0f} | | - | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(SECTIONS), default="float32",
                        help="both pipelines' weights and compute; each dtype has its own table in the doc")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/benchmarks.md as is")
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity with torch, as in the tests
    text = table(run(args.repeats, args.dtype), args.repeats, args.dtype)
    print(text)
    if not args.no_write:
        reporting.write_section(DOC, SECTIONS[args.dtype], text, heading="")
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
