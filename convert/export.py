"""KleinPipeline -> a diffusers pipeline folder (the inverse of the key maps), written with safetensors.numpy.

The folder has the layout of the hub repos (`save_pretrained` of Flux2KleinPipeline), so that klein-convert,
`KleinPipeline.from_pretrained` and diffusers' `Flux2KleinPipeline.from_pretrained` all load it:

  model_index.json                      (+ "_text_encoder_out_layers" when they are not (9, 18, 27))
  scheduler/scheduler_config.json       FlowMatchEulerDiscreteScheduler, klein's dynamic shifting
  transformer/config.json + diffusion_pytorch_model.safetensors
  vae/config.json + diffusion_pytorch_model.safetensors
  text_encoder/config.json (transformers Qwen3) + model.safetensors
  tokenizer/                            klein_jax.tokenizer.save_tokenizer_folder

Each parameter path is mapped back to the diffusers / transformers key whose rule (klein_jax/loading/keymaps/*.py) maps to it:
candidate keys are guessed by renaming (kernel/scale/embedding -> weight, `to_out` -> `to_out.0`, the `model.`
prefix) and each is verified against the rule table, so a key map change that the inverse does not follow fails
loudly here. The text encoder runs only layers 0..max(out_layers)-1: the decoder layers after those are never read
by klein, so they are written as zeros (with `model.norm` = 1) to keep the config's layer count.
Used by notebook 3 and tests/test_export.py to make a checkpoint when no real weights are on disk; torch is not
needed.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from klein_jax.loading import DEFAULT_OUT_LAYERS, OUT_LAYERS_KEY, module_params
from klein_jax.loading.keymaps.text_encoder import text_encoder_rules
from klein_jax.loading.keymaps.transformer import transformer_rules
from klein_jax.loading.keymaps.vae import vae_rules
from klein_jax.loading.keymap import KeyRule, Path, conv2d, linear, same
from klein_jax.configs import TextEncoderConfig, TransformerConfig, VAEConfig

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "vae", "text_encoder")
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose layout this writes
TRANSFORMERS_VERSION = "5.24.0"
# klein scheduler/scheduler_config.json (klein.md §5.3): FlowMatchEulerDiscreteScheduler with exponential shifting.
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
WEIGHT_FILES = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
# forward transform of a rule (torch layout -> ours) -> its inverse (ours -> torch layout)
_INVERSE: dict[Callable, Callable[[np.ndarray], np.ndarray]] = {
    linear: lambda w: w.T,  # flax (in, out) -> torch (out, in)
    conv2d: lambda w: w.transpose(3, 2, 0, 1),  # flax HWIO -> torch OIHW
    same: lambda w: w,
}
_WEIGHT_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class ExportError(ValueError):
    """A parameter that no rule of the key map produces (or that several keys would produce)."""


# ------------------------------------------------------------------------------------------ inverse key maps


def _candidates(path: Path) -> list[str]:
    """diffusers / transformers keys that may map to `path`, from the known naming differences."""
    parts = [str(p) for p in path]
    parts[-1] = _WEIGHT_NAMES.get(parts[-1], parts[-1])
    dotted = ".".join(parts)
    variants = {dotted, dotted.replace(".to_out.", ".to_out.0.")}  # diffusers' to_out is a ModuleList + Dropout
    return sorted(variants | {"model." + v for v in variants})  # transformers nests Qwen3 under `model.`


def _source_key(path: Path, rules: tuple[KeyRule, ...]) -> tuple[str, KeyRule]:
    """The one source key (and its rule) that `rules` map onto `path`; ExportError if none or several."""
    target = ".".join(str(p) for p in path)
    found = []
    for key in _candidates(path):
        matches = [(r, m) for r in rules if (m := r._regex.fullmatch(key))]
        if len(matches) == 1:
            rule, m = matches[0]
            if isinstance(rule.target, str) and m.expand(rule.target) == target:
                found.append((key, rule))
    if len(found) != 1:
        keys = [k for k, _ in found] or _candidates(path)
        raise ExportError(f"{target}: {'no' if not found else 'several'} source keys map to it (tried {keys})")
    return found[0]


def invert_params(params: Mapping[Path, np.ndarray], rules: tuple[KeyRule, ...]) -> dict[str, np.ndarray]:
    """Our parameters {path: array} -> source tensors {diffusers key: array in torch layout}."""
    out: dict[str, np.ndarray] = {}
    for path, value in params.items():
        key, rule = _source_key(path, rules)
        if rule.transform not in _INVERSE:
            raise ExportError(f"{key}: rule {rule.source!r} has a transform with no known inverse")
        out[key] = np.ascontiguousarray(_INVERSE[rule.transform](np.asarray(value)))
    return out


# ----------------------------------------------------------------------------------------------- configs


def transformer_config_json(config: TransformerConfig) -> dict[str, Any]:
    """diffusers transformer/config.json of a TransformerConfig."""
    return {"_class_name": "Flux2Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            **_json_ready(config.to_dict())}


def vae_config_json(config: VAEConfig) -> dict[str, Any]:
    """diffusers vae/config.json of a VAEConfig (force_upcast is a hint that AutoencoderKLFlux2 does not take)."""
    data = {k: v for k, v in _json_ready(config.to_dict()).items() if k != "force_upcast"}
    return {"_class_name": "AutoencoderKLFlux2", "_diffusers_version": DIFFUSERS_VERSION, **data}


def text_encoder_config_json(config: TextEncoderConfig, dtype: str) -> dict[str, Any]:
    """transformers Qwen3ForCausalLM config.json of a TextEncoderConfig (tied embeddings, as Qwen3-4B)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "dtype": dtype,
        "eos_token_id": None,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        "max_position_embeddings": 40960,
        "max_window_layers": config.num_hidden_layers,
        "model_type": "qwen3",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "pad_token_id": None,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": True,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": config.vocab_size,
    }


def _json_ready(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def model_index_json(*, is_distilled: bool, out_layers: tuple[int, ...]) -> dict[str, Any]:
    """model_index.json of a Flux2KleinPipeline folder; out_layers are recorded only when not the default."""
    index: dict[str, Any] = {
        "_class_name": "Flux2KleinPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "is_distilled": bool(is_distilled),
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    if tuple(out_layers) != tuple(DEFAULT_OUT_LAYERS):
        index[OUT_LAYERS_KEY] = list(out_layers)
    return index


# ------------------------------------------------------------------------------------------------ tensors


def _text_encoder_padding(config: TextEncoderConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero decoder layers num_layers_run..num_hidden_layers-1 and `model.norm` = 1, which klein never reads."""
    run, total = config.num_layers_run, config.num_hidden_layers
    if run == total:
        return {}
    template = {k.split(".", 3)[3]: v for k, v in tensors.items() if k.startswith("model.layers.0.")}
    if not template:
        raise ExportError("text encoder has no layer 0 to copy the shapes of its unused layers from")
    dtype = tensors["model.embed_tokens.weight"].dtype
    padding = {f"model.layers.{i}.{name}": np.zeros(v.shape, v.dtype) for i in range(run, total)
               for name, v in template.items()}
    padding["model.norm.weight"] = np.ones((config.hidden_size,), dtype)
    return padding


def component_tensors(name: str, module) -> dict[str, np.ndarray]:
    """One component's tensors under diffusers / transformers names, in torch layout."""
    config = module.config
    rules = {"transformer": transformer_rules, "vae": vae_rules, "text_encoder": text_encoder_rules}[name](config)
    tensors = invert_params(module_params(module), rules)
    if name == "vae":
        tensors["bn.num_batches_tracked"] = np.zeros((), np.int64)  # a BatchNorm2d buffer diffusers expects
    if name == "text_encoder":
        tensors.update(_text_encoder_padding(config, tensors))
    return tensors


def pipeline_modules(pipe) -> dict[str, Any]:
    """The pipeline's transformer, vae and text_encoder nnx modules."""
    return {name: getattr(pipe, name) for name in COMPONENTS}


# -------------------------------------------------------------------------------------------------- export


def _write_json(path: pathlib.Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_diffusers_folder(pipe, path: str | os.PathLike) -> pathlib.Path:
    """Writes `pipe` (a KleinPipeline) as a diffusers Flux2KleinPipeline folder at `path` (new or empty); returns it."""
    from safetensors.numpy import save_file

    from klein_jax.demo_tokenizer import save_tokenizer_folder

    path = pathlib.Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExportError(f"output {path} already exists and is not an empty folder")
    modules = pipeline_modules(pipe)
    text_config = modules["text_encoder"].config
    dtype = np.dtype(pipe.dtype).name
    configs = {
        "transformer": transformer_config_json(modules["transformer"].config),
        "vae": vae_config_json(modules["vae"].config),
        "text_encoder": text_encoder_config_json(text_config, dtype),
    }
    for name in COMPONENTS:
        tensors = component_tensors(name, modules[name])
        _write_json(path / name / "config.json", configs[name])
        save_file(tensors, str(path / name / WEIGHT_FILES[name]), metadata={"format": "pt"})
        log.info("exported %s: %d tensors, %d params", name, len(tensors),
                 sum(int(t.size) for t in tensors.values()))
    _write_json(path / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    tokenizer = pipe.tokenizer
    special = {"bos_token": None, "eos_token": None, "unk_token": None, **tokenizer._template_vars,
               "pad_token": tokenizer.pad_token}
    save_tokenizer_folder(path / "tokenizer", tokenizer.tokenizer, tokenizer.chat_template, special_tokens=special,
                          chat_template_file=True)
    _write_json(path / "model_index.json",
                model_index_json(is_distilled=pipe.is_distilled, out_layers=text_config.out_layers))
    return path


# ---------------------------------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    """`python -m convert.export OUT`: writes the demo model as a diffusers folder (a checkpoint without a download)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m convert.export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write the tiny random demo model (klein_jax.demo) as a diffusers Flux2KleinPipeline folder, "
                    "the layout of the hub repos: a checkpoint for klein-convert and from_pretrained without a "
                    "download. Its images are noise.")
    p.add_argument("out", type=pathlib.Path, help="output folder (must not exist, or be empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo model's random weights")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from klein_jax.demo import build_demo_pipeline

    try:
        folder = export_diffusers_folder(build_demo_pipeline(seed=args.seed), args.out)
    except (ExportError, OSError) as e:
        print(f"python -m convert.export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote the demo model (seed {args.seed}) as a diffusers pipeline folder: {folder}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
