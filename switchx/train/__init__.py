"""Training: optimizers and schedules, the pure train/eval steps, the loop, checkpoints, metric writers."""
