"""Inference from a run: generation, constrained decoding, evaluate, predict and merge."""
