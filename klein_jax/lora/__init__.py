"""LoRA adapters (shared/spec/interfaces.md, "LoRA adapters"; docs/lora.md).

  files.py     a .safetensors file, a folder or a hub id -> raw tensors + PEFT metadata
  formats.py   kohya / BFL / ComfyUI / PEFT / diffusers namings -> diffusers module names (every key placed or named)
  adapter.py   diffusers module names -> our linear layers, shapes checked, PEFT scaling folded in
  registry.py  the adapters a pipeline holds, the active ones, padded device factors per adapter set
  lokr.py      LoKr files (every naming diffusers reads for FLUX.2) -> Kronecker terms; the delta without kron()
  apply.py     LoraLayout (the static part of a program) and apply_lora (the factors inside a traced transformer)
"""

from klein_jax.lora.adapter import LoraAdapter, build_adapter
from klein_jax.lora.apply import LoraLayout, apply_lora
from klein_jax.lora.files import LORA_WEIGHT_NAME, read_lora_file
from klein_jax.lora.formats import to_diffusers_modules
from klein_jax.lora.registry import Combination, LoraAdapters, linear_targets

__all__ = ["LORA_WEIGHT_NAME", "Combination", "LoraAdapter", "LoraAdapters", "LoraLayout", "apply_lora",
           "build_adapter", "linear_targets", "read_lora_file", "to_diffusers_modules"]
