"""slurm subsystem."""
