"""Launchers: local multi-process rehearsal, TPU pod slices, SLURM multi-node GPU."""
