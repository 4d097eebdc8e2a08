"""Fused, shard-aligned projections (klein_jax/models/fused.py): collectives, FLOPs and CPU step time.

  python benchmarks/fused_projections.py [--baseline REV] [--write]

1. Collectives in the compiled klein-4B 1024x1024 transformer call (abstract weights, bfloat16) at model=4, over 8 fake
   CPU devices (the counts come from a child process with XLA_FLAGS=--xla_force_host_platform_device_count=8).
2. XLA's cost-analysis FLOPs of the same program (unsharded): fusing must not change them.
3. Median wall time of one transformer call of the medium config (benchmarks/pipeline_stages.py) on CPU, float32.
Every program runs XLA's attention in both trees (the baseline's only backend), so that the layouts are compared.
Each figure is measured for this tree and for `--baseline` (a git revision before the fusion, extracted with
`git archive`, whose klein_jax runs the same code in a child process). `--write` puts the table in docs/benchmarks.md.

  python benchmarks/fused_projections.py --collectives MESH [--config NAME] [--misaligned]   (child: JSON counts)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import reporting  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "fused-projections"
HEADING = ("## Fused projections\n\n`python benchmarks/fused_projections.py --write` (docs/sharding.md, \"Fused "
           "projections\").")
COLLECTIVES = ("all-reduce", "all-to-all", "collective-permute", "all-gather", "reduce-scatter")
DEFAULT_BASELINE = "b9ccfc0"  # the last commit with separate q/k/v layers and contiguous splits


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective instructions in compiled HLO text (async pairs counted once, by their -start)."""
    return {name: len(re.findall(rf"= \S+ {name}(-start)?\(", hlo)) for name in COLLECTIVES}


def _configs():
    from klein_jax.configs import KLEIN_4B

    from pipeline_stages import configs

    return {"klein-4b": KLEIN_4B, "medium": configs()["medium"].transformer}


def xla_attention(module, dtype):
    """Every attention of `module` on XLA's path, the only one the baseline tree has (it has no set_attention): so
    that both trees count the attention's FLOPs (XLA counts a loop body's once and a custom call's not at all) and
    time the projections' layouts, not this tree's CPU attention kernel."""
    try:
        from klein_jax.models.attention import set_attention
    except ImportError:
        return module
    set_attention(module, "xla", dtype)
    return module


def _program(config, dtype, tokens: int, text: int, mesh=None, misaligned: bool = False):
    """The lowered transformer call (batch 1) on abstract weights with XLA attention, its parameters placed by the
    partition table."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from klein_jax import sharding
    from klein_jax.loading import abstract_module

    graphdef, state = nnx.split(xla_attention(abstract_module("transformer", config, dtype), dtype))
    if mesh is not None:
        state = sharding.shard_state(state, "transformer", mesh)
        if misaligned:  # the grouped kernels split along C (inside each group) instead of G: a deliberate bug
            flat = [(path, v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                          sharding=NamedSharding(mesh, P(None, None, "model")))))
                    if path[-1] == "grouped_kernel" else (path, v) for path, v in nnx.to_flat_state(state)]
            state = nnx.from_flat_state(flat)
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=None if mesh is None else sharding.replicated(mesh))  # noqa: E731
    inputs = (spec((1, tokens, config.in_channels), dtype), spec((1, text, config.joint_attention_dim), dtype),
              spec((1,), jnp.float32), spec((tokens, 4), jnp.int32), spec((text, 4), jnp.int32))

    def call(state, *args):
        return nnx.merge(graphdef, state)(*args)

    return jax.jit(call).lower(state, *inputs)


def collectives_child(mesh_text: str, config_name: str, misaligned: bool) -> dict:
    import jax.numpy as jnp

    from klein_jax.sharding import make_mesh

    config = _configs()[config_name]
    tokens = (1024 // 16) ** 2 if config_name == "klein-4b" else 256
    compiled = _program(config, jnp.bfloat16, tokens, 512 if config_name == "klein-4b" else 64,
                        make_mesh(mesh_text), misaligned).compile()
    return count_collectives(compiled.as_text())


def _child_env(pythonpath: pathlib.Path | None) -> dict[str, str]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return env


def run_child(args: list[str], pythonpath: pathlib.Path | None = None) -> dict:
    return reporting.child_json([sys.executable, __file__, *args], f"child {args}", env=_child_env(pythonpath))


def measure_child(repeats: int) -> dict:
    """FLOPs of the 4B program and the medium config's CPU step time, for the klein_jax this process imports."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from klein_jax.loading import random_module

    configs = _configs()
    flops = _program(configs["klein-4b"], jnp.bfloat16, (1024 // 16) ** 2, 512).compile().cost_analysis()
    flops = flops[0] if isinstance(flops, list) else flops
    config = configs["medium"]
    model = xla_attention(random_module("transformer", config, np.random.default_rng(0), "float32"), jnp.float32)
    rng = np.random.default_rng(1)
    tokens, text = (512 // 16) ** 2, 512
    args = (jnp.asarray(rng.standard_normal((1, tokens, config.in_channels)), jnp.float32),
            jnp.asarray(rng.standard_normal((1, text, config.joint_attention_dim)), jnp.float32),
            jnp.full((1,), 0.5, jnp.float32), jnp.zeros((tokens, 4), jnp.int32), jnp.zeros((text, 4), jnp.int32))
    from flax import nnx

    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    step(state, *args).block_until_ready()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(state, *args).block_until_ready()
        samples.append(time.perf_counter() - start)
    return {"flops": float(flops["flops"]), "step_ms": 1000 * statistics.median(samples)}


def _baseline_tree(rev: str, into: pathlib.Path) -> pathlib.Path:
    archive = subprocess.run(["git", "archive", rev, "klein_jax"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure(baseline: str, repeats: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"fused (this tree)": None, f"unfused ({baseline})": _baseline_tree(baseline, pathlib.Path(tmp))}
        for label, tree in trees.items():
            results[label] = {
                "collectives": run_child(["--collectives", "model=4"], tree),
                **run_child(["--measure", "--repeats", str(repeats)], tree),
            }
            print(label, json.dumps(results[label]), flush=True)
    return results


def markdown(results: dict) -> str:
    load = reporting.proc_load()
    lines = ["| layout | all-reduce | all-to-all | collective-permute | all-gather | 4B FLOPs (XLA) | "
             "medium step, CPU f32 |", "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        c = r["collectives"]
        lines.append(f"| {label} | {c['all-reduce']} | {c['all-to-all']} | {c['collective-permute']} | "
                     f"{c['all-gather']} | {r['flops'] / 1e12:.3f} T | {r['step_ms']:.0f} ms |")
    return "\n".join(["", *lines, "", f"Collectives: the compiled klein-4B 1024x1024 transformer call (bf16, "
                      f"abstract weights) at model=4 over 8 fake CPU devices. Step: median of one medium-config call "
                      f"(512x512, float32). Both trees run XLA's attention (the baseline's only one). On {reporting.host()}, load average during the run: {load}.", ""])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the unfused layout")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--collectives", metavar="MESH", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="klein-4b", help=argparse.SUPPRESS)
    parser.add_argument("--misaligned", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.collectives:
        print(json.dumps(collectives_child(args.collectives, args.config, args.misaligned)))
        return
    if args.measure:
        print(json.dumps(measure_child(args.repeats)))
        return
    text = markdown(measure(args.baseline, args.repeats))
    print(reporting.section(SECTION, text))
    if args.write:
        reporting.write_section(DOC, SECTION, text, heading=HEADING)


if __name__ == "__main__":
    main()
