"""Per-stage time of one image, KleinPipeline beside diffusers' Flux2KleinPipeline, float32 on CPU.

Two random diffusers pipelines of the reference classes (benchmarks/accelerator.py's build_diffusers), saved in the
hub layout and converted with klein-convert, so that both run the same weights:
- tiny: the TINY_* configs of the tests (4-pixel tokens), 128x128, 1024 image tokens;
- medium: a 4-head, 2+4-block transformer (D=256), a 4-level VAE with 16-pixel tokens and mid-block attention, a
  6-layer text encoder, 512x512, 1024 image tokens.
Both pipelines run text-to-image, 4 steps, from the same initial noise (their outputs are compared). Ours runs the
stepwise path (one compiled program per step, then the decoder) so that denoise and decode are timed apart, and the
fused program (denoise + decode in one); diffusers' stages are timed by wrapping its stage methods (accelerator.py's
StageClock: the loop runs from the prepared latents to the decode). Times are the median of --repeats runs after one
warm-up run (which holds our compilation). The table replaces the section between the markers in docs/benchmarks.md.

    .venv/bin/python benchmarks/pipeline_stages.py [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
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


def bench_ours(folder: pathlib.Path, size: tuple[int, int], latents, repeats: int) -> tuple[dict, object]:
    """Stage times (ms) of KleinPipeline and its image (np)."""
    from klein_jax.images import numpy_to_pil
    from klein_jax.pipeline import KleinPipeline

    pipe = KleinPipeline.from_pretrained(folder, "float32")
    width, height = size
    start = time.perf_counter()
    pipe(PROMPT, width=width, height=height, latents=latents, output_type="np", on_step=lambda i, n: None)
    pipe(PROMPT, width=width, height=height, latents=latents, output_type="np")
    first_s = time.perf_counter() - start
    stages = {k: [] for k in ("text_encode_ms", "denoise_ms", "decode_ms", "fused_ms", "png_ms", "total_ms")}
    for _ in range(repeats):
        start = time.perf_counter()
        image = pipe(PROMPT, width=width, height=height, latents=latents, output_type="np", on_step=lambda i, n: None)
        timings = pipe.last_timings
        png = time.perf_counter()
        numpy_to_pil(image)[0].save(io.BytesIO(), format="PNG")
        end = time.perf_counter()
        stages["text_encode_ms"].append(timings["text_encode_ms"] / 1000)
        stages["denoise_ms"].append(timings["denoise_ms"] / 1000)
        stages["decode_ms"].append(timings["decode_ms"] / 1000)
        stages["png_ms"].append(end - png)
        stages["total_ms"].append(end - start)
        pipe(PROMPT, width=width, height=height, latents=latents, output_type="np")
        stages["fused_ms"].append(pipe.last_timings["denoise_decode_ms"] / 1000)
    result = {k: _median_ms(v) for k, v in stages.items()}
    result["compile_s"] = pipe.sampler.compile_seconds
    result["first_call_s"] = first_s
    return result, image


def bench_diffusers(pipe, size: tuple[int, int], latents, out_layers, repeats: int):
    """Stage times (ms) of diffusers' Flux2KleinPipeline and its image (np)."""
    import torch
    from accelerator import StageClock

    clock = StageClock(pipe, sync=lambda: None)
    width, height = size
    stages = {k: [] for k in ("text_encode_ms", "denoise_ms", "decode_ms", "png_ms", "total_ms")}
    for i in range(repeats + 1):
        clock.spans.clear()
        start = time.perf_counter()
        with torch.no_grad():
            image = pipe(prompt=PROMPT, width=width, height=height, num_inference_steps=STEPS, output_type="np",
                         latents=torch.from_numpy(latents), text_encoder_out_layers=out_layers).images
        png = time.perf_counter()
        pipe.image_processor.numpy_to_pil(image)[0].save(io.BytesIO(), format="PNG")
        end = time.perf_counter()
        if i == 0:
            continue  # warm-up
        spans = clock.stages_ms()
        for name in ("text_encode_ms", "denoise_ms", "decode_ms"):
            stages[name].append(spans[name] / 1000)
        stages["png_ms"].append(end - png)
        stages["total_ms"].append(end - start)
    return {k: _median_ms(v) for k, v in stages.items()}, image


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


def run(repeats: int) -> list[dict]:
    import numpy as np

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
            ours, ours_image = bench_ours(folder, size, latents, repeats)
            theirs, their_image = bench_diffusers(reference, size, latents, setup.text_encoder.out_layers, repeats)
        tokens = (height // pixels_per_token) * (width // pixels_per_token)
        rows.append(dict(name=name, size=f"{width}x{height}", tokens=tokens, ours=ours, diffusers=theirs,
                         max_abs=float(np.abs(ours_image - their_image).max()), load_average=os.getloadavg()))
        print(name, rows[-1], flush=True)
    return rows


def table(rows: list[dict], repeats: int) -> str:
    import jax

    lines = [
        f"Measured by `benchmarks/pipeline_stages.py` ({time.strftime('%Y-%m-%d')}) on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
        f"jax {jax.__version__} CPU, float32, {STEPS} steps, text-to-image, median of {repeats} runs after a warm-up "
        "run. Times in ms; the load average (1, 5, 15 min) is read after each config's runs.",
        "",
        "| config | size (image tokens) | pipeline | text encode | denoise | decode | PNG | total | "
        "fused denoise+decode | diffusers total / ours | compile (s) | max abs diff vs diffusers | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, d = r["ours"], r["diffusers"]
        load = reporting.format_load(r["load_average"])
        lines.append(f"| {r['name']} | {r['size']} ({r['tokens']}) | klein-jax | {o['text_encode_ms']:.0f} | "
                     f"{o['denoise_ms']:.0f} | {o['decode_ms']:.0f} | {o['png_ms']:.1f} | {o['total_ms']:.0f} | "
                     f"{o['fused_ms']:.0f} | {d['total_ms'] / o['total_ms']:.2f}x | {o['compile_s']:.1f} | "
                     f"{r['max_abs']:.1e} | {load} |")
        lines.append(f"| {r['name']} | {r['size']} ({r['tokens']}) | diffusers | {d['text_encode_ms']:.0f} | "
                     f"{d['denoise_ms']:.0f} | {d['decode_ms']:.0f} | {d['png_ms']:.1f} | {d['total_ms']:.0f} | "
                     f"- | | - | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/benchmarks.md as is")
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity with torch, as in the tests
    text = table(run(args.repeats), args.repeats)
    print(text)
    if not args.no_write:
        reporting.write_section(DOC, "pipeline-stages", text, heading="")
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
