"""Test-only entry: the proxy's worker entry, plus (until the runtime's
``select_device`` consults ``contract.worker_device()`` itself) a patch that
makes it do so. Prints which of the two was used."""

from __future__ import annotations

import inspect
import sys

from slurm_singularity import contract
import slurm_singularity.runtime.job as job

if "worker_device" not in inspect.getsource(job.select_device):
    _orig = job.select_device
    job.select_device = lambda explicit=None: _orig(explicit or contract.worker_device())
    print("runtime_shim: patched select_device", file=sys.stderr)

from slurm_singularity.proxy import worker  # noqa: E402

sys.exit(worker.main(sys.argv[1:]))
