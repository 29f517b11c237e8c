"""singularity-admin: the administrators' command.

Each group of subcommands lives in its own module ``admin_<group>.py`` that
exposes ``register(subparsers)``; each registered parser sets ``func`` to a
callable ``(args) -> int``. This file only assembles them, so subsystems can
add commands without touching each other's code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

#: Modules that contribute subcommands, in help order.
SUBCOMMAND_MODULES = (
    "slurm_singularity.cli.admin_policy",
    "slurm_singularity.cli.admin_job",
    "slurm_singularity.cli.admin_status",
    "slurm_singularity.cli.admin_sim",
)
#: ``cluster``: the local test cluster, a development tool that a checkout
#: has (the tests, the demo) and an installed wheel does not (pyproject.toml
#: leaves ``slurm_singularity.cluster`` out of the wheel).
HARNESS_MODULE = "slurm_singularity.cli.admin_cluster"
HARNESS_PACKAGE = "slurm_singularity.cluster"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="singularity-admin",
        description="Administer slurm-singularity: local cluster, policy, jobs, simulator.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    names = SUBCOMMAND_MODULES
    if importlib.util.find_spec(HARNESS_PACKAGE) is not None:
        names = (HARNESS_MODULE,) + names
    for name in names:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("singularity-admin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
