"""Run directories: durable files, the run directory contract, and the run report."""
