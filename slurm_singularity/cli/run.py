"""singularity-run: start a training script on this node's devices.

A thin layer over ``slurm_singularity.runtime.launcher``: parse, resolve
(which raises a clear error for bad input, exit 2), check the checkpoint
directory and key before any work (exit 2 with the reason), launch, and return the
workers' verdict as the exit code (0 finished, 75 = checkpointed for
preemption: requeue me, anything else: failed).
"""

from __future__ import annotations

import argparse
import logging
import sys

from slurm_singularity import contract
from slurm_singularity.cli import extras
from slurm_singularity.runtime.api import CheckpointError, RuntimeSetupError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="singularity-run",
        description="Run a training script with W logical ranks spliced onto D devices "
                    "(one worker per device). Exit 75 means: checkpointed, requeue me.")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="devices on this node (default: SINGULARITY_DEVICES, the number of "
                        "CUDA_VISIBLE_DEVICES, else 1; emulated CPU devices without a GPU)")
    p.add_argument("--world-size", type=int, default=None, metavar="W",
                   help="logical ranks W, a multiple of D (default: SINGULARITY_WORLD_SIZE, "
                        "else D)")
    p.add_argument("--ckpt-dir", default=None, metavar="DIR",
                   help="checkpoint directory (default: SINGULARITY_CKPT_DIR, else derived "
                        "from SLURM_JOB_ID; required outside Slurm)")
    p.add_argument("--ckpt-every-s", type=float, default=None, metavar="T",
                   help="also checkpoint every T seconds (default: SINGULARITY_CKPT_EVERY_S)")
    det = p.add_mutually_exclusive_group()
    det.add_argument("--deterministic", dest="deterministic", action="store_true",
                     default=None, help="bitwise-equal results for every D (default on: "
                                        "SINGULARITY_DETERMINISTIC)")
    det.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                     help="faster reduction (sum locally, then all-reduce)")
    p.add_argument("--proxy", choices=["on", "off"], default=None,
                   help="run each worker's device work through a device proxy that this "
                        "launcher starts, one per device (default: SINGULARITY_PROXY, else off)")
    p.add_argument("-v", "--verbose", action="store_true", help="log the launcher's steps")
    p.add_argument("script", nargs="?", help="the training script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")
    return p


def main(argv: list[str] | None = None) -> int:
    from slurm_singularity.runtime import launcher

    launcher.catch_signals()   # first: a signal during start-up is recorded, not a death
    args = build_parser().parse_args(argv)
    use_proxy = args.proxy == "on" if args.proxy else contract.proxy_enabled()
    if (rc := extras.require("proxy" if use_proxy else "runtime", "singularity-run")) is not None:
        return rc
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")
    try:
        spec = launcher.resolve(args.script or "", args.args, devices=args.devices,
                                world_size=args.world_size, ckpt_dir=args.ckpt_dir,
                                deterministic=args.deterministic,
                                ckpt_every_s=args.ckpt_every_s)
        check_checkpoints(spec.ckpt_dir)
    except (RuntimeSetupError, contract.ContractError, CheckpointError) as exc:
        print(f"singularity-run: error: {exc}", file=sys.stderr)
        return 2
    if not use_proxy:
        return launcher.launch(spec)
    return _launch_with_proxies(launcher, spec)


def check_checkpoints(ckpt_dir) -> None:
    """Before any work: the checkpoint directory is private and writable,
    and the key that signs checkpoints can be had (made on first use).

    :raises CheckpointError: names the path and the rule.
    """
    from slurm_singularity.runtime import ckptdir, signing

    ckptdir.prepare(ckpt_dir)
    signing.load_key()
    contract.ckpt_accept_unsigned()     # a malformed value fails here, not at restore


def _launch_with_proxies(launcher, spec) -> int:
    """Use the step's device proxies when the SPANK plugin started them;
    else start one per device of this node, point the workers at them (the
    contract variables), run, and stop the proxies by pid."""
    import os
    import shutil
    import tempfile

    from slurm_singularity.proxy.api import ProxyError, stop_proxies
    from slurm_singularity.proxy.worker import start_node_proxies

    started_by_slurm = contract.proxy_addrs()
    if started_by_slurm:
        if len(started_by_slurm) < spec.devices_per_node:
            print(f"singularity-run: error: the step has {len(started_by_slurm)} device "
                  f"proxies ({contract.PROXY_ADDRS}) for {spec.devices_per_node} devices",
                  file=sys.stderr)
            return 2
        print(f"singularity-run: using the step's {len(started_by_slurm)} device proxies "
              f"(started by the SPANK plugin)", file=sys.stderr)
        return launcher.launch(spec)
    job = contract.proxy_job() or contract.slurm_job_id() or "local"
    state = tempfile.mkdtemp(prefix="singularity-proxy-")   # short: socket paths
    try:
        handles, extra = start_node_proxies(spec.devices_per_node, state, job)
    except (ProxyError, OSError, contract.ContractError) as exc:
        print(f"singularity-run: error: a device proxy failed to start: {exc}", file=sys.stderr)
        return 1
    os.environ.update(extra)   # the launcher hands its environment to the workers
    try:
        return launcher.launch(spec)
    finally:
        stop_proxies(handles)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
