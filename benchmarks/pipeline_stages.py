"""Per-stage time of one image, KleinPipeline beside diffusers' Flux2KleinPipeline, float32 on CPU.

Two random checkpoints in the diffusers layout (tests/tiny_pipeline.py), converted with klein-convert:
- tiny: the TINY_* configs of the tests (4-pixel tokens), 128x128, 1024 image tokens;
- medium: a 4-head, 2+4-block transformer (D=256), a 4-level VAE with 16-pixel tokens and mid-block attention, a
  6-layer text encoder, 512x512, 1024 image tokens.
Both pipelines run text-to-image, 4 steps, from the same initial noise (their outputs are compared). Ours runs the
stepwise path (one compiled program per step, then the decoder) so that denoise and decode are timed apart, and the
fused program (denoise + decode in one); diffusers' stages are timed by wrapping encode_prompt and vae.decode.
Times are the median of --repeats runs after one warm-up run (which holds our compilation). The table replaces
the section between the markers in docs/pipeline.md.

    .venv/bin/python benchmarks/pipeline_stages.py [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "pipeline.md"
BEGIN, END = "<!-- pipeline-stages:begin -->", "<!-- pipeline-stages:end -->"
STEPS = 4
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def configs():
    """name -> (transformer, vae, text encoder config, (width, height))."""
    from klein_jax.configs import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE

    text = dataclasses.replace(TINY_TEXT_ENCODER, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, out_layers=(2, 4, 6))
    transformer = dataclasses.replace(TINY_TRANSFORMER, num_layers=2, num_single_layers=4, num_attention_heads=4,
                                      attention_head_dim=64, joint_attention_dim=3 * 64,
                                      timestep_guidance_channels=256, axes_dims_rope=(16, 16, 16, 16))
    vae = dataclasses.replace(TINY_VAE, block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return {
        "tiny": (TINY_TRANSFORMER, TINY_VAE, TINY_TEXT_ENCODER, (128, 128)),
        "medium": (transformer, vae, text, (512, 512)),
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


def bench_diffusers(folder: pathlib.Path, size: tuple[int, int], latents, out_layers, repeats: int):
    """Stage times (ms) of diffusers' Flux2KleinPipeline and its image (np)."""
    import torch
    from tiny_pipeline import load_reference_pipeline

    pipe = load_reference_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    spans: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spans[name] = spans.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    pipe.encode_prompt = timed("text", pipe.encode_prompt)
    pipe.vae.decode = timed("decode", pipe.vae.decode)
    width, height = size
    stages = {k: [] for k in ("text_encode_ms", "denoise_ms", "decode_ms", "png_ms", "total_ms")}
    for i in range(repeats + 1):
        spans.clear()
        start = time.perf_counter()
        with torch.no_grad():
            image = pipe(prompt=PROMPT, width=width, height=height, num_inference_steps=STEPS, output_type="np",
                         latents=torch.from_numpy(latents), text_encoder_out_layers=out_layers).images
        png = time.perf_counter()
        pipe.image_processor.numpy_to_pil(image)[0].save(io.BytesIO(), format="PNG")
        end = time.perf_counter()
        if i == 0:
            continue  # warm-up
        stages["text_encode_ms"].append(spans["text"])
        stages["decode_ms"].append(spans["decode"])
        stages["denoise_ms"].append(png - start - spans["text"] - spans["decode"])  # loop (+ small host work)
        stages["png_ms"].append(end - png)
        stages["total_ms"].append(end - start)
    return {k: _median_ms(v) for k, v in stages.items()}, image


def run(repeats: int) -> list[dict]:
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_pipeline import make_tiny_diffusers_pipeline

    from convert.cli import main as convert_main

    rows = []
    for name, (transformer, vae, text, size) in configs().items():
        with tempfile.TemporaryDirectory() as tmp:
            source = make_tiny_diffusers_pipeline(pathlib.Path(tmp) / "diffusers", transformer_config=transformer,
                                                  vae_config=vae, text_encoder_config=text,
                                                  text_layers=text.num_hidden_layers, out_layers=text.out_layers)
            folder = pathlib.Path(tmp) / "klein"
            if convert_main([str(source), str(folder), "--dtype", "float32", "--no-progress"]) != 0:
                raise SystemExit("conversion failed")
            pixels_per_token = 2 * vae.spatial_scale
            width, height = size
            latents = np.random.default_rng(0).standard_normal(
                (1, 128, height // pixels_per_token, width // pixels_per_token)).astype(np.float32)
            ours, ours_image = bench_ours(folder, size, latents, repeats)
            theirs, their_image = bench_diffusers(source, size, latents, text.out_layers, repeats)
        tokens = (height // pixels_per_token) * (width // pixels_per_token)
        rows.append(dict(name=name, size=f"{width}x{height}", tokens=tokens, ours=ours, diffusers=theirs,
                         max_abs=float(np.abs(ours_image - their_image).max())))
        print(name, rows[-1], flush=True)
    return rows


def table(rows: list[dict], repeats: int) -> str:
    import jax

    lines = [
        f"Measured by `benchmarks/pipeline_stages.py` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores (shared with other jobs), jax {jax.__version__} CPU, float32, "
        f"{STEPS} steps, text-to-image, median of {repeats} runs after a warm-up run. Times in ms.",
        "",
        "| config | size (image tokens) | pipeline | text encode | denoise | decode | PNG | total | "
        "fused denoise+decode | compile (s) | max abs diff vs diffusers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, d = r["ours"], r["diffusers"]
        lines.append(f"| {r['name']} | {r['size']} ({r['tokens']}) | klein-jax | {o['text_encode_ms']:.0f} | "
                     f"{o['denoise_ms']:.0f} | {o['decode_ms']:.0f} | {o['png_ms']:.1f} | {o['total_ms']:.0f} | "
                     f"{o['fused_ms']:.0f} | {o['compile_s']:.1f} | {r['max_abs']:.1e} |")
        lines.append(f"| {r['name']} | {r['size']} ({r['tokens']}) | diffusers | {d['text_encode_ms']:.0f} | "
                     f"{d['denoise_ms']:.0f} | {d['decode_ms']:.0f} | {d['png_ms']:.1f} | {d['total_ms']:.0f} | "
                     f"- | - | |")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else f"# Pipeline\n\n{BEGIN}\n{END}\n"
    if BEGIN not in doc:
        doc = doc.rstrip() + f"\n\n## Stage times\n\n{BEGIN}\n{END}\n"
    doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", doc, flags=re.S)
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/pipeline.md as is")
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity with torch, as in the tests
    text = table(run(args.repeats), args.repeats)
    print(text)
    if not args.no_write:
        write_doc(text)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
