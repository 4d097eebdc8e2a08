"""Device memory of klein-4B and klein-9B (bfloat16) sharded over model-parallel 1, 2, 4 and 8 devices.

Weights: bytes per device of each component, from the real configs with abstract arrays (nnx.eval_shape) and the
partitioning table (klein_jax/sharding.py); nothing is allocated. Programs (--programs): the temporary memory XLA
assigns per device to the text encoder (batch 1) and to the 4-step 1024x1024 generate program (batch 1), from
`compiled.memory_analysis()` of programs lowered with abstract sharded weights on CPU devices (set below, before JAX
starts). The programs are compiled in float32: XLA's CPU backend has no bfloat16 matmul and would count a float32
copy of every bfloat16 weight as temporary memory (8.9 of the text encoder's 8.9 GiB at model=1), which TPUs and GPUs
never make; float32 activations bound the bfloat16 ones from above. The CPU backend runs attention without flash
kernels, as TPUs do: the attention logits are included, split over `model` with the heads (GPUs run cuDNN flash
attention). Writes the table between the markers of docs/sharding.md.

    .venv/bin/python benchmarks/sharding_memory.py                # weights only (seconds)
    .venv/bin/python benchmarks/sharding_memory.py --programs     # + compiled programs (minutes per model)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import textwrap
import time

import reporting

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "sharding.md"
MODEL_AXES = (1, 2, 4, 8)
GIB = 2**30
# Accelerator memory per device (GB as sold = 1e9 bytes); a plan fits when it needs at most FILL of it.
DEVICES = {"TPU v5e": 16e9, "TPU v6e": 32e9, "TPU v4": 32e9, "TPU v5p": 95e9,
           "L4": 24e9, "A10G": 24e9, "A100 40GB": 40e9, "A100 80GB": 80e9, "H100": 80e9}
FILL = 0.9  # room for the runtime, the compiled code and fragmentation


def models() -> dict:
    from klein_jax.configs import FLUX2_VAE, KLEIN_4B, KLEIN_9B, QWEN3_4B, QWEN3_8B

    return {"klein-4B": {"transformer": KLEIN_4B, "text_encoder": QWEN3_4B, "vae": FLUX2_VAE},
            "klein-9B": {"transformer": KLEIN_9B, "text_encoder": QWEN3_8B, "vae": FLUX2_VAE}}


def weight_bytes(configs: dict, model_axis: int) -> dict[str, int]:
    """component -> bytes each device holds of its bfloat16 parameters on a (data=1, model=model_axis) mesh."""
    import numpy as np
    from jax.sharding import AbstractMesh

    from klein_jax import sharding
    from klein_jax.loading import abstract_module, expected_params

    mesh = AbstractMesh((1, model_axis), sharding.AXES)
    out = {}
    for name, config in configs.items():
        sharding.check_model_axis(name, config, mesh)
        expected = expected_params(abstract_module(name, config, "bfloat16"))
        shardings = sharding.param_shardings(name, expected, mesh)
        out[name] = sum(int(np.prod(shardings[p].shard_shape(s))) * np.dtype(d).itemsize
                        for p, (s, d) in expected.items())
    return out


def program_bytes(configs: dict, model_axis: int) -> dict[str, int]:
    """Temporary bytes per device of the text encoder and the 1024x1024 generate program (batch 1, 4 steps), both
    compiled in float32 (see the module docstring)."""
    from klein_jax import sharding
    from klein_jax.buckets import ReferenceBuckets
    from klein_jax.loading import abstract_module
    from klein_jax.sampler import GeneratePlan, Sampler, TextPlan

    mesh = sharding.make_mesh(f"model={model_axis}")
    modules = [abstract_module(name, configs[name], "float32") for name in ("transformer", "vae", "text_encoder")]
    sampler = Sampler(*modules, dtype="float32", text_length=configs["text_encoder"].max_sequence_length,
                      slot_tokens=ReferenceBuckets.default(16).slot_tokens, mesh=mesh)
    out = {}
    for key, plan in (("text_temp", TextPlan(1)), ("generate_temp", GeneratePlan(1, (64, 64), 0, 4, False, False))):
        start = time.perf_counter()
        stats = sampler.lower(plan).compile().memory_analysis()
        out[key] = int(stats.temp_size_in_bytes)
        print(f"  model={model_axis} {plan.describe(16)}: temp {stats.temp_size_in_bytes / GIB:.2f} GiB "
              f"(compiled in {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return out


def fits(need_bytes: float) -> str:
    names = [name for name, size in DEVICES.items() if need_bytes <= FILL * size]
    return ", ".join(names) if names else "none listed"


def table(results: dict) -> str:
    rows = ["| model | model axis | transformer | text encoder | VAE | weights per device | text encoder temp "
            "| generate temp (1024x1024) | needs per device | fits (x model-axis devices) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for model, per_axis in results.items():
        for axis, r in per_axis.items():
            weights = r["transformer"] + r["text_encoder"] + r["vae"]
            temps = [r[k] for k in ("text_temp", "generate_temp") if k in r]
            need = weights + max(temps) if temps else None
            cells = [f"{r[k] / GIB:.2f}" if k in r else "-" for k in ("text_temp", "generate_temp")]
            rows.append(f"| {model} | {axis} | {r['transformer'] / GIB:.2f} | {r['text_encoder'] / GIB:.2f} | "
                        f"{r['vae'] / GIB:.3f} | {weights / GIB:.2f} | {cells[0]} | {cells[1]} | "
                        f"{'-' if need is None else f'{need / GIB:.2f}'} | "
                        f"{fits(weights if need is None else need)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", action="store_true", help="also compile the programs (minutes per model)")
    p.add_argument("--models", nargs="+", default=list(models()), choices=list(models()))
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/sharding.md as it is")
    args = p.parse_args(argv)
    import jax

    results: dict = {}
    for name in args.models:
        configs = models()[name]
        results[name] = {}
        for axis in MODEL_AXES:
            results[name][axis] = weight_bytes(configs, axis)
            if args.programs:
                results[name][axis].update(program_bytes(configs, axis))
    text = table(results)
    text += "\n\n" + textwrap.fill(
            f"GiB per device, batch 1, data axis 1. Weights in bfloat16; temporary memory of the programs "
            f"compiled in float32 on the CPU backend (an upper bound of the bfloat16 programs' activations). "
            f"\"needs\" = weights + the larger temporary buffer (the programs run one at a time); a device fits "
            f"when that is at most {FILL:.0%} of its memory. JAX {jax.__version__} "
            f"(`python benchmarks/sharding_memory.py{' --programs' if args.programs else ''}`).", width=116)
    print(text)
    print(json.dumps(results), file=sys.stderr)
    if not args.no_doc:
        reporting.write_section(DOC, "sharding-memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
