"""singularity-admin: the administrators' command.

Each group of subcommands lives in its own module ``admin_<group>.py`` that
exposes ``register(subparsers)``; each registered parser sets ``func`` to a
callable ``(args) -> int``. This file only assembles them, so subsystems can
add commands without touching each other's code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Modules that contribute subcommands, in help order. A module that is not
#: there yet (a subsystem still being built) is skipped.
SUBCOMMAND_MODULES = (
    "slurm_singularity.cli.admin_cluster",
    "slurm_singularity.cli.admin_policy",
    "slurm_singularity.cli.admin_job",
    "slurm_singularity.cli.admin_status",
    "slurm_singularity.cli.admin_sim",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="singularity-admin",
        description="Administer slurm-singularity: local cluster, policy, jobs, simulator.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
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
