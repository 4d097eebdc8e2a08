"""Peak memory and time of klein-convert on a checkpoint with the real FLUX.2-klein-4B (or 9B) sizes (random weights).

Generates, under --workdir (default /tmp/klein-convert-bench, deleted afterwards), a diffusers pipeline folder
with the shapes of the published one: the klein-4B transformer (one 7.75 GB bf16 file), the Qwen3-4B text encoder
(all 36 layers, 8.04 GB bf16, in two shards with an index, as on the hub) and the FLUX.2 VAE; with --model-size 9b
the klein-9B transformer and Qwen3-8B (untied: its lm_head is in the files too). Shapes come from the reference
classes instantiated on torch's meta device. Then runs `python -m convert` in a child process and reports its peak
RSS (getrusage RUSAGE_CHILDREN ru_maxrss) and wall time, and (4B) the same for a child that loads the result with
load_components; the 9B's ~30 GB of bf16 arrays do not fit a 24 GiB machine, so 9B measures the conversion only.
Writes the figures into docs/convert.md between the benchmark (4B) or benchmark-9b markers.

  .venv/bin/python benchmarks/convert_memory.py [--model-size 4b|9b] [--workdir DIR] [--keep] [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import reporting

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "convert.md"
_BLOCK = np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32).astype(ml_dtypes.bfloat16)  # 32 MB

_ST_DTYPES = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}


def _configs(size: str):
    """(transformer config, text encoder config, tied embeddings) of klein-4B or klein-9B."""
    from klein_jax.configs import KLEIN_4B, KLEIN_9B, QWEN3_4B, QWEN3_8B

    return {"4b": (KLEIN_4B, QWEN3_4B, True), "9b": (KLEIN_9B, QWEN3_8B, False)}[size]


def _reference_shapes(size: str = "4b") -> dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]]:
    """component -> tensor name -> (shape, dtype) of the published klein checkpoint, from meta-device models."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from klein_jax.configs import FLUX2_VAE

    transformer, text_encoder, tied = _configs(size)
    vae_kwargs = {k: v for k, v in FLUX2_VAE.to_dict().items() if k != "force_upcast"}
    with torch.device("meta"):
        models = {
            "transformer": Flux2Transformer2DModel(**transformer.to_dict()),
            "vae": AutoencoderKLFlux2(**vae_kwargs),
            "text_encoder": Qwen3ForCausalLM(Qwen3Config(**_qwen3_json(text_encoder, tied))),
        }
    out = {}
    for name, model in models.items():
        state = model.state_dict()
        if name == "text_encoder" and tied:
            state.pop("lm_head.weight")  # tied to the embedding in Qwen3-4B: not saved
        out[name] = {k: (tuple(v.shape), np.dtype(np.int64) if v.dtype == torch.int64 else
                         np.dtype(ml_dtypes.bfloat16)) for k, v in state.items()}
    return out


def _qwen3_json(config, tied: bool = True) -> dict:
    """Qwen/Qwen3-4B's (or Qwen3-8B's, untied) config.json (the fields that matter)."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "max_position_embeddings": 40960,
        "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
    }


def write_safetensors(path: pathlib.Path, tensors: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """Streams a safetensors file of random values tensor by tensor (never the whole file in memory)."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape, dtype in tensors.values():
            size = int(np.prod(shape, dtype=np.int64))
            if dtype != np.dtype(ml_dtypes.bfloat16):
                f.write(np.zeros(size, dtype).tobytes())
                continue
            written = 0
            while written < size:
                n = min(size - written, _BLOCK.size)
                f.write(_BLOCK[:n].tobytes())
                written += n
    return 8 + len(raw) + offset


def _split_in_two(tensors: dict) -> tuple[dict, dict]:
    total = sum(int(np.prod(s, dtype=np.int64)) for s, _ in tensors.values())
    first, running = {}, 0
    for name, (shape, dtype) in tensors.items():
        if running >= total // 2:
            break
        first[name] = (shape, dtype)
        running += int(np.prod(shape, dtype=np.int64))
    return first, {k: v for k, v in tensors.items() if k not in first}


def make_source(folder: pathlib.Path, size: str = "4b") -> int:
    """Writes the klein-4B-sized (or 9B-sized) diffusers pipeline folder; returns its size in bytes."""
    from klein_jax.configs import FLUX2_VAE
    from klein_jax.demo_tokenizer import build_demo_tokenizer, save_tokenizer_folder

    transformer, text_encoder, tied = _configs(size)
    shapes = _reference_shapes(size)
    for name in ("transformer", "vae", "text_encoder"):
        (folder / name).mkdir(parents=True)
    size = write_safetensors(folder / "transformer" / "diffusion_pytorch_model.safetensors", shapes["transformer"])
    size += write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", shapes["vae"])
    shards = _split_in_two(shapes["text_encoder"])
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-00002.safetensors"
        size += write_safetensors(folder / "text_encoder" / file, shard)
        weight_map.update(dict.fromkeys(shard, file))
    _json(folder / "text_encoder" / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    _json(folder / "transformer" / "config.json", {"_class_name": "Flux2Transformer2DModel", **transformer.to_dict()})
    _json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKLFlux2", **FLUX2_VAE.to_dict()})
    _json(folder / "text_encoder" / "config.json", _qwen3_json(text_encoder, tied))
    _json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "time_shift_type": "exponential"})
    _json(folder / "model_index.json", {"_class_name": "Flux2KleinPipeline", "is_distilled": True})
    save_tokenizer_folder(folder / "tokenizer", build_demo_tokenizer())
    return size


def _json(path: pathlib.Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=list))


def _folder_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


_LOAD_CHILD = """
import resource, sys, time
start = time.perf_counter()
from klein_jax.loading import load_components
c = load_components(sys.argv[1], "bfloat16")
print(f"{time.perf_counter() - start:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
"""


def run(workdir: pathlib.Path, *, keep: bool, size: str = "4b") -> dict:
    """Generates the source, converts it in a child process and (4B) loads the result in another; returns the
    figures."""
    shutil.rmtree(workdir, ignore_errors=True)
    src, out = workdir / "src", workdir / "out"
    try:
        start = time.perf_counter()
        source_bytes = make_source(src, size)
        largest = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                      for tensors in _reference_shapes(size).values() for shape, dtype in tensors.values())
        print(f"generated {source_bytes / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        command = [sys.executable, "-m", "convert", str(src), str(out), "--no-progress"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        convert_s = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"klein-convert failed ({done.returncode}):\n{done.stderr[-4000:]}")
        convert_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        figures = {
            "model_size": size, "source_gb": source_bytes / 1e9, "out_gb": _folder_bytes(out) / 1e9,
            "largest_tensor_gib": largest / 2**30, "manifest": json.loads((out / "klein_manifest.json").read_text()),
            "convert_s": convert_s, "convert_peak_rss_gib": convert_rss_kb / 2**20, "summary": done.stdout.strip(),
        }
        if size != "4b":
            return figures
        loaded = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(out)], cwd=ROOT, capture_output=True,
                                text=True)
        if loaded.returncode != 0:
            raise RuntimeError(f"load_components failed:\n{loaded.stderr[-4000:]}")
        load_s, load_rss_kb = loaded.stdout.split()[-2:]
        return {**figures, "load_s": float(load_s), "load_peak_rss_gib": int(load_rss_kb) / 2**20}
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _component_rows(r: dict) -> str:
    """The written components' table rows, from the converted folder's manifest."""
    return "\n".join(f"| {name} | {c['tensors']} | {c['params']:,} | {c['bytes'] / 1e9:.2f} GB |"
                     for name, c in r["manifest"]["components"].items())


def _markdown(r: dict) -> str:
    rows = _component_rows(r)
    return f"""\
Measured by `benchmarks/convert_memory.py` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {_cpu_count()} CPU
cores, {_mem_gib():.0f} GiB RAM, no GPU): random weights with the real FLUX.2-klein-4B shapes, bf16, in the hub
layout (transformer one file; Qwen3-4B with all 36 layers in two shards with an index; FLUX.2 VAE), source
{r['source_gb']:.2f} GB on disk.

```
.venv/bin/python -m convert SRC OUT            # --dtype bfloat16 (default)
```

| | wall time | peak RSS |
|---|---|---|
| `klein-convert` (child process, `RUSAGE_CHILDREN` ru_maxrss) | {r['convert_s']:.0f} s \
| **{r['convert_peak_rss_gib']:.2f} GiB** |
| `load_components(OUT, "bfloat16")` on CPU (child process) | {r['load_s']:.0f} s | {r['load_peak_rss_gib']:.2f} GiB |

Written: {r['out_gb']:.2f} GB (text-encoder layers 27-35 and `model.norm` are not needed and not written).

| component | tensors | params | bytes |
|---|---|---|---|
{rows}

The largest tensor is {r['largest_tensor_gib']:.2f} GiB (the Qwen3 token embedding). The conversion streams: the key
map pairs each parameter with a memory-mapped view of its source tensor, and the Orbax writer reads, casts and
writes one tensor at a time (`klein_jax/loading/checkpoint.py`, `PendingArray`), so the peak is the Python/JAX
runtime plus about one tensor, not a whole component. The load peak is the loaded bf16 model itself
(14.15 GB = 13.2 GiB of jax arrays) plus the runtime: no second copy either. Wall times are disk-bound; the
machine was shared with other jobs while this ran, so they are upper bounds."""


def _markdown_9b(r: dict) -> str:
    rows = _component_rows(r)
    return f"""\
Measured by `benchmarks/convert_memory.py --model-size 9b` ({time.strftime('%Y-%m-%d')}, {platform.machine()},
{_cpu_count()} CPU cores, {_mem_gib():.0f} GiB RAM, no GPU): random weights with the real FLUX.2-klein-9B shapes,
bf16, in the hub layout (transformer one file; Qwen3-8B, untied, with all 36 layers and its lm_head in two shards
with an index; FLUX.2 VAE), source {r['source_gb']:.2f} GB on disk.

| | wall time | peak RSS |
|---|---|---|
| `klein-convert` (child process, `RUSAGE_CHILDREN` ru_maxrss) | {r['convert_s']:.0f} s \
| **{r['convert_peak_rss_gib']:.2f} GiB** |

Written: {r['out_gb']:.2f} GB (text-encoder layers 27-35, `model.norm` and `lm_head` are not needed and not written).

| component | tensors | params | bytes |
|---|---|---|---|
{rows}

The largest tensor is {r['largest_tensor_gib']:.2f} GiB (Qwen3-8B's token embedding, and its lm_head). Loading the
result takes its bf16 arrays in memory, about 30 GB: more than this 24 GiB machine, so not measured here; serving
9B takes a device with that memory or a device mesh (docs/sharding.md)."""


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _mem_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def write_docs(r: dict) -> None:
    """Replaces the benchmark (4B) or benchmark-9b block of docs/convert.md (or appends one)."""
    if r["model_size"] == "4b":
        reporting.write_section(DOCS, "benchmark", _markdown(r), opening="start", heading="## Memory and time")
    else:
        reporting.write_section(DOCS, "benchmark-9b", _markdown_9b(r), opening="start",
                                heading="### klein-9B conversion")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/klein-convert-bench"))
    p.add_argument("--keep", action="store_true", help="keep the generated source and output")
    p.add_argument("--no-docs", action="store_true", help="print the figures only")
    p.add_argument("--model-size", choices=("4b", "9b"), default="4b",
                   help="the checkpoint's sizes (9b: the conversion only; its load does not fit 24 GiB)")
    args = p.parse_args()
    result = run(args.workdir, keep=args.keep, size=args.model_size)
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=2))
    print(result["summary"])
    if not args.no_docs:
        write_docs(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
