"""Peak host memory of loading the converted klein-4B pipeline (bfloat16) on one CPU device and sharded over 8.

Fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) keep every device's buffers in host memory, so a
sharded load holds, in the process, the sum over devices of the bytes each device holds: a replicated parameter
counts once per device. That sum (the floor) is computed from the partitioning table with abstract arrays; each load
runs in a child process that reports its peak RSS (ru_maxrss), the bytes its devices hold and its wall time. A mesh
whose floor does not fit the machine's available memory is reported and not run. "RSS - device bytes" is what the
load held besides the weights (runtime, read buffers): on a TPU or GPU host, whose weights live on the devices,
that is what the host needs.

The checkpoint: --converted DIR (a klein-convert folder with the klein-4B shapes), or generated like
benchmarks/convert_memory.py does (random weights, real shapes, ~16 GB under --workdir, converted in a few
minutes, deleted afterwards unless --keep).

  .venv/bin/python benchmarks/sharded_load_memory.py [--converted DIR | --workdir DIR [--keep]] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import reporting

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "sharding.md"
# "": one device, as benchmarks/convert_memory.py loads. model=8 runs first, while the most memory is free.
MESHES = ("model=8", "", "data=2,model=4", "data=8")
DEVICES = 8
GIB = 2**30
HEADROOM = 1.5 * GIB  # runtime and read buffers on top of the floor (1.5 GiB on one device), or no run

_LOAD_CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from flax import nnx
from klein_jax import sharding
from klein_jax.loading import load_components
mesh = sharding.make_mesh(sys.argv[2]) if sys.argv[2] else None
c = load_components(sys.argv[1], "bfloat16", mesh=mesh)
seconds = time.perf_counter() - start
held = sharding.bytes_per_device([nnx.state(m) for m in (c.transformer, c.vae, c.text_encoder)])
print(json.dumps({"load_s": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "device_bytes": sum(held.values()), "devices": len(held), "max_device_bytes": max(held.values())}))
"""


def mesh_devices(mesh_text: str) -> int:
    from klein_jax import sharding

    return sharding.parse_mesh(mesh_text)["data"] * sharding.parse_mesh(mesh_text)["model"] if mesh_text else 1


def floor_bytes(mesh_text: str) -> dict[str, int]:
    """component -> the sum over the mesh's devices of the bfloat16 bytes each holds (abstract arrays)."""
    import numpy as np
    from jax.sharding import AbstractMesh

    from klein_jax import sharding
    from klein_jax.configs import FLUX2_VAE, KLEIN_4B, QWEN3_4B
    from klein_jax.loading import abstract_module, expected_params

    sizes = sharding.parse_mesh(mesh_text) if mesh_text else dict.fromkeys(sharding.AXES, 1)
    mesh = AbstractMesh((sizes["data"], sizes["model"]), sharding.AXES)
    out = {}
    for name, config in (("transformer", KLEIN_4B), ("text_encoder", QWEN3_4B), ("vae", FLUX2_VAE)):
        expected = expected_params(abstract_module(name, config, "bfloat16"))
        shardings = sharding.param_shardings(name, expected, mesh)
        per_device = sum(int(np.prod(shardings[p].shard_shape(s))) * np.dtype(d).itemsize
                         for p, (s, d) in expected.items())
        out[name] = per_device * mesh.size  # every device holds one shard of every parameter
    return out


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def load(folder: pathlib.Path, mesh_text: str) -> dict:
    """Loads `folder` in a child process (8 CPU devices if a mesh is given); its figures."""
    # The allocator as users run it (no MALLOC_ARENA_MAX): the loader hands freed buffers back itself
    # (klein_jax/loading/host_memory.py).
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if mesh_text:
        # 8 device threads on a few shared cores can reach a collective more than XLA's default 40 s apart
        env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES} "
                            f"--xla_cpu_collective_call_terminate_timeout_seconds=1200")
    return reporting.child_json([sys.executable, "-c", _LOAD_CHILD, str(folder), mesh_text],
                                f"loading over {mesh_text or 'one device'}", env=env)


def converted_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    """Generates the klein-4B-sized diffusers folder (benchmarks/convert_memory.py) and klein-converts it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import convert_memory

    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    convert_memory.make_source(workdir / "src")
    done = subprocess.run([sys.executable, "-m", "convert", str(workdir / "src"), str(workdir / "out"),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"klein-convert failed:\n{done.stderr[-4000:]}")
    shutil.rmtree(workdir / "src")
    print(f"generated and converted in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return workdir / "out"


def measure(folder: pathlib.Path) -> list[dict]:
    rows = []
    for mesh_text in MESHES:
        floor = floor_bytes(mesh_text)
        row = {"mesh": mesh_text or "one device", "mesh_text": mesh_text, "floor": sum(floor.values()),
               "floor_by_component": floor}
        available = available_bytes()
        if row["floor"] + HEADROOM > available:
            row["skipped"] = f"floor {row['floor'] / GIB:.1f} GiB > {(available - HEADROOM) / GIB:.1f} GiB available"
        else:
            row.update(load(folder, mesh_text))
        row["load_average"] = reporting.proc_load()
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mesh | devices | floor: sum over devices of the bytes each holds | measured device bytes "
             "| peak RSS | RSS - device bytes | load time | load average |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: MESHES.index(r["mesh_text"])):
        if "skipped" in r:
            lines.append(f"| {r['mesh']} | {mesh_devices(r['mesh_text'])} | {r['floor'] / GIB:.2f} GiB | not run: {r['skipped']} "
                         f"| | | | {r['load_average']} |")
            continue
        lines.append(f"| {r['mesh']} | {r['devices']} | {r['floor'] / GIB:.2f} GiB | {r['device_bytes'] / GIB:.2f} GiB "
                     f"| **{r['peak_rss'] / GIB:.2f} GiB** | {(r['peak_rss'] - r['device_bytes']) / GIB:.2f} GiB "
                     f"| {r['load_s']:.0f} s | {r['load_average']} |")
    note = (f"klein-4B converted folder (random weights, real shapes, bfloat16), `load_components(..., mesh=)` in a "
            f"child process on CPU ({DEVICES} fake devices for a mesh), glibc's default allocator settings; peak RSS = "
            f"ru_maxrss. The machine was "
            f"shared (load average after each load in the table): times are upper bounds. `python benchmarks/sharded_load_memory.py "
            f"--write`, {time.strftime('%Y-%m-%d')}.")
    return "\n".join(lines) + "\n\n" + textwrap.fill(note, width=116)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--converted", type=pathlib.Path, help="an existing klein-convert folder of klein-4B's shapes")
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/klein-sharded-load-bench"))
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--write", action="store_true", help="write the table into docs/sharding.md")
    args = p.parse_args(argv)
    folder = args.converted or converted_checkpoint(args.workdir)
    try:
        text = table(measure(folder))
    finally:
        if args.converted is None and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(text)
    if args.write:
        reporting.write_section(DOC, "sharded-load", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
