"""Downloads of a klein pipeline from the Hugging Face hub: only the files a conversion reads.

Two passes of `huggingface_hub.snapshot_download` into the usual hub cache: first the small files (configs,
indexes, tokenizer, scheduler), then the weights that are needed: not the BFL single file at the repo root,
not the transformer when `--transformer` replaces it, and not text-encoder shards that hold only layers the
encoder never runs.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from collections.abc import Callable

from huggingface_hub import snapshot_download

from klein_jax.loading.safetensors import CheckpointError

log = logging.getLogger(__name__)

METADATA_PATTERNS = (
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "transformer/*.json",
    "vae/*.json",
    "text_encoder/*.json",
)
WEIGHT_FOLDERS = ("transformer", "vae", "text_encoder")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


class HubError(CheckpointError):
    """A hub download that failed: unknown repo, no access, no network."""


def is_hub_id(source: str | os.PathLike) -> bool:
    """True for "owner/name" strings that are not an existing local path."""
    text = os.fspath(source)
    return bool(_HUB_ID.fullmatch(text)) and not os.path.exists(text) and ".." not in text


def _snapshot(repo_id: str, patterns: list[str], revision: str | None) -> pathlib.Path:
    try:
        return pathlib.Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (OSError, ValueError) as e:  # huggingface_hub errors derive from these (HTTP, offline, bad id)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"could not download {repo_id!r} from the Hugging Face hub (and no local folder of that name "
                       f"exists): {first_line}") from None


def weight_patterns(folder: pathlib.Path, components: tuple[str, ...],
                    keep: dict[str, Callable[[str], bool]] | None = None) -> list[str]:
    """allow_patterns for the weight files of `components`; with an index json, only shards holding a kept key."""
    keep = keep or {}
    patterns = []
    for name in components:
        indexes = sorted((folder / name).glob("*.safetensors.index.json"))
        if not indexes:
            patterns.append(f"{name}/*.safetensors")
            continue
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{indexes[0]}: not a valid safetensors index (no weight_map)") from None
        wanted = keep.get(name, lambda key: True)
        patterns += sorted({f"{name}/{file}" for key, file in weight_map.items() if wanted(key)})
    return patterns


def download_metadata(repo_id: str, *, revision: str | None = None) -> pathlib.Path:
    """Fetches the configs, indexes, tokenizer and scheduler of a pipeline repo; returns the snapshot folder."""
    log.info("downloading %s metadata from the Hugging Face hub", repo_id)
    folder = _snapshot(repo_id, list(METADATA_PATTERNS), revision)
    if not (folder / "model_index.json").is_file():
        raise HubError(f"{repo_id!r} has no model_index.json: not a diffusers pipeline repo")
    return folder


def download_weights(repo_id: str, patterns: list[str], *, revision: str | None = None) -> pathlib.Path:
    """Fetches the weight files matching `patterns` (from `weight_patterns`); returns the snapshot folder."""
    log.info("downloading %s weights: %s", repo_id, ", ".join(patterns))
    return _snapshot(repo_id, patterns, revision)
