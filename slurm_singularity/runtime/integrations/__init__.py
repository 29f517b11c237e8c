"""Adapters for training clients that are not written against the runtime's
API directly: submitit (``integrations.submitit``) and PyTorch Lightning
(``integrations.lightning``). Each is an optional extra
(``pip install 'slurm-singularity[submitit]'``, ``[lightning]``); importing
one without its package raises ``ImportError`` naming the extra."""
