"""Training: the loop (trainer), the optimizer, checkpoints, metrics and the process group."""
