"""The KV speed-up of klein-9B KV: transformer FLOPs per request and CPU time, the KV path against the plain path.

FLOPs per request, real klein-9B, 1024x1024 output with 4 references of 1024x1024 (4 x 4096 tokens), 4 steps,
batch 1, two ways:
- counted from the config: per block 2·(4 + 3·mlp_ratio)·D²·S (the linears, = 26·D²·S) + 4·S·K·D (QKᵀ and AV
  for S queries and K keys), plus the input and output projections;
- XLA's cost analysis of the lowered programs (abstract bfloat16 weights, nothing allocated): one plain step (text,
  target and references in the sequence), one cached step (text and target, attending to the cached reference keys
  and values) and the reference pass (klein_jax/models/kv_cache.py reference_kv), the steps multiplied by 4.
The plain path is Flux2KleinPipeline's (references in every step's sequence); the KV path is
Flux2KleinKVPipeline's (references once, at timestep 0; their keys and values reused by every step).

Time: the medium config of benchmarks/pipeline_stages.py (D=256, 2 + 4 blocks, 16-pixel tokens) in float32 on this
machine's CPU, random weights, 512x512 with 4 references of 512x512 (4 x 1024 tokens): one KleinPipeline with
kv_cache=True and one without, sharing the modules; per request the stages of `last_timings` (text encoder, reference
encoder, the fused denoise + decode program) and the stepwise path's denoise time; medians of --repeats after a
warm-up run that compiles. The table replaces the section between the markers in docs/kv.md.

    .venv/bin/python benchmarks/kv_speedup.py [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "kv.md"
STEPS = 4
TEXT_TOKENS = 512
REFERENCES = 4
PROMPT = "the four of them together on a beach"


@dataclasses.dataclass(frozen=True)
class Shape:
    """A request's token counts: text, target image, all references together."""

    text: int
    target: int
    references: int


def forward_flops(config, queries_image: int, keys_extra: int, text: int, *, projections: bool = True) -> float:
    """Model FLOPs of one transformer forward over `text + queries_image` tokens that also attend to `keys_extra`
    cached keys: per block 26·D²·S + 4·S·K·D, plus x_embedder, context_embedder and proj_out."""
    D = config.inner_dim
    S = text + queries_image
    K = S + keys_extra
    blocks = config.num_layers + config.num_single_layers
    per_block = 2 * (4 + 3 * config.mlp_ratio) * D * D * S + 4 * S * K * D
    io = 2 * D * (2 * config.in_channels * queries_image + config.joint_attention_dim * text) if projections else 0
    return blocks * per_block + io


def counted_flops(config, shape: Shape, steps: int = STEPS) -> dict[str, float]:
    """Transformer FLOPs per request counted from the config: plain, and KV (reference pass + cached steps)."""
    plain = steps * forward_flops(config, shape.target + shape.references, 0, shape.text)
    reference_pass = forward_flops(config, shape.references, 0, 0, projections=False) + \
        2 * config.in_channels * config.inner_dim * shape.references  # x_embedder of the references
    cached = steps * forward_flops(config, shape.target, shape.references, shape.text)
    return {"plain": plain, "kv": reference_pass + cached, "kv_reference_pass": reference_pass,
            "kv_steps": cached}


def xla_flops(config, shape: Shape, steps: int = STEPS) -> dict[str, float]:
    """The same from XLA's cost analysis of the lowered programs (abstract bfloat16 weights)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from klein_jax.loading import abstract_module
    from klein_jax.models.kv_cache import reference_kv, reference_kv_shapes

    graph, state = nnx.split(abstract_module("transformer", config, "bfloat16"))
    spec = jax.ShapeDtypeStruct
    T, L, R = shape.text, shape.target, shape.references
    text = (spec((1, T, config.joint_attention_dim), jnp.bfloat16), spec((1,), jnp.float32))
    text_ids = spec((T, 4), jnp.int32)

    def plain(state, x, embeds, sigma, ids, txt_ids):
        return nnx.merge(graph, state)(x, embeds, sigma, ids, txt_ids)

    def cached(state, x, embeds, sigma, ids, txt_ids, kv_lengths, cache):
        return nnx.merge(graph, state)(x, embeds, sigma, ids, txt_ids, kv_lengths=kv_lengths, cached_kv=cache)

    def references(state, tokens, ids, count):
        return reference_kv(nnx.merge(graph, state), tokens, ids, count)

    def flops(fn, *args) -> float:
        return float(jax.jit(fn).lower(state, *args).cost_analysis()["flops"])

    latents = lambda n: spec((1, n, config.in_channels), jnp.bfloat16)  # noqa: E731
    ids = lambda n: spec((n, 4), jnp.int32)  # noqa: E731
    step_plain = flops(plain, latents(L + R), *text, ids(L + R), text_ids)
    cache = reference_kv_shapes(config, 1, R, jnp.bfloat16)
    step_cached = flops(cached, latents(L), *text, ids(L), text_ids, spec((1,), jnp.int32), cache)
    reference_pass = flops(references, latents(R), ids(R), spec((), jnp.int32))
    return {"plain": steps * step_plain, "kv": reference_pass + steps * step_cached,
            "kv_reference_pass": reference_pass, "kv_steps": steps * step_cached}


def medium_pipelines():
    """(plain, kv) KleinPipelines of the medium config sharing random modules, and the output size."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pipeline_stages import configs

    from klein_jax.demo_tokenizer import demo_prompt_tokenizer
    from klein_jax.loading import random_module
    from klein_jax.pipeline import KleinPipeline

    setup = configs()["medium"]
    rng = np.random.default_rng(0)
    modules = (random_module("transformer", setup.transformer, rng), random_module("vae", setup.vae, rng),
               random_module("text_encoder", setup.text_encoder, rng),
               demo_prompt_tokenizer(setup.text_encoder.vocab_size))
    pipes = tuple(KleinPipeline(*modules, is_distilled=True, kv_cache=kv, dtype="float32", name=name)
                  for kv, name in ((False, "plain"), (True, "kv")))
    return pipes, setup


def _timed_request(pipe, stages: dict[str, list[float]], **kwargs) -> None:
    """One fused and one stepwise request; appends their stage times (ms) to `stages`."""
    start = time.perf_counter()
    pipe(PROMPT, **kwargs)
    stages.setdefault("total_ms", []).append(1000 * (time.perf_counter() - start))
    for name in ("text_encode_ms", "reference_encode_ms", "denoise_decode_ms"):
        stages.setdefault(name, []).append(pipe.last_timings[name])
    pipe(PROMPT, on_step=lambda i, n: None, **kwargs)
    for name in ("denoise_ms", "decode_ms"):
        stages.setdefault(name, []).append(pipe.last_timings[name])


def time_medium(repeats: int) -> dict:
    """Per pipeline: median stage times (ms) of a 4-reference request, fused and stepwise. The two pipelines take
    turns, so that other load on a shared machine falls on both alike."""
    import numpy as np
    import PIL.Image

    pipes, setup = medium_pipelines()
    width, height = setup.width, setup.height
    rng = np.random.default_rng(1)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
              for _ in range(REFERENCES)]
    kwargs = dict(images=images, width=width, height=height, seed=0, output_type="np")
    for pipe in pipes:  # warm-up: compiles the fused and the stepwise programs
        pipe(PROMPT, **kwargs)
        pipe(PROMPT, on_step=lambda i, n: None, **kwargs)
    stages: dict[str, dict[str, list[float]]] = {pipe.name: {} for pipe in pipes}
    for _ in range(repeats):
        for pipe in pipes:
            _timed_request(pipe, stages[pipe.name], **kwargs)
    tokens = (height // 16) * (width // 16)
    return {"config": setup.name, "width": width, "height": height, "image_tokens": tokens,
            "transformer": dataclasses.asdict(setup.transformer),
            "pipelines": {name: {k: statistics.median(v) for k, v in times.items()} for name, times in stages.items()},
            "counted_flops": counted_flops(setup.transformer, Shape(TEXT_TOKENS, tokens, REFERENCES * tokens))}


def _tflop(x: float) -> str:
    return f"{x / 1e12:,.1f}"


def _gflop(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def markdown(result: dict) -> str:
    flops9, xla9, cpu = result["klein_9b"]["counted"], result["klein_9b"]["xla"], result["cpu"]
    p, k = cpu["pipelines"]["plain"], cpu["pipelines"]["kv"]
    lines = [
        f"Measured by `benchmarks/kv_speedup.py` ({result['date']}, {result['machine']}).",
        "",
        "Transformer FLOPs per request, klein-9B, 1024x1024 with 4 references of 1024x1024 (512 text + 4096 target "
        "+ 16384 reference tokens), 4 steps, batch 1:",
        "",
        "| path | counted from the config | XLA cost analysis |",
        "|---|---|---|",
        f"| plain (references in every step) | {_tflop(flops9['plain'])} TFLOP | {_tflop(xla9['plain'])} TFLOP |",
        f"| KV: reference pass (once) | {_tflop(flops9['kv_reference_pass'])} TFLOP | "
        f"{_tflop(xla9['kv_reference_pass'])} TFLOP |",
        f"| KV: 4 cached steps | {_tflop(flops9['kv_steps'])} TFLOP | {_tflop(xla9['kv_steps'])} TFLOP |",
        f"| KV total | {_tflop(flops9['kv'])} TFLOP | {_tflop(xla9['kv'])} TFLOP |",
        f"| **plain / KV** | **{flops9['plain'] / flops9['kv']:.2f}x** | **{xla9['plain'] / xla9['kv']:.2f}x** |",
        "",
        f"CPU time per request, the {cpu['config']} config (float32, random weights), {cpu['width']}x{cpu['height']} "
        f"with 4 references of {cpu['width']}x{cpu['height']} ({cpu['image_tokens']} target + "
        f"{4 * cpu['image_tokens']} reference tokens), 4 steps; counted transformer FLOPs "
        f"{_gflop(cpu['counted_flops']['plain'])} / {_gflop(cpu['counted_flops']['kv'])} GFLOP "
        f"(plain / KV), medians of {result['repeats']} runs, the two pipelines taking turns:",
        "",
        "| stage (ms) | plain | KV | plain / KV |",
        "|---|---|---|---|",
    ]
    for name, label in (("denoise_ms", "denoise (stepwise path: reference pass + 4 steps)"),
                        ("denoise_decode_ms", "denoise + decode (fused program)"),
                        ("reference_encode_ms", "reference encoding (VAE, same in both)"),
                        ("text_encode_ms", "text encoder"), ("total_ms", "whole request")):
        lines.append(f"| {label} | {p[name]:,.0f} | {k[name]:,.0f} | {p[name] / k[name]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline (median)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {DOC.relative_to(ROOT)} as it is")
    args = parser.parse_args(argv)

    from klein_jax.configs import KLEIN_9B

    shape = Shape(TEXT_TOKENS, 4096, REFERENCES * 4096)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "repeats": args.repeats,
        "klein_9b": {"counted": counted_flops(KLEIN_9B, shape), "xla": xla_flops(KLEIN_9B, shape)},
        "cpu": time_medium(args.repeats),
    }
    print(json.dumps(result, indent=1))
    text = markdown(result)
    print(text)
    if not args.no_write:
        reporting.write_section(DOC, "kv-speedup", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
