"""LoRA fine-tuning with optax (klein-train-lora; docs/lora.md).

  data.py        the image + caption folder, checked whole; aspect buckets; the data order per epoch
  step.py        TrainConfig, flow-matching loss (diffusers' klein dreambooth script), AdamW + clipping + schedule
  checkpoint.py  Orbax checkpoints (factors, optimiser state, step, data order)
  export.py      the adapter in the diffusers/PEFT layout
  trainer.py     LoraTrainer: caches, the loop, metrics.jsonl
  cli.py         klein-train-lora
"""
