"""Conversion of published PyTorch klein checkpoints to Flax NNX parameters."""
