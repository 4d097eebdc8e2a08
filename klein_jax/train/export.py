"""The trained factors written as diffusers' training scripts write them (Flux2KleinPipeline.save_lora_weights):
pytorch_lora_weights.safetensors with `transformer.<module>.lora_A.weight` (r, in), `lora_B.weight` (out, r) and
the PEFT config in the `lora_adapter_metadata` header, so diffusers' load_lora_weights and ours read it."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
from safetensors.numpy import save_file

from klein_jax.lora.apply import LoraLayout
from klein_jax.lora.files import LORA_WEIGHT_NAME, METADATA_KEY


def diffusers_module(path: str) -> str:
    """Our module path -> diffusers' (double-block attn.to_out is a ModuleList there: to_out.0)."""
    return re.sub(r"^(transformer_blocks\.\d+\.attn\.to_out)$", r"\1.0", path)


def save_adapter(folder: pathlib.Path, lora: dict, layout: LoraLayout, *, rank: int, lora_alpha: float) -> pathlib.Path:
    """Writes folder/pytorch_lora_weights.safetensors; returns its path."""
    tensors = {}
    modules = []
    for (path, _, _), down, up in zip(layout.targets, lora["down"], lora["up"], strict=True):
        module = diffusers_module(path)
        modules.append(module)
        tensors[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(down, np.float32).T)
        tensors[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(up, np.float32).T)
    config = {"r": rank, "lora_alpha": lora_alpha, "target_modules": sorted(modules), "lora_dropout": 0.0,
              "init_lora_weights": "gaussian", "use_rslora": False, "use_dora": False, "rank_pattern": {},
              "alpha_pattern": {}, "peft_type": "LORA", "bias": "none"}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                         indent=2, sort_keys=True)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_WEIGHT_NAME
    save_file(tensors, path, metadata=metadata)
    return path
