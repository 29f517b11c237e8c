"""The policy simulator: the project's planner (and two baselines) driven by a
workload trace instead of Slurm. See docs/simulator.md."""
