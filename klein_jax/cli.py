"""klein-generate: one FLUX.2 [klein] image to a PNG file; prints the seed and the time of each stage."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time

PROG = "klein-generate"
CACHE_ENV = "KLEIN_COMPILATION_CACHE"
DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "klein-jax" / "xla"
STAGES = (  # timings key -> printed name
    ("compile_ms", "compile"),
    ("text_encode_ms", "text encode"),
    ("reference_encode_ms", "reference encode"),
    ("denoise_ms", "denoise"),
    ("decode_ms", "decode"),
)


def build_parser() -> argparse.ArgumentParser:
    """The klein-generate argument parser."""
    from klein_jax.request import ASPECT_RATIOS, MAX_REFERENCES, MAX_SEED, MAX_STEPS, MIN_STEPS
    from klein_jax.quantization import QUANTIZATIONS
    from klein_jax.models.attention import BACKENDS

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generate one image with FLUX.2 [klein]: text-to-image, or image-to-image / multi-reference "
                    "with --image.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="SRC",
                        help="klein-convert output folder, diffusers pipeline folder or hub id "
                             "(e.g. black-forest-labs/FLUX.2-klein-4B)")
    source.add_argument("--demo", action="store_true", help="the tiny random demo model instead (a noise image)")
    p.add_argument("--prompt", required=True, help="what to generate")
    p.add_argument("--image", action="append", default=[], type=pathlib.Path, metavar="FILE",
                   help=f"reference image; repeat for up to {MAX_REFERENCES} (1: image-to-image, "
                        f"2-{MAX_REFERENCES}: multi-reference)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--aspect-ratio", choices=list(ASPECT_RATIOS), default=None,
                      help="API aspect ratio (default: 1024x1024 unless --width/--height are given)")
    size.add_argument("--width", type=int, default=None, help="width in pixels, a multiple of 16 (with --height)")
    p.add_argument("--height", type=int, default=None, help="height in pixels, a multiple of 16 (with --width)")
    p.add_argument("--seed", type=int, default=None, help=f"random seed in 0..{MAX_SEED} (default: random, printed)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps in {MIN_STEPS}..{MAX_STEPS} (default: 4 distilled, 50 base)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale of base models (default 4.0)")
    p.add_argument("--lora", metavar="PATH[:SCALE]", default=None,
                   help="a LoRA adapter (.safetensors file, folder or hub id; docs/lora.md) at SCALE (default 1.0)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("klein.png"), help="output PNG file")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help="fp8: the transformer's block kernels stored as float8 e4m3 with a scale per output channel "
                        "(half their memory)")
    p.add_argument("--attention", choices=BACKENDS, default=None,
                   help="the transformer's attention backend (default: fused on CPU in float32, chunked on CPU in "
                        "bfloat16, cudnn on GPU in bfloat16, else xla; pallas: the TPU splash kernel; docs/benchmarks.md)")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help=f"persistent XLA compilation cache folder; 'none' to disable "
                        f"(default: ${CACHE_ENV} or {DEFAULT_CACHE})")
    p.add_argument("--mesh", type=mesh_flag, default=None, metavar="data=D,model=M",
                   help="shard over D*M devices: D splits the batch, M the weights (docs/sharding.md); "
                        "default one device")
    p.add_argument("--distributed", action="store_true",
                   help="one process of a multi-host job (jax.distributed; docs/deployment.md): run the same "
                        "command on every host; process 0 writes --out")
    p.add_argument("--no-progress", action="store_true",
                   help="no step progress bar: run the fused denoise+decode program (reports them together)")
    return p


def mesh_flag(value: str) -> str:
    """The argparse type of --mesh (klein-generate and klein-serve): the text, once parse_mesh accepts it."""
    from klein_jax.sharding import parse_mesh

    try:
        parse_mesh(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _size(args, parser) -> tuple[int, int]:
    from klein_jax.request import resolve_aspect_ratio

    if args.aspect_ratio is not None:
        if args.height is not None:
            parser.error("--height goes with --width, not with --aspect-ratio")
        return resolve_aspect_ratio(args.aspect_ratio)
    if (args.width is None) != (args.height is None):
        parser.error("give both --width and --height")
    return (args.width, args.height) if args.width is not None else (1024, 1024)


def _open_images(paths: list[pathlib.Path]) -> list:
    from PIL import Image, ImageOps

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(ImageOps.exif_transpose(image))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
    return images


def _cache_dir(arg: str | None) -> str | None:
    value = arg if arg is not None else os.environ.get(CACHE_ENV, str(DEFAULT_CACHE))
    return None if value.lower() in ("", "none") else value


def _progress():
    """on_step callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = None

    def on_step(step: int, steps: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=steps, desc="denoise", unit="step", file=sys.stderr)
        bar.update(1)
        if step == steps:
            bar.close()

    return on_step


def main(argv: list[str] | None = None) -> int:
    """Entry point of `klein-generate` / `python -m klein_jax`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    width, height = _size(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cache = _cache_dir(args.compilation_cache)
    from klein_jax import distributed
    from klein_jax.loading import SOURCE_ERRORS
    from klein_jax.pipeline import KleinPipeline

    try:
        references = _open_images(args.image)  # bad input fails before minutes of loading
        if args.distributed:
            distributed.initialize(os.environ)
        if cache is not None:
            from klein_jax.compilation_cache import enable_compilation_cache

            enable_compilation_cache(cache)
        start = time.perf_counter()
        if args.demo:
            from klein_jax.demo import build_demo_pipeline

            pipe = build_demo_pipeline(mesh=args.mesh, quantization=args.quantization, attention=args.attention)
        else:
            pipe = KleinPipeline.from_pretrained(args.model, args.dtype, mesh=args.mesh, quantization=args.quantization,
                                                 attention=args.attention)
        if args.lora:
            from klein_jax.lora.files import parse_lora_spec

            _, path, scale = parse_lora_spec(args.lora)
            pipe.load_lora_weights(path, adapter_name="lora")
            pipe.set_adapters(["lora"], [1.0 if scale is None else scale])
        load_s = time.perf_counter() - start
        options = dict(width=width, height=height, num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
        request = pipe.prepare(args.prompt, references, seed=args.seed, **options)  # validates before any compile
        seed = distributed.broadcast(request.seed)  # every process of a job draws process 0's noise
        if distributed.is_leader():
            print(f"seed: {seed}", flush=True)
        images = pipe(args.prompt, references or None, seed=seed, output_type="np",
                      on_step=None if args.no_progress else _progress(), **options)
        if not distributed.is_leader():
            return 0
        timings = dict(pipe.last_timings)
        start = time.perf_counter()
        from klein_jax.images import numpy_to_pil

        args.out.parent.mkdir(parents=True, exist_ok=True)
        numpy_to_pil(images)[0].save(args.out, format="PNG")
        png_ms = 1000 * (time.perf_counter() - start)
    except (*SOURCE_ERRORS, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"load: {load_s:.2f} s")
    for key, name in STAGES:
        if key in timings:
            print(f"{name}: {timings[key] / 1000:.2f} s")
    if args.no_progress:
        print(f"denoise + decode: {timings['denoise_decode_ms'] / 1000:.2f} s")
    print(f"png: {png_ms / 1000:.2f} s")
    print(f"wrote {args.out} ({width}x{height}, {request.workflow}, {request.num_steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
