"""Training: the recipe (setup and loop), its state and checkpoints, batching, and several-GPU helpers."""
