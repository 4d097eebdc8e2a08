"""Loading the klein components (transformer, VAE, text encoder, tokenizer, configs) from any source.

A source is a klein-convert output folder (Orbax checkpoints, restored straight into the abstract
modules), a diffusers pipeline folder, or a hub id (both converted in memory, tensor by tensor). A BFL
single-file transformer may replace a diffusers source's transformer; it is renamed to diffusers names
first (convert/keymap/bfl.py), so every checkpoint enters the model through the same key maps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import checkpoint, hub
from convert.keymap.bfl import COMFY_PREFIX, BFLTransformer, bfl_to_diffusers, is_bfl_layout
from convert.keymap.text_encoder import text_encoder_rules
from convert.keymap.transformer import transformer_rules
from convert.keymap.vae import vae_rules
from convert.mapping import KeyRule, Path, WeightMappingError, expected_params, map_weights
from convert.sources import CheckpointError, SafetensorsFile, ShardedCheckpoint
from klein_jax.configs import TextEncoderConfig, TransformerConfig, VAEConfig
from klein_jax.models.text_encoder import Qwen3TextEncoder
from klein_jax.models.transformer import Flux2Transformer
from klein_jax.models.vae import Flux2VAE
from klein_jax.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "vae", "text_encoder")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
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


# Every error a bad source can raise; entry points turn these into one line and exit status 1.
SOURCE_ERRORS = (ConversionError, CheckpointError, WeightMappingError)


@dataclasses.dataclass(frozen=True)
class _Kind:
    model: type
    config: type
    rules: Callable[[Any], tuple[KeyRule, ...]]


_KINDS = {
    "transformer": _Kind(Flux2Transformer, TransformerConfig, transformer_rules),
    "vae": _Kind(Flux2VAE, VAEConfig, vae_rules),
    "text_encoder": _Kind(Qwen3TextEncoder, TextEncoderConfig, text_encoder_rules),
}


def parse_dtype(dtype: Any) -> Any:
    """"bfloat16" | "float32" (or the jnp dtype itself) -> the jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: Any) -> str:
    """jnp dtype or name -> "bfloat16" | "float32"."""
    return jnp.dtype(parse_dtype(dtype)).name


def abstract_module(name: str, config: Any, dtype: Any):
    """The component's module with abstract (shape-only) parameters of `dtype`: nothing is initialised."""
    model, dtype = _KINDS[name].model, parse_dtype(dtype)
    return nnx.eval_shape(lambda: model(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))


def fill_module(abstract, params: dict[Path, Any]):
    """Sets every variable of an abstract module from `params`, popping each entry so host copies are freed early."""
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    for path, variable in flat:
        variable.set_value(jnp.asarray(params.pop(tuple(path))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------------------------- tensor sources


def _copying(transform: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], Any]:
    """`transform`, then a C-contiguous copy of each result: the memory map is released at once and the saved
    array needs no further copy (a transposed view would be copied again while writing)."""
    def copy(w: np.ndarray):
        out = transform(w)
        if isinstance(out, tuple):
            return tuple(np.array(x, order="C") for x in out)
        return np.array(out, order="C")
    return copy


class _ShapesOnly(Mapping[str, np.ndarray]):
    """Zero-stride placeholder arrays with each tensor's shape: a dry run of the key maps reads no data."""

    def __init__(self, tensors):
        self._tensors = tensors

    def __getitem__(self, key: str) -> np.ndarray:
        return np.broadcast_to(np.zeros((), np.bool_), self._tensors.shape(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class _ShardSubset(Mapping[str, np.ndarray]):
    """A sharded folder whose index lists shards that may be absent (hub downloads skip shards of unused layers).

    Present shards are opened (and checked) at once; reading a tensor of an absent shard raises CheckpointError.
    """

    def __init__(self, folder: pathlib.Path, index_path: pathlib.Path):
        try:
            self._where = dict(json.loads(index_path.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map)") from None
        self._files = {f: SafetensorsFile(folder / f) for f in sorted(set(self._where.values()))
                       if (folder / f).exists()}
        self.folder = folder
        for key, file in self._where.items():
            if file in self._files and key not in self._files[file]:
                raise CheckpointError(f"{index_path} lists {key!r} in {file}, which does not contain it")

    def _file(self, key: str) -> SafetensorsFile:
        file = self._where[key]
        if file not in self._files:
            raise CheckpointError(f"{self.folder / file} is missing (it holds {key!r})")
        return self._files[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).shape(key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._file(key)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _open_folder(folder: pathlib.Path, *, partial: bool = False):
    if partial and folder.is_dir():
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            return _ShardSubset(folder, indexes[0])
    return ShardedCheckpoint(folder)


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


# ----------------------------------------------------------------------------------------------------- sources


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
    def is_distilled(self) -> bool:
        return bool(self.model_index.get("is_distilled", False))

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
            return _KINDS[name].config.from_dict(data)
        except (TypeError, ValueError, KeyError) as e:
            raise ConversionError(f"{path}: {e}") from None

    def tensors(self, name: str, *, shapes_only: bool = False) -> Mapping[str, np.ndarray]:
        """The component's tensors under diffusers/transformers names, read lazily (diffusers sources only)."""
        if self.kind != "diffusers":
            raise ConversionError(f"{self.folder} is already converted; it has no PyTorch tensors")
        if name == "transformer" and self.transformer_file is not None:
            raw = _open_transformer_file(self.transformer_file)
        else:
            raw = _open_folder(self.folder / name, partial=self.partial_shards)
        if shapes_only:
            raw = _ShapesOnly(raw)
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
        return Source("converted", folder, os.fspath(source), _read_json(folder / "model_index.json"),
                      manifest=manifest)
    if (folder / "model_index.json").is_file():
        return Source("diffusers", folder, os.fspath(source), _read_json(folder / "model_index.json"),
                      transformer_file=transformer_file, partial_shards=partial)
    raise ConversionError(f"unknown source layout: {folder} has neither {MANIFEST} (klein-convert output) "
                          "nor model_index.json (diffusers pipeline)")


# ---------------------------------------------------------------------------------------------------- convert


def check_component(source: Source, name: str, config: Any, dtype: Any) -> int:
    """Dry run of the key map on shapes only (no data read); returns how many tensors the conversion reads."""
    expected = expected_params(abstract_module(name, config, dtype))
    count = 0

    def seen(_key: str) -> None:
        nonlocal count
        count += 1

    tensors = source.tensors(name, shapes_only=True)
    try:
        map_weights(tensors, _KINDS[name].rules(config), {p: (shape, np.bool_) for p, (shape, _) in expected.items()},
                    dtype=np.bool_, on_tensor=seen)
    except WeightMappingError as e:
        message = f"{name}: {e}"
        if isinstance(tensors, BFLTransformer):
            message = tensors.annotate(message)
        raise WeightMappingError(message) from None
    return count


def convert_component(source: Source, name: str, config: Any, dtype: Any, *,
                      on_tensor: Callable[[str], None] | None = None) -> dict[Path, np.ndarray]:
    """The component's parameters (path -> host array in the module's dtypes), read and cast tensor by tensor."""
    expected = expected_params(abstract_module(name, config, dtype))
    rules = tuple(dataclasses.replace(r, transform=_copying(r.transform)) for r in _KINDS[name].rules(config))
    return map_weights(source.tensors(name), rules, expected, on_tensor=on_tensor)


# ------------------------------------------------------------------------------------------------------- load


@dataclasses.dataclass
class Components:
    """Everything KleinPipeline needs: the loaded modules, their configs, tokenizer and sampling defaults."""

    transformer: Flux2Transformer
    vae: Flux2VAE
    text_encoder: Qwen3TextEncoder
    tokenizer: PromptTokenizer
    transformer_config: TransformerConfig
    vae_config: VAEConfig
    text_encoder_config: TextEncoderConfig
    scheduler_config: dict[str, Any]
    is_distilled: bool
    dtype: Any
    source: str


def _load_module(source: Source, name: str, config: Any, dtype: Any):
    abstract = abstract_module(name, config, dtype)
    if source.kind == "converted":
        return checkpoint.restore_module(source.folder / name / PARAMS_DIR, abstract)
    check_component(source, name, config, dtype)
    return fill_module(abstract, convert_component(source, name, config, dtype))


def load_components(source: str | os.PathLike, dtype: Any = "bfloat16", *,
                    transformer_file: str | os.PathLike | None = None, revision: str | None = None) -> Components:
    """Loads a klein-convert folder, a diffusers pipeline folder or a hub id into modules of `dtype`.

    Raises one of SOURCE_ERRORS (ValueErrors with a readable message) for a bad source.
    """
    dtype = parse_dtype(dtype)
    src = open_source(source, transformer_file=transformer_file, revision=revision)
    configs = {name: src.config(name) for name in COMPONENTS}
    tokenizer = src.tokenizer()
    modules = {}
    for name in COMPONENTS:
        start = time.perf_counter()
        modules[name] = _load_module(src, name, configs[name], dtype)
        count = sum(int(np.prod(s)) for s, _ in expected_params(modules[name]).values())
        log.info("loaded %s: %.3gM params %s in %.1f s", name, count / 1e6, dtype_name(dtype),
                 time.perf_counter() - start)
    return Components(
        transformer=modules["transformer"], vae=modules["vae"], text_encoder=modules["text_encoder"],
        tokenizer=tokenizer, transformer_config=configs["transformer"], vae_config=configs["vae"],
        text_encoder_config=configs["text_encoder"], scheduler_config=src.scheduler_config,
        is_distilled=src.is_distilled, dtype=dtype, source=src.name,
    )
