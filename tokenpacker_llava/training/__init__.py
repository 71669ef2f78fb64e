"""Training: arguments, model building and freezing per stage, the Trainer, checkpoints, LoRA."""
