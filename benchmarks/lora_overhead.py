"""Cost per transformer step of LoRA factors as program inputs (klein_jax/lora) against the plain program.

    python benchmarks/lora_overhead.py --config medium --ranks 16 64 --tokens 512 --text-len 256 --write docs/lora.md

Random weights; one compiled forward pass (one step) of the plain transformer, and of the same transformer with
every linear layer carrying zero-padded factors of each rank (the program `klein-serve --lora` runs). Prints one
JSON line per program and, with --write, replaces the table between the markers in that Markdown file.
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
import numpy as np
import reporting
from flax import nnx

from klein_jax.configs import KLEIN_4B, TINY_TRANSFORMER
from klein_jax.lora import LoraLayout, apply_lora, linear_targets
from klein_jax.models.transformer import Flux2Transformer

# medium: klein-4B with 8 of its 24 heads (1024 wide) and 1 + 2 blocks, a CPU-sized stand-in
CONFIGS = {"tiny": TINY_TRANSFORMER,
           "medium": dataclasses.replace(KLEIN_4B, num_attention_heads=8, num_layers=1, num_single_layers=2),
           "klein-4b": KLEIN_4B}


def _inputs(config, tokens: int, text_len: int, dtype):
    k1, k2 = jax.random.split(jax.random.key(0))
    latents = jax.random.normal(k1, (1, tokens, config.in_channels), dtype)
    text = jax.random.normal(k2, (1, text_len, config.joint_attention_dim), dtype)
    img_ids = jnp.zeros((tokens, 4), jnp.int32).at[:, 2].set(jnp.arange(tokens))
    txt_ids = jnp.zeros((text_len, 4), jnp.int32).at[:, 3].set(jnp.arange(text_len))
    return latents, text, jnp.array([0.75], jnp.float32), img_ids, txt_ids


def _median_times(programs: list[tuple], iters: int) -> list[float]:
    """Median seconds per call of each (compiled, args); the programs take turns, so load drifts hit all alike."""
    for compiled, args in programs:
        jax.block_until_ready(compiled(*args))
    times = [[] for _ in programs]
    for _ in range(iters):
        for k, (compiled, args) in enumerate(programs):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run(config_name: str, ranks: list[int], tokens: int, text_len: int, iters: int, dtype) -> list[dict]:
    config = CONFIGS[config_name]
    transformer = nnx.jit(lambda: Flux2Transformer(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(transformer)
    targets = tuple((path, *shape) for path, shape in linear_targets(transformer).items())
    inputs = _inputs(config, tokens, text_len, dtype)

    def forward(state, lora, *xs, layout):
        model = nnx.merge(graphdef, state)
        if layout is not None:
            apply_lora(model, layout, lora)
        return model(*xs)

    rows, programs = [], []
    for rank in [0, *ranks]:
        layout = LoraLayout(targets, rank) if rank else None
        rng = np.random.default_rng(rank)
        lora = None if layout is None else {
            "down": tuple(jnp.asarray(rng.standard_normal((i, rank)) * 0.01, dtype) for _, i, _ in targets),
            "up": tuple(jnp.asarray(rng.standard_normal((rank, o)) * 0.01, dtype) for _, _, o in targets),
            "weights": jnp.ones(rank, jnp.float32)}
        fn = jax.jit(lambda s, lo, *xs, layout=layout: forward(s, lo, *xs, layout=layout))
        start = time.perf_counter()
        compiled = fn.lower(state, lora, *inputs).compile()
        compile_s = time.perf_counter() - start
        programs.append((compiled, (state, lora, *inputs)))
        lora_mb = 0 if lora is None else sum(a.nbytes for a in jax.tree.leaves(lora)) / 2**20
        rows.append({"config": config_name, "dtype": jnp.dtype(dtype).name, "tokens": tokens + text_len,
                     "rank": rank, "layers": len(targets), "device": jax.devices()[0].device_kind,
                     "compile_s": round(compile_s, 1), "factors_mib": round(lora_mb, 2)})
    seconds = _median_times(programs, iters)
    for row, step_s in zip(rows, seconds):
        row.update(step_ms=round(1e3 * step_s, 1), overhead_pct=round(100 * (step_s / seconds[0] - 1), 1))
        print(json.dumps(row), flush=True)
    return rows


def table(results: list[dict], command: str) -> str:
    rows = [[f"{r['rank'] or 'none'}", f"{r['step_ms']}", f"{r['overhead_pct']:+.1f}%", f"{r['factors_mib']}",
             f"{r['compile_s']}"] for r in results]
    first = results[0]
    return (f"`{command}` on {first['device']} ({first['config']}, {first['tokens']} tokens, "
            f"{first['layers']} linear layers, {first['dtype']}; medians, programs taking turns):\n\n"
            + reporting.table(("rank", "step ms", "vs no adapter", "factors (MiB)", "compile s"), rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="medium")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--tokens", type=int, default=1024, help="image tokens (1024: 512x512 pixels)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--write", type=pathlib.Path, help="Markdown file whose lora_overhead table to replace")
    args = p.parse_args(argv)
    results = run(args.config, args.ranks, args.tokens, args.text_len, args.iters, jnp.dtype(args.dtype))
    if args.write:
        command = reporting.command_line(__file__, argv)
        reporting.write_section(args.write, "lora_overhead", table(results, command), opening="start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
