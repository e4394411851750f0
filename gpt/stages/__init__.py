"""Training objectives plugged into gpt.trainer.Trainer (one module per stage)."""
