"""klein-convert: a diffusers pipeline folder or hub id (optionally with a BFL single-file transformer) -> a folder
of Orbax checkpoints that KleinPipeline.from_pretrained / load_components load without PyTorch.

Output layout (OUT):
  klein_manifest.json              format version, source, dtype, per-component tensor/param/byte counts
  model_index.json                 the source's (its _class_name says the variant), plus the text encoder's out_layers
  scheduler/scheduler_config.json  copied
  tokenizer/*                      copied
  {transformer,vae,text_encoder}/config.json   klein_jax config dataclass as json
  {transformer,vae,text_encoder}/params/       Orbax checkpoint of the component's nnx state
Everything is written to a temporary sibling folder that is renamed to OUT at the end, so a failure leaves
OUT as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Any

log = logging.getLogger("klein-convert")


@dataclasses.dataclass
class ComponentReport:
    """What was written for one component."""

    name: str
    tensors: int
    params: int
    nbytes: int
    disk_bytes: int
    seconds: float


def _disk_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check_out(out: pathlib.Path) -> None:
    from klein_jax.loading import ConversionError

    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConversionError(f"output {out} already exists and is not an empty folder")


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=list) + "\n", encoding="utf-8")


def _copy_folder(src: pathlib.Path, dst: pathlib.Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copyfile(f, dst / f.name)


def _convert_into(tmp: pathlib.Path, source, configs: dict[str, Any], dtype: Any, *,
                  progress: bool) -> list[ComponentReport]:
    """Writes each component's config and parameters under `tmp`. The key map only pairs each parameter with a
    memory-mapped view of its source tensor (PendingArray); save_params reads, casts and writes one tensor at a time,
    so the memory peak is about the largest tensor, not the largest component."""
    from tqdm import tqdm

    from klein_jax.loading import CONFIG_FILE, PARAMS_DIR, abstract_module, checkpoint, expected_params
    from klein_jax.loading.keymap import map_weights
    from klein_jax.loading.modules import KINDS

    reports = []
    for name, config in configs.items():
        start = time.perf_counter()
        expected = expected_params(abstract_module(name, config, dtype))
        with tqdm(total=len(expected), desc=f"{name:<12}", unit="tensor", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:
            params = map_weights(source.tensors(name), KINDS[name].rules(config), expected,
                                 place=lambda _path, array, dt: checkpoint.PendingArray(array, dt, on_read=bar.update))
            _write_json(tmp / name / CONFIG_FILE, config.to_dict())
            checkpoint.save_params(tmp / name / PARAMS_DIR, params)
        reports.append(ComponentReport(
            name=name, tensors=len(params), params=sum(a.size for a in params.values()),
            nbytes=sum(a.nbytes for a in params.values()), disk_bytes=_disk_bytes(tmp / name),
            seconds=time.perf_counter() - start))
        del params
    return reports


def convert(source: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
            transformer_file: str | os.PathLike | None = None, revision: str | None = None,
            progress: bool = True) -> list[ComponentReport]:
    """Converts `source` into the folder `out` (which must not exist or be empty); returns what was written.

    Raises one of klein_jax.loading.SOURCE_ERRORS on bad input, leaving `out` untouched.
    """
    from klein_jax.loading import (
        COMPONENTS,
        FORMAT_VERSION,
        MANIFEST,
        OUT_LAYERS_KEY,
        ConversionError,
        check_component,
        dtype_name,
        open_source,
    )
    from klein_jax.scheduler import check_scheduler_config

    out = pathlib.Path(out)
    dtype = dtype_name(dtype)
    _check_out(out)
    src = open_source(source, transformer_file=transformer_file, revision=revision)
    if src.kind != "diffusers":
        raise ConversionError(f"{src.folder} is already a klein-convert folder; nothing to convert")
    # Read every config and dry-run every key map (shapes only) before the first byte is converted.
    configs = {name: src.config(name) for name in COMPONENTS}
    for name in COMPONENTS:
        check_component(src, name, configs[name], dtype)
    scheduler_config, tokenizer_folder = src.scheduler_config, src.tokenizer_folder
    try:
        check_scheduler_config(scheduler_config)
    except ValueError as e:
        raise ConversionError(f"{src.folder / 'scheduler' / 'scheduler_config.json'}: {e}") from None
    src.tokenizer()  # it must load, not only exist

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_json(tmp / "model_index.json", {**src.model_index, OUT_LAYERS_KEY: list(src.out_layers)})
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config)
        _copy_folder(tokenizer_folder, tmp / "tokenizer")
        reports = _convert_into(tmp, src, configs, dtype, progress=progress)
        _write_json(tmp / MANIFEST, {
            "format": "klein-jax",
            "format_version": FORMAT_VERSION,
            "source": src.name,
            "transformer_file": os.fspath(transformer_file) if transformer_file is not None else None,
            "dtype": dtype,
            "variant": src.variant.value,
            "is_distilled": src.is_distilled,
            "components": {r.name: {"tensors": r.tensors, "params": r.params, "bytes": r.nbytes} for r in reports},
        })
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return reports


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError


def summary(out: pathlib.Path, reports: list[ComponentReport], dtype: str, seconds: float) -> str:
    """The lines printed after a conversion: per component tensors, params, bytes."""
    lines = [f"wrote {out} ({dtype}) in {seconds:.1f} s"]
    for r in reports:
        lines.append(f"  {r.name:<13}{r.tensors:>6} tensors {r.params:>16,} params {_human(r.disk_bytes):>10} "
                     f"on disk  ({r.seconds:.1f} s)")
    total = sum(r.disk_bytes for r in reports)
    lines.append(f"  {'total':<13}{sum(r.tensors for r in reports):>6} tensors "
                 f"{sum(r.params for r in reports):>16,} params {_human(_disk_bytes(out)):>10} on disk "
                 f"({_human(total)} of parameters)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The klein-convert argument parser."""
    p = argparse.ArgumentParser(
        prog="klein-convert",
        description="Convert a FLUX.2 [klein] checkpoint (diffusers pipeline folder or Hugging Face hub id, "
                    "optionally with a Black Forest Labs single-file transformer) to Orbax checkpoints that "
                    "KleinPipeline.from_pretrained loads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", help="diffusers pipeline folder (model_index.json, transformer/, vae/, text_encoder/, "
                               "tokenizer/, scheduler/) or hub id such as black-forest-labs/FLUX.2-klein-4B")
    p.add_argument("out", type=pathlib.Path, help="output folder (must not exist, or be empty)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="parameter dtype of the written checkpoints")
    p.add_argument("--transformer", type=pathlib.Path, default=None, metavar="FILE",
                   help="BFL single-file transformer (.safetensors, e.g. flux-2-klein-4b.safetensors) that "
                        "replaces SRC's transformer weights; SRC still supplies the configs")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) when SRC is a hub id")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `klein-convert` / `python -m convert`; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax"):  # orbax logs every save step at INFO through absl
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from klein_jax.loading import SOURCE_ERRORS

    start = time.perf_counter()
    try:
        reports = convert(args.src, args.out, dtype=args.dtype, transformer_file=args.transformer,
                          revision=args.revision, progress=not args.no_progress)
    except SOURCE_ERRORS as e:
        print(f"klein-convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: still one readable line
        print(f"klein-convert: error: {e.strerror or e} ({e.filename})" if e.filename else
              f"klein-convert: error: {e}", file=sys.stderr)
        return 1
    print(summary(args.out, reports, args.dtype, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
