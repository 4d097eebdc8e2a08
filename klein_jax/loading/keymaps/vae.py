"""diffusers AutoencoderKLFlux2 tensor names -> klein_jax.models.vae.Flux2VAE paths.

Our module tree mirrors diffusers, so each row renames `weight` (conv kernels OIHW -> HWIO, Linear
(out, in) -> (in, out), GroupNorm weight -> scale) and keeps the path; the only path change is the
attention's `to_out.0` -> `to_out` (to_out.1 is a parameterless dropout).
"""

from __future__ import annotations

from klein_jax.loading.keymap import KeyRule, conv2d, linear, same
from klein_jax.configs import VAEConfig

_EITHER = r"(?:encoder|decoder)"
_RESNET = rf"(?:encoder\.down_blocks|decoder\.up_blocks)\.\d+\.resnets\.\d+|{_EITHER}\.mid_block\.resnets\.\d+"
_ATTN = rf"{_EITHER}\.mid_block\.attentions\.0"

_KINDS = {  # kind -> (our weight name, transform)
    "conv": ("kernel", conv2d),
    "norm": ("scale", same),
    "linear": ("kernel", linear),
}


def _layer(module: str, kind: str, *, source_suffix: str = "", target_suffix: str = "") -> tuple[KeyRule, KeyRule]:
    """weight and bias rules for every module whose diffusers path fully matches `module`."""
    weight_name, transform = _KINDS[kind]
    src = rf"({module}){source_suffix}"
    return (
        KeyRule(rf"{src}\.weight", rf"\1{target_suffix}.{weight_name}", transform),
        KeyRule(rf"{src}\.bias", rf"\1{target_suffix}.bias", same),
    )


def vae_rules(config: VAEConfig) -> tuple[KeyRule, ...]:
    """KeyRule table for a diffusers `vae/` folder (diffusion_pytorch_model.safetensors) of this config."""
    rules = [
        *_layer(rf"{_EITHER}\.conv_(?:in|out)", "conv"),
        *_layer(rf"(?:{_RESNET})\.(?:conv1|conv2|conv_shortcut)", "conv"),
        *_layer(r"encoder\.down_blocks\.\d+\.downsamplers\.0\.conv", "conv"),
        *_layer(r"decoder\.up_blocks\.\d+\.upsamplers\.0\.conv", "conv"),
        *_layer(rf"(?:{_RESNET})\.norm[12]", "norm"),
        *_layer(rf"{_EITHER}\.conv_norm_out", "norm"),
        KeyRule(r"bn\.running_mean", "bn.running_mean"),
        KeyRule(r"bn\.running_var", "bn.running_var"),
        KeyRule(r"bn\.num_batches_tracked", None),  # training counter; unused at inference
    ]
    if config.use_quant_conv:
        rules += _layer("quant_conv", "conv")
    if config.use_post_quant_conv:
        rules += _layer("post_quant_conv", "conv")
    if config.mid_block_add_attention:
        rules += [
            *_layer(rf"{_ATTN}\.group_norm", "norm"),
            *_layer(rf"{_ATTN}\.to_[qkv]", "linear"),
            *_layer(_ATTN, "linear", source_suffix=r"\.to_out\.0", target_suffix=".to_out"),
        ]
    return tuple(rules)
