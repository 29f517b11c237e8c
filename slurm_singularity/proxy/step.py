"""The device proxies of one Slurm job step, started and stopped for the
SPANK plugin (spank/remote.c).

In slurmstepd, before the step's tasks start and as the job's user, the
plugin runs::

    PYTHON -m slurm_singularity.proxy.step start --devices N --job JOB.STEP

which starts one proxy per device (all at once, then waits until each
serves) and prints the variables the tasks need, one ``NAME=VALUE`` a line
(``SINGULARITY_PROXY``, ``SINGULARITY_PROXY_ADDRS``, ``SINGULARITY_PROXY_JOB``,
``SINGULARITY_WORKER_DEVICE``, ``SINGULARITY_PROXY_STATE``), then exits 0
and leaves the proxies running. On failure it stops what it started,
prints one line on stderr and exits 1; the plugin fails the step with that
line. When the step ends (after the tasks, so after their last checkpoint)
the plugin runs::

    PYTHON -m slurm_singularity.proxy.step stop --state-dir DIR

which stops each proxy by the pid in its pid file (only a process whose
command line names that proxy's socket: a pid that was reused is left
alone), then deletes DIR.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from slurm_singularity import contract
from slurm_singularity.proxy.api import (
    ProxyError, ProxyHandle, ProxySpecError, start_proxies, stop_proxies,
)
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
        named = f"{contract.PROXY_RING_BYTES}: " if ring is not None else ""
        print(f"a device proxy failed to start: {named}{exc}", file=sys.stderr)
        shutil.rmtree(state, ignore_errors=True)
        return 1
    env = {**node_env(handles, job), contract.PROXY_STATE: state}
    for name, value in env.items():
        print(f"{name}={value}")
    return 0


def stop(state_dir: Path) -> int:
    if not state_dir.name.startswith(PREFIX) or not state_dir.is_dir():
        print(f"{state_dir} is not a step's proxy directory; leaving it alone", file=sys.stderr)
        return 2
    stop_proxies(_running(state_dir))
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def _running(state_dir: Path) -> list[ProxyHandle]:
    """Handles of the proxies whose pid files are in ``state_dir`` and whose
    process is still that proxy (its command line names the socket)."""
    handles = []
    for pid_file in sorted((state_dir / "proxy").glob("*.pid")):
        socket = pid_file.with_suffix("")
        try:
            pid = int(pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if os.fsencode(str(socket)) in cmdline:
            handles.append(ProxyHandle("?", socket, pid, pid_file))
    return handles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm_singularity.proxy.step")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start one proxy per device of this step")
    s.add_argument("--devices", type=int, required=True)
    s.add_argument("--job", required=True, help="name the workers attach under (JOB.STEP)")
    s.add_argument("--tmp", default=None, help="where the state directory goes (default: TMPDIR)")
    t = sub.add_parser("stop", help="stop a step's proxies and delete their directory")
    t.add_argument("--state-dir", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "start":
        if args.devices < 1:
            print(f"--devices {args.devices}: the step has no device for a proxy",
                  file=sys.stderr)
            return 1
        return start(args.devices, args.job, args.tmp)
    return stop(args.state_dir)


if __name__ == "__main__":
    sys.exit(main())
