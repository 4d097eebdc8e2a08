"""Reading a LoRA adapter file: a .safetensors file, a folder holding one, or a hub id (as diffusers'
`_fetch_state_dict` resolves them). Returns the raw tensors and the diffusers/PEFT metadata, names unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from klein_jax.loading.hub import HubError, is_hub_id
from klein_jax.loading.safetensors import CheckpointError, SafetensorsFile

# diffusers' default LoRA file name (LORA_WEIGHT_NAME_SAFE) and its metadata key (LORA_ADAPTER_METADATA_KEY).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


@dataclasses.dataclass(frozen=True, eq=False)
class LoraFile:
    """An adapter file's tensors (torch layout, names as stored) and its PEFT config metadata (or None)."""

    path: pathlib.Path
    tensors: dict[str, np.ndarray]
    metadata: dict | None


def _pick_in_folder(folder: pathlib.Path, weight_name: str | None) -> pathlib.Path:
    if weight_name is not None:
        return folder / weight_name
    if (folder / LORA_WEIGHT_NAME).is_file():
        return folder / LORA_WEIGHT_NAME
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise CheckpointError(f"{folder} has no {LORA_WEIGHT_NAME} and {len(found)} other .safetensors files "
                              f"({names}); pass weight_name=")
    return found[0]


def _download(repo_id: str, weight_name: str | None) -> pathlib.Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        if weight_name is None:
            files = [f for f in list_repo_files(repo_id) if f.endswith(".safetensors")]
            weight_name = LORA_WEIGHT_NAME if LORA_WEIGHT_NAME in files or len(files) != 1 else files[0]
        return pathlib.Path(hf_hub_download(repo_id, weight_name))
    except (OSError, ValueError) as e:  # huggingface_hub errors derive from these (HTTP, offline, bad id)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"could not download the LoRA adapter {repo_id!r} from the Hugging Face hub: {first_line}") \
            from None


def resolve_lora_path(source: str | os.PathLike, weight_name: str | None = None) -> pathlib.Path:
    """The .safetensors file of a file path, a folder (pytorch_lora_weights.safetensors or its only
    .safetensors file) or a hub id "owner/name"."""
    path = pathlib.Path(source)
    if path.is_dir():
        return _pick_in_folder(path, weight_name)
    if path.exists():
        return path
    if is_hub_id(source):
        return _download(os.fspath(source), weight_name)
    raise CheckpointError(f"LoRA adapter not found: {source} is neither a file, a folder nor a hub id")


def read_lora_file(source: str | os.PathLike, weight_name: str | None = None) -> LoraFile:
    """Reads every tensor (as float32 numpy) and the metadata of an adapter file."""
    path = resolve_lora_path(source, weight_name)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: LoRA adapters are read from .safetensors files only")
    file = SafetensorsFile(path)
    tensors = {name: np.asarray(file[name], dtype=np.float32) for name in file}
    raw = file.metadata.get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the {METADATA_KEY} metadata is not JSON") from None
    return LoraFile(path, tensors, metadata)


def parse_lora_spec(text: str, *, named: bool = False) -> tuple[str | None, str, float | None]:
    """A command line's `PATH[:SCALE]` (or `NAME=PATH[:SCALE]` when named) -> (name, path, scale or None).

    The scale is the part after the last ":" when it is a number, so paths and hub ids keep their own colons.
    """
    name = None
    if named:
        name, sep, text = text.partition("=")
        if not sep or not name or not text:
            raise ValueError(f"--lora {name}{sep}{text!s}: expected NAME=PATH[:SCALE]")
    path, sep, tail = text.rpartition(":")
    scale = None
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            path = text
    else:
        path = text
    if not path:
        raise ValueError(f"--lora {text!r}: no path before the scale")
    return name, path, scale
