"""Subprocess side of tests/test_sharding.py: runs with several (fake CPU) devices, which must be set before JAX starts.

  python tests/sharding_worker.py FOLDER OUT RUN...     for each RUN, FORMAT:MESH[:EXTRA[+EXTRA]] (FORMAT "klein"
                                                        or "diffusers", MESH "" for one device, EXTRA "full" or
                                                        "lora"): load FOLDER/FORMAT sharded over MESH, generate,
                                                        write OUT/<run>-p<process>.npz
  python tests/sharding_worker.py FOLDER OUT RUN --distributed ADDRESS NUM_PROCESSES PROCESS_ID
                                                        the same as one process of a jax.distributed job

Every run generates PROMPTS text-to-image without guidance; a `full` run also with classifier-free guidance and a
reference image (the text encoder at batch 1, the reference encoder); a `lora` run also with the LoRA adapter
FOLDER/LORA_FILE (lora_images); a distributed run also as klein-serve does
(distributed.Leader on process 0, distributed.follow on the others). Each npz holds the images and, per parameter,
the partition spec and the shape of every local shard, plus the bytes each local device holds per component.
`build_test_model` writes the shardable tiny model the tests use.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import numpy as np

from klein_jax.configs import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE

# Tiny, but with 8 attention heads (and 8 key/value heads) and MLP widths that 8 divides, so that model axes of
# 1, 2, 4 and 8 all split whole heads; one block of each kind and a VAE without mid-block attention or extra resnets,
# so that a sharded program compiles in a few seconds.
SHARDABLE_TRANSFORMER = dataclasses.replace(TINY_TRANSFORMER, num_attention_heads=8, attention_head_dim=8,
                                            axes_dims_rope=(2, 2, 2, 2), num_single_layers=1)
SHARDABLE_VAE = dataclasses.replace(TINY_VAE, layers_per_block=0, mid_block_add_attention=False, block_out_channels=(16, 16))
SHARDABLE_TEXT_ENCODER = dataclasses.replace(TINY_TEXT_ENCODER, num_attention_heads=8, num_key_value_heads=8,
                                             head_dim=4)
PROMPTS = ["a red cube on a table", "two cats"]
LORA_FILE = "lora.safetensors"  # written by tests/test_sharding.py (kohya layout, tests/lora_support.py)
SEEDS = [3, 11]
SIZE = 32  # pixels: 8x8 tokens with the tiny VAE
STEPS = 2


def buckets():
    from klein_jax.buckets import ReferenceBuckets

    return ReferenceBuckets(grid_areas=(256,), token_buckets=(256,))  # one 64x64 reference: 16x16 tokens


def reference_image():
    import PIL.Image

    rng = np.random.default_rng(5)
    return PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def build_test_model(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The shardable tiny base model (classifier-free guidance) as a diffusers folder and its float32 klein-convert
    output; returns (diffusers, klein)."""
    from convert.cli import main as convert_main
    from convert.export import export_diffusers_folder
    from klein_jax.demo_tokenizer import demo_prompt_tokenizer
    from klein_jax.loading import random_module
    from klein_jax.pipeline import KleinPipeline

    rng = np.random.default_rng(0)
    modules = [random_module(name, config, rng) for name, config in (
        ("transformer", SHARDABLE_TRANSFORMER), ("vae", SHARDABLE_VAE), ("text_encoder", SHARDABLE_TEXT_ENCODER))]
    pipe = KleinPipeline(*modules, demo_prompt_tokenizer(SHARDABLE_TEXT_ENCODER.vocab_size), is_distilled=False)
    diffusers = export_diffusers_folder(pipe, folder / "diffusers")
    klein = folder / "klein"
    if convert_main([str(diffusers), str(klein), "--dtype", "float32", "--no-progress"]) != 0:
        raise RuntimeError("klein-convert failed on the test model")
    return diffusers, klein


def placement(pipe) -> dict:
    """component -> {"specs": {path: spec}, "shards": {path: [local shard shapes]}, "bytes": {device id: bytes}}."""
    from flax import nnx

    from klein_jax.sharding import bytes_per_device

    out = {}
    for name in ("transformer", "vae", "text_encoder"):
        state = nnx.state(getattr(pipe, name))
        flat = [(".".join(map(str, path)), v.get_value()) for path, v in nnx.to_flat_state(state)]
        out[name] = {
            "specs": {path: [None if a is None else str(a) for a in tuple(x.sharding.spec)] for path, x in flat},
            "shards": {path: [list(s.data.shape) for s in x.addressable_shards] for path, x in flat},
            "bytes": {str(d.id): n for d, n in bytes_per_device([x for _, x in flat]).items()},
        }
    return out


def run_name(run: str) -> str:
    """"klein:data=2,model=4:full+lora" -> "klein-data2_model4-full+lora" (a file name)."""
    return run.replace(":", "-").replace(",", "_").replace("=", "") or "single"


def generate(folder: pathlib.Path, run: str) -> dict:
    """images (and full_images for a full run, served_images (uint8) on process 0 of a distributed job) and the
    placement of every parameter."""
    import jax

    from klein_jax.pipeline import KleinPipeline

    form, mesh, *extras = run.split(":")
    extras = set(extras[0].split("+")) if extras else set()
    pipe = KleinPipeline.from_pretrained(folder / form, "float32", mesh=mesh or None, reference_buckets=buckets())
    options = dict(width=SIZE, height=SIZE, num_inference_steps=STEPS, seed=SEEDS, output_type="np")
    out = {"images": pipe(PROMPTS, guidance_scale=1.0, **options), "placement": json.dumps(placement(pipe)),
           "batch_size": pipe.last_timings["batch_size"]}
    if "full" in extras:
        out["full_images"] = pipe(PROMPTS, [reference_image()], **options)
    if "lora" in extras:
        pipe.load_lora_weights(folder / LORA_FILE, "style")
        pipe.set_adapters("style")
        out["lora_images"] = pipe(PROMPTS, guidance_scale=1.0, **options)
    if jax.process_count() > 1:
        out.update(serve(pipe))
    return out


def serve(pipe) -> dict:
    """klein-serve's multi-host path: process 0 runs a batch through a Leader, the others follow it."""
    from klein_jax import distributed

    if not distributed.is_leader():
        distributed.follow({"model": pipe})
        return {}
    leader = distributed.Leader("model", pipe)
    prepared = [leader.prepare(prompt, width=SIZE, height=SIZE, seed=seed, num_inference_steps=STEPS,
                               guidance_scale=1.0) for prompt, seed in zip(PROMPTS, SEEDS)]
    images = leader.run_batch(prepared)
    distributed.stop_followers()
    return {"served_images": np.stack([np.asarray(image) for image in images])}


def main(argv: list[str]) -> int:
    folder, out, *runs = argv
    import jax

    if "--distributed" in runs:
        at = runs.index("--distributed")
        address, count, index = runs[at + 1:at + 4]
        runs = runs[:at]
        jax.distributed.initialize(address, num_processes=int(count), process_id=int(index))
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    for run in runs:
        result = generate(pathlib.Path(folder), run)
        np.savez(pathlib.Path(out) / f"{run_name(run)}-p{jax.process_index()}.npz", devices=jax.device_count(),
                 **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
