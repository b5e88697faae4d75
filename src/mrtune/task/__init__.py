"""The task, torch-free: the MR grammar, parser and metrics, the prompts, the ViGGO data."""
