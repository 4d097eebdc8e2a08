"""fp8 weights (KleinPipeline quantization="fp8") against bfloat16: image PSNR on fixed seeds, and weight bytes.

Quality: the medium config of benchmarks/pipeline_stages.py (D=256, 2+4 blocks, 512x512, 4 steps) with random
weights (the same draw in every dtype), text-to-image for every prompt x seed, in three pipelines: float32,
bfloat16, and bfloat16 with fp8 transformer kernels. PSNR (peak 1, images in [0, 1]) of fp8 against bfloat16, with
float32 against bfloat16 beside it as the yardstick (the rounding the default dtype already accepts). Bytes: the
klein-4B and klein-9B transformers from abstract shapes (nothing allocated), bfloat16 against fp8.

    .venv/bin/python benchmarks/quantization_quality.py [--prompts 4] [--seeds 2] [--write]

--write replaces the section between the markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import reporting  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PROMPTS = ("a lighthouse on a cliff at dusk, oil painting", "a red bicycle leaning on a brick wall",
           "macro photo of a dew drop on a leaf", "an isometric city block at night, neon signs")
SEEDS = (0, 1, 2, 3)
STEPS = 4
WEIGHT_SEED = 0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def build(setup, dtype: str, quantization: str | None):
    """A KleinPipeline of the setup's configs with the random weights of WEIGHT_SEED in `dtype`."""
    from klein_jax.demo_tokenizer import demo_prompt_tokenizer
    from klein_jax.loading import random_module
    from klein_jax.pipeline import KleinPipeline

    rng = np.random.default_rng(WEIGHT_SEED)
    modules = [random_module(name, config, rng, dtype)
               for name, config in zip(("transformer", "vae", "text_encoder"), setup.configs)]
    return KleinPipeline(*modules, demo_prompt_tokenizer(setup.text_encoder.vocab_size), is_distilled=True,
                         dtype=dtype, name=f"medium-{quantization or dtype}", quantization=quantization)


def images(setup, dtype: str, quantization: str | None, prompts, seeds) -> tuple[np.ndarray, float]:
    """(len(seeds) * len(prompts), H, W, 3) float32 images, and the seconds it took (compilation included)."""
    start = time.perf_counter()
    pipe = build(setup, dtype, quantization)
    out = [pipe(list(prompts), width=setup.width, height=setup.height, num_inference_steps=STEPS,
                seed=[seed] * len(prompts), output_type="np") for seed in seeds]
    return np.concatenate(out), time.perf_counter() - start


def weight_bytes() -> list[tuple[str, int, int, int, int]]:
    """(model, transformer bytes bf16, fp8, quantized kernels' bytes bf16, fp8) from abstract shapes."""
    import jax
    from flax import nnx

    from klein_jax.configs import KLEIN_4B, KLEIN_9B
    from klein_jax.loading import abstract_module
    from klein_jax.quantization import QuantizedArray, parameter_bytes, quantize_module

    rows = []
    for name, config in (("klein-4B", KLEIN_4B), ("klein-9B", KLEIN_9B)):
        module = abstract_module("transformer", config, "bfloat16")
        before = parameter_bytes(module)
        quantize_module(module, "transformer", "fp8")
        kernels = [q for q in jax.tree.leaves(nnx.state(module), is_leaf=lambda x: isinstance(x, QuantizedArray))
                   if isinstance(q, QuantizedArray)]
        weights = sum(int(np.prod(q.shape)) for q in kernels)
        scales = sum(int(np.prod(q.scale.shape)) for q in kernels)
        rows.append((name, before, parameter_bytes(module), 2 * weights, weights + 4 * scales))
    return rows


def table(results: dict, byte_rows, prompts, seeds, seconds: dict) -> str:
    def stats(a, b):
        values = [psnr(x, y) for x, y in zip(results[a], results[b])]
        return f"{statistics.mean(values):.1f} | {min(values):.1f}"

    load = os.getloadavg()[0]
    gib = 2**30
    lines = [
        f"Medium config, 512x512, {STEPS} steps, {len(prompts)} prompts x seeds {', '.join(map(str, seeds))} "
        f"({len(prompts) * len(seeds)} images), random weights; {reporting.host()}, load average {load:.1f}. PSNR in dB, peak 1.",
        "",
        "| images | PSNR mean | PSNR min |",
        "|---|---|---|",
        f"| fp8 weights vs bfloat16 | {stats('fp8', 'bfloat16')} |",
        f"| float32 vs bfloat16 (yardstick) | {stats('float32', 'bfloat16')} |",
        f"| fp8 weights vs float32 | {stats('fp8', 'float32')} |",
        "",
        "Pipeline seconds, compilation included: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".",
        "",
        "| transformer (abstract shapes) | bfloat16 | fp8 | quantized kernels bf16 -> fp8 (with scales) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {b16 / gib:.2f} GiB | {b8 / gib:.2f} GiB | {k16 / gib:.2f} -> {k8 / gib:.2f} GiB |"
              for name, b16, b8, k16, k8 in byte_rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--seeds", type=int, default=2, choices=range(1, len(SEEDS) + 1))
    parser.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    args = parser.parse_args(argv)
    from pipeline_stages import configs

    setup = configs()["medium"]
    prompts, seeds = PROMPTS[: args.prompts], SEEDS[: args.seeds]
    results, seconds = {}, {}
    for label, dtype, quantization in (("float32", "float32", None), ("bfloat16", "bfloat16", None),
                                       ("fp8", "bfloat16", "fp8")):
        results[label], seconds[label] = images(setup, dtype, quantization, prompts, seeds)
        print(f"{label}: {len(results[label])} images in {seconds[label]:.0f} s", flush=True)
    text = table(results, weight_bytes(), prompts, seeds, seconds)
    print(text)
    if args.write:
        reporting.write_section(DOC, "quantization-quality", text)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
