"""klein-jax: FLUX.2 [klein] in JAX / Flax NNX."""

from klein_jax.configs import (
    FLUX2_VAE,
    KLEIN_4B,
    KLEIN_9B,
    QWEN3_4B,
    QWEN3_8B,
    TINY_TEXT_ENCODER,
    TINY_TRANSFORMER,
    TINY_VAE,
    TextEncoderConfig,
    TransformerConfig,
    VAEConfig,
)

__all__ = [
    "FLUX2_VAE", "KLEIN_4B", "KLEIN_9B", "QWEN3_4B", "QWEN3_8B", "TINY_TEXT_ENCODER", "TINY_TRANSFORMER", "TINY_VAE",
    "KleinPipeline", "TextEncoderConfig", "TransformerConfig", "VAEConfig",
]


def __getattr__(name):
    # KleinPipeline pulls in every model module; import it on first use only.
    if name == "KleinPipeline":
        from klein_jax.pipeline import KleinPipeline

        return KleinPipeline
    raise AttributeError(f"module 'klein_jax' has no attribute {name!r}")
