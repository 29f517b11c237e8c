"""Start the device proxies of one Slurm job step, for the SPANK plugin
(spank/proxies.c).

In slurmstepd, before the step's tasks start and as the job's user, the
plugin runs::

    PYTHON -m slurm_singularity.proxy.step start --devices N --job JOB.STEP

which starts one proxy per device (all at once, then waits until each
serves) and prints the variables the tasks need, one ``NAME=VALUE`` a line
(``SINGULARITY_PROXY``, ``SINGULARITY_PROXY_ADDRS``, ``SINGULARITY_PROXY_JOB``,
``SINGULARITY_WORKER_DEVICE``, ``SINGULARITY_PROXY_STATE``), then exits 0
and leaves the proxies running. On failure it stops what it started,
prints one line on stderr and exits 1; the plugin fails the step with that
line. The plugin itself stops the proxies when the step ends (a helper
started then would be killed by slurmstepd's cleanup).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile

from slurm_singularity import contract
from slurm_singularity.proxy.api import ProxyError, ProxySpecError, start_proxies
from slurm_singularity.proxy.worker import node_env

PREFIX = "singularity-proxy-"


def start(devices: int, job: str, tmp_root: str | None = None) -> int:
    try:
        ring = contract.proxy_ring_bytes()
    except contract.ContractError as exc:
        print(f"a device proxy failed to start: {exc}", file=sys.stderr)
        return 1
    settings = {} if ring is None else {"ring_bytes": ring}
    state = tempfile.mkdtemp(prefix=f"{PREFIX}{job}-", dir=tmp_root)
    try:
        handles = start_proxies(devices, state, **settings)
    except (ProxyError, ProxySpecError, OSError) as exc:
        # a bad setting can only be the ring size the job gave
        named = f"{contract.PROXY_RING_BYTES}: " if isinstance(exc, ProxySpecError) else ""
        print(f"a device proxy failed to start: {named}{exc}", file=sys.stderr)
        shutil.rmtree(state, ignore_errors=True)
        return 1
    env = {**node_env(handles, job), contract.PROXY_STATE: state}
    for name, value in env.items():
        print(f"{name}={value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm_singularity.proxy.step")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start one proxy per device of this step")
    s.add_argument("--devices", type=int, required=True)
    s.add_argument("--job", required=True, help="name the workers attach under (JOB.STEP)")
    s.add_argument("--tmp", default=None, help="where the state directory goes (default: TMPDIR)")
    args = p.parse_args(argv)
    if args.devices < 1:
        print(f"--devices {args.devices}: the step has no device for a proxy", file=sys.stderr)
        return 1
    return start(args.devices, args.job, args.tmp)


if __name__ == "__main__":
    sys.exit(main())
