"""Glue between a launcher and the device proxy: run a training script as a
worker whose device is its device's proxy.

    python -m slurm_singularity.proxy.worker SCRIPT [ARGS...]

Why a separate entry point: the runtime and the proxy never import each
other. A launcher that has the proxy on (``contract.proxy_enabled()``) runs
its workers under ``contract.PROXY_WORKER_MODULE`` instead of running SCRIPT
directly; this module attaches to the proxy of the worker's device
(``SINGULARITY_PROXY_ADDRS[device rank]``, job name from the contract),
makes the meta device mean that proxy (:class:`ProxyMode`), sets
``SINGULARITY_WORKER_DEVICE=meta`` for the runtime to pick up, and runs
SCRIPT as ``__main__``. Random operators draw from the worker's CPU
generator (``rng="worker"``), so the runtime's per-rank RNG streams and
checkpoints govern them exactly as without the proxy.

``start_node_proxies`` is what ``singularity-run`` calls outside Slurm (under
Slurm the SPANK plugin starts the proxies and sets the same variables).
"""

from __future__ import annotations

import logging
import os
import runpy
import sys
from pathlib import Path
from typing import Mapping

from slurm_singularity import contract
from slurm_singularity.proxy.api import ProxyError, ProxyHandle, start_proxies

log = logging.getLogger(__name__)


def proxy_address(environ: Mapping[str, str] | None = None) -> str:
    """Socket of this worker's device proxy.

    :raises ProxyError: no proxies are listed in the contract.
    """
    addrs = contract.proxy_addrs(environ)
    if not addrs:
        raise ProxyError(f"{contract.PROXY_ADDRS} is empty: no device proxy to attach to")
    return addrs[contract.device_rank(environ) % len(addrs)]


def job_name(environ: Mapping[str, str] | None = None) -> str:
    """Name this worker attaches under: the job, then its device rank."""
    base = contract.proxy_job(environ) or contract.slurm_job_id(environ) or "local"
    return f"{base}.dev{contract.device_rank(environ)}"


def node_env(handles: list[ProxyHandle], job: str) -> dict[str, str]:
    """Contract variables a launcher passes to its workers so that they use
    the proxies in ``handles`` (one per device, in device order)."""
    return {contract.PROXY: "on", contract.PROXY_ADDRS: ",".join(h.addr for h in handles),
            contract.PROXY_JOB: job, contract.WORKER_DEVICE: "meta"}


def start_node_proxies(devices: int, state_dir: str | os.PathLike,
                       job: str) -> tuple[list[ProxyHandle], dict[str, str]]:
    """Start one proxy per device of this node (GPUs when NVML sees enough,
    else emulated) and return them with the workers' environment additions.
    Stop them with ``api.stop_proxies(handles)`` when the launcher ends.

    :raises contract.ContractError: a malformed ``SINGULARITY_PROXY_RING_BYTES``.
    """
    ring = contract.proxy_ring_bytes()
    handles = start_proxies(devices, Path(state_dir),
                            **({} if ring is None else {"ring_bytes": ring}))
    return handles, node_env(handles, job)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m slurm_singularity.proxy.worker SCRIPT [ARGS...]",
              file=sys.stderr)
        return 2
    from slurm_singularity.proxy.client import attach

    try:
        dev = attach(proxy_address(), job_name(), rng="worker")
    except (ProxyError, OSError) as err:
        print(f"singularity worker: cannot attach to the device proxy: {err}", file=sys.stderr)
        return 1
    os.environ.setdefault(contract.WORKER_DEVICE, "meta")
    script = argv[0]
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    mode = dev.mode()
    mode.__enter__()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        mode.__exit__(None, None, None)
        dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
