"""slurm-singularity: Singularity-style preemptive, elastic scheduling of
deep-learning jobs for Slurm.

Subsystems (see DESIGN.md): ``policy`` (pure model of the policy file),
``slurm`` (the only code that talks to Slurm), ``sched`` (planner, daemon,
simulator), ``runtime`` (what runs inside a job), ``proxy`` (device proxy),
``cluster`` (the local test/demo cluster) and ``cli`` (thin entry points).
"""

__version__ = "0.1.0"
