"""Model configs as frozen data, with the real checkpoint values as named presets.

Field names follow each component's config.json (diffusers for the transformer and VAE,
transformers for Qwen3) so that `from_json` is a plain mapping. Presets cite shared/spec/klein.md.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any, Mapping


class Variant(str, enum.Enum):
    """What a checkpoint is trained for, from its model_index.json (shared/spec/interfaces.md, "Model variants")."""

    DISTILLED = "distilled"  # Flux2KleinPipeline, is_distilled: 4 steps, no guidance
    BASE = "base"  # Flux2KleinPipeline without is_distilled: 50 steps, guidance 4.0
    KV = "kv"  # Flux2KleinKVPipeline (klein-9B KV): distilled, reference keys/values computed once per image

    @property
    def is_distilled(self) -> bool:
        return self is not Variant.BASE


def _known_fields(cls, data: Mapping[str, Any], *, ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The keys of `data` that are fields of `cls`; raises on keys it does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in names and k not in ignore and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    out = {}
    for k in names & data.keys():
        v = data[k]
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Flux2Transformer2DModel config (diffusers transformer/config.json)."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 5  # double-stream blocks
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 7680
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = False

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim={self.attention_head_dim}"
            )
        if self.patch_size != 1:
            raise ValueError(f"patch_size={self.patch_size}: klein patchifies in the pipeline, only 1 is supported")
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=True is FLUX.2-dev; klein has no guidance embedder")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TransformerConfig":
        return cls(**_known_fields(cls, data))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TransformerConfig":
        return cls.from_dict(_read_json(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# klein-4B: HF black-forest-labs/FLUX.2-klein-4B transformer/config.json (klein.md §1.2).
KLEIN_4B = TransformerConfig(
    num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128, joint_attention_dim=7680
)
# klein-9B: diffusers scripts/convert_flux2_to_diffusers.py "klein-9b" (klein.md §1.2).
KLEIN_9B = TransformerConfig(
    num_layers=8, num_single_layers=24, num_attention_heads=32, attention_head_dim=128, joint_attention_dim=12288
)
# klein-9B's proportions at test size: more double-stream blocks per single-stream block than 4B (8:24 vs 5:20),
# more heads, and a text encoder (TINY_9B_TEXT_ENCODER) with 4 query heads per key/value head as Qwen3-8B.
TINY_9B_TRANSFORMER = dataclasses.replace(
    KLEIN_9B,
    num_layers=2,
    num_single_layers=3,
    num_attention_heads=4,
    attention_head_dim=16,
    joint_attention_dim=144,  # = 3 x TINY_9B_TEXT_ENCODER.hidden_size
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
)
TINY_TRANSFORMER = dataclasses.replace(
    KLEIN_4B,
    in_channels=128,
    num_layers=1,
    num_single_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    joint_attention_dim=96,  # = 3 x TINY_TEXT_ENCODER.hidden_size
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """AutoencoderKLFlux2 config (diffusers vae/config.json)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 32
    norm_num_groups: int = 32
    sample_size: int = 1024
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (2, 2)
    force_upcast: bool = True

    def __post_init__(self):
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r}: only 'silu' is supported")
        if tuple(self.patch_size) != (2, 2):
            raise ValueError(f"patch_size={self.patch_size}: only (2, 2) is supported")
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError("down_block_types and block_out_channels differ in length")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return tuple(self.decoder_block_out_channels or self.block_out_channels)

    @property
    def spatial_scale(self) -> int:
        """Pixels per VAE latent pixel (8 for the real VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def packed_channels(self) -> int:
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VAEConfig":
        return cls(**_known_fields(cls, data, ignore=frozenset({"scaling_factor", "shift_factor"})))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "VAEConfig":
        return cls.from_dict(_read_json(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The FLUX.2 VAE shared by every klein checkpoint (klein.md §1.4).
FLUX2_VAE = VAEConfig()
TINY_VAE = dataclasses.replace(FLUX2_VAE, block_out_channels=(16, 32), norm_num_groups=8,
                               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                               layers_per_block=1, latent_channels=32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """The part of a Qwen3 config.json (transformers) that the klein text encoder reads."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Flux2KleinPipeline reads hidden_states[9, 18, 27]: outputs of decoder layers 8, 17, 26 (klein.md §4).
    out_layers: tuple[int, ...] = (9, 18, 27)
    max_sequence_length: int = 512

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if max(self.out_layers) > self.num_hidden_layers:
            raise ValueError(f"out_layers={self.out_layers} reads past num_hidden_layers={self.num_hidden_layers}")

    @property
    def num_layers_run(self) -> int:
        """Decoder layers that must run to produce every hidden state read."""
        return max(self.out_layers)

    @property
    def output_dim(self) -> int:
        return len(self.out_layers) * self.hidden_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "TextEncoderConfig":
        """From a transformers Qwen3 config.json; rejects features this port does not implement."""
        if data.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={data['hidden_act']!r}: only 'silu' is supported")
        if data.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=True is not supported (Qwen3-4B/8B use full attention)")
        if data.get("attention_bias", False):
            raise ValueError("attention_bias=True is not supported (Qwen3 has none)")
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported")
        theta = rope.get("rope_theta", data.get("rope_theta", cls.rope_theta))
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "out_layers", "max_sequence_length"}
        kwargs = {k: data[k] for k in fields if k in data}
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = data["num_attention_heads"]
        return cls(rope_theta=float(theta), **kwargs, **overrides)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> "TextEncoderConfig":
        return cls.from_dict(_read_json(path), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Qwen/Qwen3-4B config.json, the text encoder of klein-4B (klein.md §1.3).
QWEN3_4B = TextEncoderConfig(hidden_size=2560, intermediate_size=9728)
# Qwen/Qwen3-8B config.json, the text encoder of klein-9B (klein.md §1.3): 32 query heads of width 128 = hidden_size.
QWEN3_8B = TextEncoderConfig(hidden_size=4096, intermediate_size=12288)
TINY_TEXT_ENCODER = dataclasses.replace(
    QWEN3_4B, vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, out_layers=(1, 2, 3),
)
# Qwen3-8B's proportions at test size: 4 query heads per key/value head, query width = hidden_size.
TINY_9B_TEXT_ENCODER = dataclasses.replace(
    QWEN3_8B, vocab_size=1024, hidden_size=48, intermediate_size=144, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=1, head_dim=12, out_layers=(1, 2, 3),
)
