"""Flax NNX modules: the flow transformer, the FLUX.2 VAE and the Qwen3 text encoder."""
