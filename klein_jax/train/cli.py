"""klein-train-lora: LoRA fine-tuning of a FLUX.2 [klein] transformer on a folder of captioned images."""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

PROG = "klein-train-lora"


def build_parser() -> argparse.ArgumentParser:
    """The klein-train-lora argument parser."""
    p = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Train a LoRA adapter with flow matching (optax AdamW). DIR holds images "
                                            "with a same-named .txt caption each (cat.png + cat.txt).")
    p.add_argument("--model", required=True, metavar="SRC", help="klein-convert folder, diffusers folder or hub id")
    p.add_argument("--data", required=True, type=pathlib.Path, metavar="DIR", help="images + .txt captions")
    p.add_argument("--references", type=pathlib.Path, metavar="DIR",
                   help="edit pairs: DIR holds each training image's reference (input) image under the same name "
                        "stem; the model learns to edit it into the training image")
    p.add_argument("--out", required=True, type=pathlib.Path, metavar="DIR",
                   help="gets pytorch_lora_weights.safetensors, checkpoints/ and metrics.jsonl")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, scaling 1)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before the cosine decay")
    p.add_argument("--batch-size", type=int, default=1, help="images per step (one aspect bucket per batch)")
    p.add_argument("--resolution", type=int, default=1024, help="training side length: buckets of ~N*N pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, noise, timesteps and init")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between Orbax checkpoints")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the frozen model (the LoRA factors are float32)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of klein-train-lora; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from tqdm import tqdm

    from klein_jax.loading import SOURCE_ERRORS
    from klein_jax.pipeline import KleinPipeline
    from klein_jax.train.data import scan_dataset
    from klein_jax.train.step import TrainConfig
    from klein_jax.train.trainer import LoraTrainer

    try:
        config = TrainConfig(rank=args.rank, lora_alpha=args.lora_alpha, learning_rate=args.learning_rate,
                             warmup_steps=args.warmup_steps, steps=args.steps, batch_size=args.batch_size,
                             resolution=args.resolution, seed=args.seed, checkpoint_every=args.checkpoint_every)
        scan_dataset(args.data, config.resolution, 16, args.references)  # bad files named before the model loads
        pipe = KleinPipeline.from_pretrained(args.model, args.dtype)
        trainer = LoraTrainer(pipe, args.data, args.out, config, args.references)
        bar = tqdm(total=config.steps, desc="train", unit="step", file=sys.stderr, disable=args.no_progress)

        def on_step(metrics) -> None:
            bar.n = metrics.step
            bar.set_postfix(loss=f"{metrics.loss:.4f}", refresh=True)

        path = trainer.run(resume=args.resume, on_step=on_step)
        bar.close()
    except (*SOURCE_ERRORS, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
