"""Builders of tiny random checkpoints in the published on-disk layouts (test fixtures; write under tmp_path).

`make_tiny_diffusers_pipeline` saves a diffusers `Flux2KleinPipeline` made of the reference classes
(Flux2Transformer2DModel, AutoencoderKLFlux2, transformers Qwen3ForCausalLM, the demo tokenizer,
FlowMatchEulerDiscreteScheduler) with `save_pretrained`, i.e. the folder layout of the hub repos.
`make_bfl_transformer_file` writes a transformer state dict in the Black Forest Labs single-file layout
(klein.md §6.2), the inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers.

Every parameter is random, including norm scales/biases (which the reference classes initialise to
constants, so that a swapped or missing norm weight would otherwise go unnoticed) and the VAE's
BatchNorm running statistics. A few weight families are scaled up so that the output depends on each reference's
content, layout and order (see REFERENCE_GAINS).
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import re
from collections.abc import Mapping

import numpy as np
import torch

from klein_jax.configs import (
    TINY_9B_TEXT_ENCODER,
    TINY_9B_TRANSFORMER,
    TINY_TEXT_ENCODER,
    TINY_TRANSFORMER,
    TINY_VAE,
    TextEncoderConfig,
    TransformerConfig,
    VAEConfig,
)

# FLUX.2-klein scheduler/scheduler_config.json (klein.md §5.3); with dynamic shifting `shift` is unused.
KLEIN_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
}
# model_index.json key (private to klein-jax; diffusers drops "_" keys silently) for the hidden_states indices that
# Flux2KleinPipeline.__call__(text_encoder_out_layers=...) takes. Absent in the published repos: (9, 18, 27).
OUT_LAYERS_KEY = "_text_encoder_out_layers"

# With the reference classes' default init a reference image moved diffusers' output by ~1e-4, under the parity
# tolerance: the time embedding is ~0.1, so every adaLN gate is ~0 and each block is nearly the identity; attention
# logits are ~1, so a token averages ~900 keys (512 of them text) and a reference's layout averages out; the
# encoder's latents (std ~0.2) are small next to the BatchNorm shift, so every reference token is about the same
# vector. These gains (parameter name regex -> factor) give O(1) gates, O(10) attention logits and O(1) latents
# instead: a reference then moves the output by 1e-2 to 6e-2 (tests/test_pipeline_parity.py asserts >= 1e-2).
REFERENCE_GAINS = {
    r"_modulation": 5.0,  # double_stream_modulation_img/txt, single_stream_modulation: shift, scale, gate
    r"\.norm_(added_)?[qk]\.": 3.0,  # the QK RMSNorm scales: attention logits scale with their product
    r"^quant_conv\.": 5.0,  # the VAE encoder's last conv
}


def _randomise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-draws every parameter the reference initialised to a constant (norm scales, biases, zero inits)."""
    with torch.no_grad():
        for p in module.parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.copy_(p + 0.1 * noise)


def _amplify_(module: torch.nn.Module) -> None:
    """Multiplies the parameters named in REFERENCE_GAINS by their gain."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            for pattern, gain in REFERENCE_GAINS.items():
                if re.search(pattern, name):
                    p.mul_(gain)


def tiny_transformer(config: TransformerConfig = TINY_TRANSFORMER, *, seed: int = 0):
    """A diffusers Flux2Transformer2DModel with random weights (float32, eval mode)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**config.to_dict()).eval()
    _randomise_(model, torch.Generator().manual_seed(seed + 1))
    _amplify_(model)
    return model


def tiny_vae(config: VAEConfig = TINY_VAE, *, seed: int = 0):
    """A diffusers AutoencoderKLFlux2 with random weights and random BatchNorm running statistics."""
    from diffusers import AutoencoderKLFlux2

    accepted = inspect.signature(AutoencoderKLFlux2.__init__).parameters
    kwargs = {k: v for k, v in config.to_dict().items() if k in accepted}  # force_upcast is not an init argument
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**kwargs).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    _randomise_(model, generator)
    _amplify_(model)
    with torch.no_grad():
        channels = model.bn.running_mean.shape
        model.bn.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
        model.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return model


def qwen3_config(config: TextEncoderConfig = TINY_TEXT_ENCODER, *, num_hidden_layers: int | None = None):
    """The transformers Qwen3Config of a TextEncoderConfig (optionally deeper or shallower)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=num_hidden_layers or config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        max_position_embeddings=40960,
        tie_word_embeddings=True,  # as Qwen3-4B
    )


def tiny_text_encoder(config: TextEncoderConfig = TINY_TEXT_ENCODER, *, num_hidden_layers: int | None = None,
                      seed: int = 0):
    """A transformers Qwen3ForCausalLM with random weights (float32, eval mode)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(config, num_hidden_layers=num_hidden_layers)).eval()
    _randomise_(model, torch.Generator().manual_seed(seed + 1))
    return model


def make_tiny_diffusers_pipeline(
    path: str | os.PathLike,
    *,
    distilled: bool = True,
    seed: int = 0,
    text_layers: int = TINY_TEXT_ENCODER.num_hidden_layers,
    out_layers: tuple[int, ...] = TINY_TEXT_ENCODER.out_layers,
    transformer_config: TransformerConfig = TINY_TRANSFORMER,
    vae_config: VAEConfig = TINY_VAE,
    text_encoder_config: TextEncoderConfig = TINY_TEXT_ENCODER,
    shard_text_encoder: bool = True,
) -> pathlib.Path:
    """Saves a random tiny Flux2KleinPipeline at `path` with `save_pretrained` (the hub folder layout); returns path.

    Args:
      text_layers: decoder layers of the Qwen3 text encoder (>= max(out_layers); more are saved but never run).
      out_layers: the hidden_states indices the pipeline stacks; recorded in model_index.json under
        OUT_LAYERS_KEY and to be passed to Flux2KleinPipeline.__call__(text_encoder_out_layers=...).
      shard_text_encoder: save the text encoder in several safetensors files with an index json, as the hub does.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import AutoTokenizer

    from klein_jax.demo_tokenizer import build_demo_tokenizer, save_tokenizer_folder

    if transformer_config.joint_attention_dim != len(out_layers) * text_encoder_config.hidden_size:
        raise ValueError(f"joint_attention_dim={transformer_config.joint_attention_dim} != "
                         f"{len(out_layers)} x text hidden_size {text_encoder_config.hidden_size}")
    if max(out_layers) > text_layers:
        raise ValueError(f"out_layers={out_layers} reads past text_layers={text_layers}")
    path = pathlib.Path(path)
    tokenizer_folder = save_tokenizer_folder(path / "tokenizer", build_demo_tokenizer(text_encoder_config.vocab_size))
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER_CONFIG),
        vae=tiny_vae(vae_config, seed=seed),
        text_encoder=tiny_text_encoder(text_encoder_config, num_hidden_layers=text_layers, seed=seed),
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_folder),
        transformer=tiny_transformer(transformer_config, seed=seed),
        is_distilled=distilled,
    )
    pipeline.save_pretrained(path)
    if shard_text_encoder:
        (path / "text_encoder" / "model.safetensors").unlink()
        shard_bytes = sum(p.numel() * p.element_size() for p in pipeline.text_encoder.parameters()) // 2 + 1
        pipeline.text_encoder.save_pretrained(path / "text_encoder", max_shard_size=shard_bytes)
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index[OUT_LAYERS_KEY] = list(out_layers)
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_reference_pipeline(path: str | os.PathLike):
    """The diffusers Flux2KleinPipeline saved at `path`, float32 on CPU."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(path, dtype=torch.float32)


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    first, second = w.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers Flux2Transformer2DModel names -> BFL flux2 names (klein.md §6.2), written independently of
    klein_jax/loading/keymaps/bfl.py so that the two can check each other."""
    sd = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
    out = {
        "img_in.weight": sd.pop("x_embedder.weight"),
        "txt_in.weight": sd.pop("context_embedder.weight"),
        "time_in.in_layer.weight": sd.pop("time_guidance_embed.timestep_embedder.linear_1.weight"),
        "time_in.out_layer.weight": sd.pop("time_guidance_embed.timestep_embedder.linear_2.weight"),
        "double_stream_modulation_img.lin.weight": sd.pop("double_stream_modulation_img.linear.weight"),
        "double_stream_modulation_txt.lin.weight": sd.pop("double_stream_modulation_txt.linear.weight"),
        "single_stream_modulation.lin.weight": sd.pop("single_stream_modulation.linear.weight"),
        "final_layer.linear.weight": sd.pop("proj_out.weight"),
        # BFL final layer is (shift, scale); diffusers norm_out is (scale, shift)
        "final_layer.adaLN_modulation.1.weight": _swap_halves(sd.pop("norm_out.linear.weight")),
    }
    double = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for n in double:
        d, b = f"transformer_blocks.{n}.", f"double_blocks.{n}."
        out[b + "img_attn.qkv.weight"] = torch.cat([sd.pop(d + f"attn.to_{x}.weight") for x in "qkv"], dim=0)
        out[b + "txt_attn.qkv.weight"] = torch.cat([sd.pop(d + f"attn.add_{x}_proj.weight") for x in "qkv"], dim=0)
        for bfl, diff in [
            ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
            ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
            ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
            ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
            ("img_attn.proj.weight", "attn.to_out.0.weight"),
            ("txt_attn.proj.weight", "attn.to_add_out.weight"),
            ("img_mlp.0.weight", "ff.linear_in.weight"),
            ("img_mlp.2.weight", "ff.linear_out.weight"),
            ("txt_mlp.0.weight", "ff_context.linear_in.weight"),
            ("txt_mlp.2.weight", "ff_context.linear_out.weight"),
        ]:
            out[b + bfl] = sd.pop(d + diff)
    single = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
    for n in single:
        d, b = f"single_transformer_blocks.{n}.", f"single_blocks.{n}."
        for bfl, diff in [
            ("linear1.weight", "attn.to_qkv_mlp_proj.weight"),
            ("linear2.weight", "attn.to_out.weight"),
            ("norm.query_norm.scale", "attn.norm_q.weight"),
            ("norm.key_norm.scale", "attn.norm_k.weight"),
        ]:
            out[b + bfl] = sd.pop(d + diff)
    if sd:
        raise ValueError(f"diffusers keys with no BFL name: {sorted(sd)}")
    return out


def make_bfl_transformer_file(diffusers_transformer_state_dict: Mapping[str, torch.Tensor],
                              path: str | os.PathLike, *, prefix: str = "") -> pathlib.Path:
    """Writes the transformer in the BFL single-file layout (`flux-2-klein-4b.safetensors`); returns path.

    Args:
      prefix: prepended to every key, e.g. "model.diffusion_model." as in ComfyUI files.
    """
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bfl = diffusers_to_bfl(diffusers_transformer_state_dict)
    tensors = {prefix + k: v.detach().contiguous() for k, v in bfl.items()}
    save_file(tensors, str(path))
    return path



# ------------------------------------------------------------------------ klein-9B shapes and the KV pipeline


def tiny_untied_text_encoder(config: TextEncoderConfig = TINY_9B_TEXT_ENCODER, *, seed: int = 0):
    """A transformers Qwen3ForCausalLM with its own lm_head (tie_word_embeddings=False, as Qwen3-8B)."""
    from transformers import Qwen3ForCausalLM

    qwen3 = qwen3_config(config)
    qwen3.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3).eval()
    _randomise_(model, torch.Generator().manual_seed(seed + 1))
    return model


def make_tiny_9b_pipeline(path: str | os.PathLike, *, kv: bool = False, distilled: bool = True,
                          seed: int = 0) -> pathlib.Path:
    """Saves a random klein-9B-shaped pipeline at `path` as the hub does; returns path.

    TINY_9B_TRANSFORMER and TINY_9B_TEXT_ENCODER (untied lm_head, grouped-query attention 4:1 as Qwen3-8B), the
    tiny VAE, reference-sensitive gains (REFERENCE_GAINS) and a sharded text encoder. kv: a Flux2KleinKVPipeline
    (model_index.json without is_distilled, as FLUX.2-klein-9b-kv); otherwise a Flux2KleinPipeline.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline, Flux2KleinPipeline
    from transformers import AutoTokenizer

    from klein_jax.demo_tokenizer import build_demo_tokenizer, save_tokenizer_folder

    path = pathlib.Path(path)
    text_config = TINY_9B_TEXT_ENCODER
    tokenizer_folder = save_tokenizer_folder(path / "tokenizer", build_demo_tokenizer(text_config.vocab_size))
    modules = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER_CONFIG),
        vae=tiny_vae(TINY_VAE, seed=seed),
        text_encoder=tiny_untied_text_encoder(text_config, seed=seed),
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_folder),
        transformer=tiny_transformer(TINY_9B_TRANSFORMER, seed=seed),
    )
    pipeline = Flux2KleinKVPipeline(**modules) if kv else Flux2KleinPipeline(**modules, is_distilled=distilled)
    pipeline.save_pretrained(path)
    (path / "text_encoder" / "model.safetensors").unlink()
    shard_bytes = sum(p.numel() * p.element_size() for p in pipeline.text_encoder.parameters()) // 2 + 1
    pipeline.text_encoder.save_pretrained(path / "text_encoder", max_shard_size=shard_bytes)
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index[OUT_LAYERS_KEY] = list(text_config.out_layers)
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_any_reference_pipeline(path: str | os.PathLike):
    """The diffusers pipeline saved at `path`, of the class its model_index.json names, float32 on CPU."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
