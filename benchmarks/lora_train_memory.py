"""Peak device memory of one klein-train-lora step at klein-4B scale, from abstract shapes (nothing is allocated).

    python benchmarks/lora_train_memory.py --config klein-4b --resolution 1024 --rank 16 --write docs/lora.md

The transformer (bfloat16), the float32 factors, the AdamW state and a batch of one image are shapes only
(nnx.eval_shape / jax.eval_shape). For the training loss (klein_jax/train/step.py) with and without per-block
rematerialisation it counts what the backward pass keeps from the forward pass: the residuals of jax.vjp, shapes
only, backend-independent. Residuals that are the frozen weights are the argument buffers (no extra memory); the
rest are saved activations, of which the XLA attention's (S, S) logits and probabilities are the part a flash
attention (cuDNN, the GPU default) does not keep. Estimated peak = weights + factors, gradients and AdamW moments +
saved activations + one block's activations (the no-remat activations / blocks, recomputed in turn).
--compile also compiles the step for this machine's backend and prints XLA's buffer assignment
(`compiled.memory_analysis()`: arguments + outputs - donated + temporaries); slow (minutes per program on CPU).
Prints one JSON line per program and, with --write, replaces the table between the markers in that Markdown file.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from klein_jax.configs import KLEIN_4B, TINY_TRANSFORMER
from klein_jax.lora import LoraLayout, linear_targets
from klein_jax.models.transformer import Flux2Transformer
from klein_jax.train.step import (DEFAULT_TARGETS, TrainConfig, flow_matching_loss, init_lora, optimizer,
                                  select_targets, train_step)

import reporting

CONFIGS = {"tiny": TINY_TRANSFORMER, "klein-4b": KLEIN_4B}
GIB = 2**30


def _batch(config, tokens: int, text_len: int, edit_pairs: bool) -> dict:
    """One image's step inputs, as LoraTrainer.batch gives them (cached latents and text features in float32)."""
    f32, i32 = jnp.float32, jnp.int32
    batch = {"latents": jax.ShapeDtypeStruct((1, tokens, config.in_channels), f32),
             "text_embeds": jax.ShapeDtypeStruct((1, text_len, config.joint_attention_dim), f32),
             "img_ids": jax.ShapeDtypeStruct((tokens, 4), i32), "txt_ids": jax.ShapeDtypeStruct((text_len, 4), i32)}
    if edit_pairs:
        batch |= {"ref_latents": batch["latents"], "ref_ids": batch["img_ids"]}
    return batch


def _gib(leaves) -> float:
    return sum(x.size * x.dtype.itemsize for x in leaves) / GIB


def measure(config_name: str, resolution: int, rank: int, text_len: int, edit_pairs: bool, remat: bool,
            compile_step: bool) -> dict:
    config = CONFIGS[config_name]
    transformer = nnx.eval_shape(lambda: Flux2Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                          rngs=nnx.Rngs(0)))
    graphdef, base_state = nnx.split(transformer)
    layout = LoraLayout(select_targets(linear_targets(transformer), DEFAULT_TARGETS), rank)
    lora = jax.eval_shape(lambda: init_lora(layout.targets, rank, jax.random.key(0)))
    tx = optimizer(TrainConfig(rank=rank))
    opt_state = jax.eval_shape(tx.init, lora)
    tokens = (resolution // 16) ** 2  # 16 pixels a token: the VAE's 8x and the 2x2 patches
    batch = _batch(config, tokens, text_len, edit_pairs)
    kwargs = dict(graphdef=graphdef, layout=layout, scaling=1.0, remat=remat)

    def pullback(lora, base_state, batch):
        loss = functools.partial(flow_matching_loss, base_state=base_state, batch=batch, key=jax.random.key(0),
                                 **kwargs)
        return jax.vjp(loss, lora)[1]

    residuals = jax.tree.leaves(jax.eval_shape(pullback, lora, base_state, batch))
    weights, adapter = _gib(jax.tree.leaves(base_state)), _gib(jax.tree.leaves((lora, lora, opt_state)))
    unmatched = collections.Counter((w.shape, w.dtype) for w in jax.tree.leaves(base_state))
    saved = []  # residuals that are not frozen weights (those are the argument buffers: no extra memory)
    for r in residuals:
        if unmatched[(r.shape, r.dtype)]:
            unmatched[(r.shape, r.dtype)] -= 1
        else:
            saved.append(r)
    sequence = tokens * (2 if edit_pairs else 1) + text_len
    activations = _gib(saved)
    logits = _gib([r for r in saved if r.ndim >= 2 and r.shape[-2:] == (sequence, sequence)])
    row = {"config": config_name, "resolution": resolution, "image_tokens": sequence - text_len,
           "text_tokens": text_len, "rank": rank, "layers": len(layout.targets), "remat": remat,
           "weights_gib": round(weights, 2), "adapter_state_gib": round(adapter, 3),
           "saved_activations_gib": round(activations, 3), "of_which_attention_logits_gib": round(logits, 3)}
    if compile_step:
        step = jax.jit(functools.partial(train_step, tx=tx, **kwargs), donate_argnums=(0, 1))
        start = time.perf_counter()
        m = step.lower(lora, opt_state, base_state, batch, jax.random.key(0)).compile().memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        row |= {"backend": jax.devices()[0].device_kind, "xla_temporaries_gib": round(m.temp_size_in_bytes / GIB, 2),
                "xla_peak_gib": round(peak / GIB, 2), "compile_s": round(time.perf_counter() - start, 1)}
    return row


def estimate(rows: list[dict], blocks: int) -> dict:
    """Estimated peaks (GiB) with remat: per block activations from the no-remat row, with XLA's attention and
    without its logits (a flash attention)."""
    on, off = (next(r for r in rows if r["remat"] is flag) for flag in (True, False))
    base = on["weights_gib"] + on["adapter_state_gib"] + on["saved_activations_gib"]
    block = off["saved_activations_gib"] / blocks
    flash = (off["saved_activations_gib"] - off["of_which_attention_logits_gib"]) / blocks
    frozen = on["weights_gib"] + on["adapter_state_gib"]
    return {"remat_xla_attention": round(base + block, 1), "remat_flash_attention": round(base + flash, 1),
            "no_remat_xla_attention": round(frozen + off["saved_activations_gib"], 1),
            "no_remat_flash_attention": round(frozen + off["saved_activations_gib"]
                                              - off["of_which_attention_logits_gib"], 1)}


def table(results: list[dict], peaks: dict, command: str) -> str:
    rows = [["per block" if r["remat"] else "none", *(f"{r[k]}" for k in (
        "weights_gib", "adapter_state_gib", "saved_activations_gib", "of_which_attention_logits_gib"))]
        for r in results]
    first = results[0]
    return (f"`{command}` ({first['config']}, {first['resolution']}x{first['resolution']}: {first['image_tokens']} "
            f"image + {first['text_tokens']} text tokens, rank {first['rank']} on {first['layers']} layers, batch 1; "
            f"GiB):\n\n" + reporting.table(("remat", "weights", "factors + grads + AdamW", "saved activations",
                                             "of which XLA attention logits"), rows)
            + "\n\nEstimated peak (GiB): "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in peaks.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="klein-4b")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--edit-pairs", action="store_true", help="a reference image's tokens too (img2img training)")
    p.add_argument("--compile", action="store_true", help="also XLA's buffer assignment on this backend (slow)")
    p.add_argument("--write", type=pathlib.Path, help="Markdown file whose lora_train_memory table to replace")
    args = p.parse_args(argv)
    results = []
    for remat in (True, False):
        results.append(measure(args.config, args.resolution, args.rank, args.text_len, args.edit_pairs, remat,
                               args.compile))
        print(json.dumps(results[-1]), flush=True)
    config = CONFIGS[args.config]
    peaks = estimate(results, config.num_layers + config.num_single_layers)
    print(json.dumps({"estimated_peak_gib": peaks}), flush=True)
    if args.write:
        command = reporting.command_line(__file__, argv)
        reporting.write_section(args.write, "lora_train_memory", table(results, peaks, command),
                                opening="start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
