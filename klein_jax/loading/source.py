"""Resolving a source: a klein-convert folder, a diffusers pipeline folder or a hub id (downloading what is read).

A `Source` reads a source's model_index.json, component configs, scheduler config and tokenizer, and opens a
component's tensors lazily under diffusers/transformers names (a BFL single-file transformer is renamed first,
klein_jax/loading/keymaps/bfl.py), so every checkpoint enters the model through the same key maps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from klein_jax.configs import TextEncoderConfig, Variant
from klein_jax.loading import hub
from klein_jax.loading.keymap import KeyRule, WeightMappingError
from klein_jax.loading.keymaps.bfl import COMFY_PREFIX, bfl_to_diffusers, is_bfl_layout
from klein_jax.loading.keymaps.text_encoder import text_encoder_rules
from klein_jax.loading.modules import COMPONENTS, KINDS
from klein_jax.loading.safetensors import CheckpointError, SafetensorsFile, ShapesOnly, open_folder
from klein_jax.tokenizer import PromptTokenizer

MANIFEST = "klein_manifest.json"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# model_index.json key for Flux2KleinPipeline.__call__(text_encoder_out_layers=...); absent in published repos.
# diffusers ignores "_" keys silently (tests/tiny_pipeline.py writes it for the 4-layer demo text encoder).
OUT_LAYERS_KEY = "_text_encoder_out_layers"
DEFAULT_OUT_LAYERS = TextEncoderConfig().out_layers


class ConversionError(ValueError):
    """A source that cannot be converted or loaded; the message says what and where."""


# model_index.json `_class_name` of the pipelines klein-jax runs (shared/spec/interfaces.md, "Model variants").
KLEIN_PIPELINE = "Flux2KleinPipeline"
KLEIN_KV_PIPELINE = "Flux2KleinKVPipeline"
SUPPORTED_PIPELINES = (f"{KLEIN_PIPELINE} (FLUX.2 [klein] 4B/9B, distilled or base), "
                       f"{KLEIN_KV_PIPELINE} (FLUX.2 [klein] 9B KV)")


def pipeline_variant(model_index: Mapping[str, Any], path: os.PathLike | str) -> Variant:
    """The variant of a model_index.json (read from `path`): its `_class_name`, then `is_distilled`.

    Any other pipeline class (FLUX.2 [dev]'s Flux2Pipeline, the inpainting pipeline, ...) is a ConversionError: a
    checkpoint must never run as a variant it is not (a KV folder has no `is_distilled` and would run as base).
    """
    name = model_index.get("_class_name")
    if name == KLEIN_PIPELINE:
        return Variant.DISTILLED if model_index.get("is_distilled", False) else Variant.BASE
    if name == KLEIN_KV_PIPELINE:
        return Variant.KV
    got = "has no _class_name" if name is None else f"has _class_name {name!r}"
    raise ConversionError(f"{path} {got}: klein-jax runs only {SUPPORTED_PIPELINES}")


# Every error a bad source can raise; entry points turn these into one line and exit status 1.
SOURCE_ERRORS = (ConversionError, CheckpointError, WeightMappingError)


def _open_transformer_file(path: pathlib.Path):
    tensors = SafetensorsFile(path)
    names = [k.removeprefix(COMFY_PREFIX) for k in tensors]
    if not is_bfl_layout(tensors) and "x_embedder.weight" not in names:
        raise ConversionError(f"{path}: unknown transformer layout: neither BFL names (img_in.weight, "
                              "double_blocks.*) nor diffusers names (x_embedder.weight)")
    return tensors


def _to_diffusers_names(tensors):
    if is_bfl_layout(tensors):
        return bfl_to_diffusers(tensors)
    if any(k.startswith(COMFY_PREFIX) for k in tensors):
        raise ConversionError(f"diffusers-named transformer keys under {COMFY_PREFIX!r} are not supported")
    return tensors



def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


@dataclasses.dataclass
class Source:
    """A resolved source: a klein-convert folder ("converted") or a diffusers pipeline folder ("diffusers")."""

    kind: str
    folder: pathlib.Path
    name: str  # what the user gave: a path or a hub id
    model_index: dict[str, Any]
    transformer_file: pathlib.Path | None = None
    manifest: dict[str, Any] | None = None
    partial_shards: bool = False  # hub snapshots may lack text-encoder shards of unused layers

    @property
    def variant(self) -> Variant:
        return pipeline_variant(self.model_index, self.folder / "model_index.json")

    @property
    def is_distilled(self) -> bool:
        return self.variant.is_distilled

    @property
    def out_layers(self) -> tuple[int, ...]:
        return tuple(self.model_index.get(OUT_LAYERS_KEY, DEFAULT_OUT_LAYERS))

    def config(self, name: str) -> Any:
        """The component's config dataclass."""
        path = self.folder / name / CONFIG_FILE
        data = _read_json(path)
        try:
            if self.kind == "converted" and name == "text_encoder":
                return TextEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
            if name == "text_encoder":
                return TextEncoderConfig.from_dict(data, out_layers=self.out_layers)
            return KINDS[name].config.from_dict(data)
        except (TypeError, ValueError, KeyError) as e:
            raise ConversionError(f"{path}: {e}") from None

    def tensors(self, name: str, *, shapes_only: bool = False) -> Mapping[str, np.ndarray]:
        """The component's tensors under diffusers/transformers names, read lazily (diffusers sources only)."""
        if self.kind != "diffusers":
            raise ConversionError(f"{self.folder} is already converted; it has no PyTorch tensors")
        if name == "transformer" and self.transformer_file is not None:
            raw = _open_transformer_file(self.transformer_file)
        else:
            raw = open_folder(self.folder / name, partial=self.partial_shards)
        if shapes_only:
            raw = ShapesOnly(raw)
        return _to_diffusers_names(raw) if name == "transformer" else raw

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return _read_json(self.folder / "scheduler" / "scheduler_config.json")

    @property
    def tokenizer_folder(self) -> pathlib.Path:
        folder = self.folder / "tokenizer"
        if not folder.is_dir():
            raise ConversionError(f"tokenizer folder not found: {folder}")
        return folder

    def tokenizer(self) -> PromptTokenizer:
        """The prompt tokenizer of the tokenizer/ folder."""
        folder = self.tokenizer_folder
        try:
            return PromptTokenizer.from_folder(folder)
        except (OSError, ValueError) as e:
            raise ConversionError(f"tokenizer {folder}: {e}") from None


def _kept_by(rules: tuple[KeyRule, ...]) -> Callable[[str], bool]:
    """Predicate: is this source key read (matched by a rule with a target) or unknown (so that it is reported)?"""
    def keep(key: str) -> bool:
        matches = [r for r in rules if r._regex.fullmatch(key)]
        return not matches or any(r.target is not None for r in matches)
    return keep


def _download(repo_id: str, *, with_transformer: bool, revision: str | None) -> pathlib.Path:
    folder = hub.download_metadata(repo_id, revision=revision)
    index = _read_json(folder / "model_index.json")
    pipeline_variant(index, f"{repo_id}: model_index.json")  # before any weight is downloaded
    text_config = _read_json(folder / "text_encoder" / CONFIG_FILE)
    try:
        out_layers = tuple(index.get(OUT_LAYERS_KEY, DEFAULT_OUT_LAYERS))
        rules = text_encoder_rules(TextEncoderConfig.from_dict(text_config, out_layers=out_layers))
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{repo_id}: text_encoder/config.json: {e}") from None
    components = tuple(c for c in COMPONENTS if with_transformer or c != "transformer")
    patterns = hub.weight_patterns(folder, components, keep={"text_encoder": _kept_by(rules)})
    return hub.download_weights(repo_id, patterns, revision=revision)


def open_source(source: str | os.PathLike, *, transformer_file: str | os.PathLike | None = None,
                revision: str | None = None) -> Source:
    """Resolves a klein-convert folder, a diffusers pipeline folder or a hub id (downloading what is needed)."""
    transformer_file = pathlib.Path(transformer_file) if transformer_file is not None else None
    if transformer_file is not None and not transformer_file.is_file():
        raise ConversionError(f"transformer file not found: {transformer_file}")
    partial = False
    if hub.is_hub_id(source):
        folder = _download(os.fspath(source), with_transformer=transformer_file is None, revision=revision)
        partial = True
    else:
        folder = pathlib.Path(source)
        if not folder.exists():
            raise ConversionError(f"source not found: {folder} (neither a folder nor a hub id like owner/name)")
        if not folder.is_dir():
            raise ConversionError(f"unknown source layout: {folder} is a file; give a pipeline folder or hub id "
                                  "(a BFL single-file transformer goes with --transformer)")
    if (folder / MANIFEST).is_file():
        if transformer_file is not None:
            raise ConversionError(f"{folder} is already converted; --transformer needs a diffusers folder or hub id")
        manifest = _read_json(folder / MANIFEST)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ConversionError(f"{folder / MANIFEST}: format_version {manifest.get('format_version')!r}, "
                                  f"this klein-jax reads {FORMAT_VERSION}")
        src = Source("converted", folder, os.fspath(source), _read_json(folder / "model_index.json"),
                     manifest=manifest)
    elif (folder / "model_index.json").is_file():
        src = Source("diffusers", folder, os.fspath(source), _read_json(folder / "model_index.json"),
                     transformer_file=transformer_file, partial_shards=partial)
    else:
        raise ConversionError(f"unknown source layout: {folder} has neither {MANIFEST} (klein-convert output) "
                              "nor model_index.json (diffusers pipeline)")
    pipeline_variant(src.model_index, folder / "model_index.json")  # other pipeline classes stop here
    return src
