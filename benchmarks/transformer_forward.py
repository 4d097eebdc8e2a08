"""Times one compiled Flux2Transformer forward pass (one NFE) with random weights, on whatever device JAX finds.

    python benchmarks/transformer_forward.py --config klein-4b --width 1024 --height 1024 --dtype bfloat16 \
        --out docs/benchmarks/transformer_forward.json

Reports compile time, the median step time over --iters runs, XLA's FLOP count and the achieved TFLOP/s
(klein.md §7 expects 34.8 TFLOP per NFE for klein-4B at 1024x1024).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from klein_jax.configs import KLEIN_4B, KLEIN_9B, TINY_TRANSFORMER

CONFIGS = {"tiny": TINY_TRANSFORMER, "klein-4b": KLEIN_4B, "klein-9b": KLEIN_9B}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _inputs(config, *, width: int, height: int, refs: int, text_len: int, dtype):
    """Random latents / text features and the pipeline's position ids for a target plus `refs` same-size refs."""
    h, w = height // 16, width // 16
    grid = jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij"), -1).reshape(-1, 2)  # (h*w, 2)
    zeros = jnp.zeros((h * w, 1), jnp.int32)
    img_ids = jnp.concatenate([jnp.concatenate([zeros + 10 * k, grid, zeros], -1) for k in range(refs + 1)])
    txt_ids = jnp.stack([jnp.zeros(text_len, jnp.int32)] * 3 + [jnp.arange(text_len, dtype=jnp.int32)], -1)
    k1, k2 = jax.random.split(jax.random.key(0))
    latents = jax.random.normal(k1, (1, img_ids.shape[0], config.in_channels), dtype)
    text = jax.random.normal(k2, (1, text_len, config.joint_attention_dim), dtype)
    return latents, text, jnp.array([0.75], jnp.float32), img_ids, txt_ids


def run(args) -> dict:
    config, dtype = CONFIGS[args.config], DTYPES[args.dtype]
    if args.layers is not None:
        config = dataclasses.replace(config, num_layers=args.layers[0], num_single_layers=args.layers[1])
    from accelerator import _random_module  # built abstractly, filled tensor by tensor: no whole-model init program

    graphdef, state = nnx.split(_random_module("transformer", config, dtype, seed=0))
    inputs = _inputs(config, width=args.width, height=args.height, refs=args.refs, text_len=args.text_len,
                     dtype=dtype)
    forward = jax.jit(lambda state, *xs: nnx.merge(graphdef, state)(*xs))
    start = time.perf_counter()
    compiled = forward.lower(state, *inputs).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
    jax.block_until_ready(compiled(state, *inputs))  # warm-up
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, *inputs))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"config": args.config, "layers": [config.num_layers, config.num_single_layers], "dtype": args.dtype,
            "width": args.width, "height": args.height, "refs": args.refs, "text_len": args.text_len,
            "tokens": int(inputs[0].shape[1]) + args.text_len, "device": str(jax.devices()[0].device_kind),
            "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 2),
            "tflop": float(f"{flops / 1e12:.4g}"), "tflop_per_s": float(f"{flops / step_s / 1e12:.4g}")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--layers", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), help="override the block counts")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--refs", type=int, default=0, help="reference images of the same size")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=pathlib.Path, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
