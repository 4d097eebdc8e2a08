"""Builders of tiny LoRA adapter files in the published layouts (test fixtures; write under tmp_path).

`write_peft_adapter`: peft's LoRA layers on a diffusers Flux2Transformer2DModel, saved with
Flux2KleinPipeline.save_lora_weights (the diffusers/PEFT layout with its lora_adapter_metadata), random non-zero
factors (init_lora_weights=False), alpha != r and a rank_pattern/alpha_pattern so that PEFT's scaling matters.
`kohya_tensors` / `bfl_tensors`: the same kind of factors in the kohya (`lora_unet_..._qkv.lora_down.weight` +
`.alpha`) and Black Forest Labs / ComfyUI (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`) namings.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from safetensors.torch import save_file

from klein_jax.configs import TINY_TRANSFORMER, TransformerConfig

# Every kind of linear layer of the transformer (double-block to_out is a ModuleList: to_out.0).
PEFT_TARGETS = (r".*(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out|to_qkv_mlp_proj)"
                r"|single_transformer_blocks\.\d+\.attn\.to_out|ff(_context)?\.linear_(in|out)|x_embedder|proj_out)$")


def write_peft_adapter(folder: pathlib.Path, *, seed: int, rank: int = 4, alpha: float = 8.0,
                       gain: float = 1.0) -> pathlib.Path:
    """A folder with pytorch_lora_weights.safetensors as diffusers' LoRA training scripts save it."""
    from diffusers import Flux2KleinPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tiny_pipeline import tiny_transformer

    torch.manual_seed(seed)
    transformer = tiny_transformer()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS, init_lora_weights=False,
                        rank_pattern={"proj_out": 2}, alpha_pattern={"x_embedder": 3.0})
    transformer.add_adapter(config)
    layers = {k: v * gain for k, v in get_peft_model_state_dict(transformer).items()}
    Flux2KleinPipeline.save_lora_weights(folder, transformer_lora_layers=layers,
                                         transformer_lora_adapter_metadata=config.to_dict())
    return folder


def _bfl_shapes(config: TransformerConfig) -> dict[str, tuple[int, int]]:
    """BFL module name -> (in, out) of the layers a kohya/BFL adapter targets here."""
    D, M = config.inner_dim, config.mlp_hidden_dim
    shapes = {"img_in": (config.in_channels, D), "final_layer.linear": (D, config.output_channels),
              "time_in.in_layer": (config.timestep_guidance_channels, D)}
    for i in range(config.num_layers):
        for stream in ("img", "txt"):
            shapes |= {f"double_blocks.{i}.{stream}_attn.qkv": (D, 3 * D), f"double_blocks.{i}.{stream}_attn.proj": (D, D),
                       f"double_blocks.{i}.{stream}_mlp.0": (D, 2 * M), f"double_blocks.{i}.{stream}_mlp.2": (M, D)}
    for i in range(config.num_single_layers):
        shapes |= {f"single_blocks.{i}.linear1": (D, 3 * D + 2 * M), f"single_blocks.{i}.linear2": (D + M, D)}
    return shapes


def kohya_tensors(*, seed: int, rank: int = 8, alpha: float = 1.0, scale: float = 0.3,
                  config: TransformerConfig = TINY_TRANSFORMER) -> dict[str, torch.Tensor]:
    """A kohya (sd-scripts) FLUX.2 LoRA: lora_unet_<BFL name with "_">.lora_down/.lora_up/.alpha."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, (fan_in, fan_out) in _bfl_shapes(config).items():
        key = "lora_unet_" + module.replace(".", "_")
        out[f"{key}.lora_down.weight"] = torch.from_numpy(scale * rng.standard_normal((rank, fan_in), np.float32))
        out[f"{key}.lora_up.weight"] = torch.from_numpy(scale * rng.standard_normal((fan_out, rank), np.float32))
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def bfl_tensors(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same adapter in the BFL/ComfyUI naming (diffusion_model.<BFL name>.lora_A/B), alpha baked into lora_A."""
    names = {"lora_unet_" + m.replace(".", "_"): m for m in _bfl_shapes(TINY_TRANSFORMER)}
    out = {}
    for key, module in names.items():
        down = kohya[f"{key}.lora_down.weight"]
        scale = float(kohya[f"{key}.alpha"]) / down.shape[0]
        out[f"diffusion_model.{module}.lora_A.weight"] = down * scale
        out[f"diffusion_model.{module}.lora_B.weight"] = kohya[f"{key}.lora_up.weight"]
    return out


def write_tensors(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


# ------------------------------------------------------------------------------------------------------- LoKr
# LoKr modules (diffusers names, (in, out) in the tiny transformer); decompose factor 4 as ai-toolkit's, so that
# diffusers' _create_lokr_config infers the same Kronecker factorisation.
def _lokr_shapes(fused: bool, config: TransformerConfig = TINY_TRANSFORMER) -> dict[str, tuple[int, int]]:
    D, M = config.inner_dim, config.mlp_hidden_dim
    shapes = {"transformer_blocks.0.attn.to_out.0": (D, D), "transformer_blocks.0.ff.linear_in": (D, 2 * M),
              "transformer_blocks.0.ff_context.linear_out": (M, D),
              "single_transformer_blocks.0.attn.to_qkv_mlp_proj": (D, 3 * D + 2 * M),
              "single_transformer_blocks.1.attn.to_out": (D + M, D)}
    if fused:
        return shapes | {"transformer_blocks.0.attn.to_qkv": (D, 3 * D), "transformer_blocks.0.attn.to_added_qkv": (D, 3 * D)}
    return shapes | {"transformer_blocks.0.attn.to_q": (D, D), "transformer_blocks.0.attn.add_k_proj": (D, D)}


def lokr_parts(*, seed: int, fused: bool, scale: float = 0.3, rank: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers module -> LoKr tensors with an alpha: w1 (4, 4) full; w2 low-rank (w2_a @ w2_b, rank 4) where
    peft would decompose it (rank < max(w2 dims) / 2), else full (its alpha is dropped); the single block's
    to_qkv_mlp_proj has both factors low-rank at rank 1."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return torch.from_numpy(scale * rng.standard_normal(shape, np.float32))

    out = {}
    for module, (fan_in, fan_out) in _lokr_shapes(fused).items():
        b, d = fan_out // 4, fan_in // 4
        if module.endswith("to_qkv_mlp_proj"):
            parts = {"lokr_w1_a": normal(4, 1), "lokr_w1_b": normal(1, 4), "lokr_w2_a": normal(b, 1),
                     "lokr_w2_b": normal(1, d)}
        elif rank < max(b, d) / 2:
            parts = {"lokr_w1": normal(4, 4), "lokr_w2_a": normal(b, rank), "lokr_w2_b": normal(rank, d)}
        else:
            parts = {"lokr_w1": normal(4, 4), "lokr_w2": normal(b, d)}
        out[module] = parts | {"alpha": torch.tensor(2.0)}
    return out


_BFL_LOKR = {"transformer_blocks.0.attn.to_qkv": "double_blocks.0.img_attn.qkv",
             "transformer_blocks.0.attn.to_added_qkv": "double_blocks.0.txt_attn.qkv",
             "transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj",
             "transformer_blocks.0.ff.linear_in": "double_blocks.0.img_mlp.0",
             "transformer_blocks.0.ff_context.linear_out": "double_blocks.0.txt_mlp.2",
             "single_transformer_blocks.0.attn.to_qkv_mlp_proj": "single_blocks.0.linear1",
             "single_transformer_blocks.1.attn.to_out": "single_blocks.1.linear2"}


def lokr_tensors(parts: dict[str, dict[str, torch.Tensor]], naming: str) -> dict[str, torch.Tensor]:
    """The LoKr file in one naming diffusers reads for FLUX.2: "bfl" (diffusion_model.<BFL name>), "lycoris"
    (lycoris_<underscored diffusers name>), "bare" (diffusers names + alpha) or "transformer" (transformer.<name>,
    alpha baked into w1 as diffusers' _bake_lokr_alpha_ does, since diffusers refuses alpha keys there)."""
    out = {}
    for module, tensors in parts.items():
        if naming == "bfl":
            prefix = f"diffusion_model.{_BFL_LOKR[module]}"
        elif naming == "lycoris":
            prefix = "lycoris_" + module.replace(".", "_")
        else:
            prefix = module if naming == "bare" else f"transformer.{module}"
        tensors = dict(tensors)
        if naming == "transformer":
            alpha = float(tensors.pop("alpha"))
            low = tensors.get("lokr_w2_b", tensors.get("lokr_w1_b"))
            if low is not None:
                key = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
                tensors[key] = tensors[key] * (alpha / low.shape[0])
        out |= {f"{prefix}.{k}": v for k, v in tensors.items()}
    return out
