"""Which optional part of the install a command needs, said in one line.

The base install is the controller (policy tools, job_submit.lua's generator,
the scheduler daemon, singularity-admin): no torch, no plots. The commands
that need more check for it before any work, so that a controller-only
install answers ``singularity-run`` or ``simulate`` with the extra to install
and exit code 2, not with a traceback from deep inside an import. The table
mirrors ``[project.optional-dependencies]`` in pyproject.toml
(tests/packaging/ checks that they agree).
"""

from __future__ import annotations

import importlib.util
import sys

#: The modules each extra brings (by import name; nvidia-ml-py is ``pynvml``).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "runtime": ("torch", "numpy", "xxhash"),
    "proxy": ("torch", "numpy", "xxhash", "pynvml"),
    "sim": ("numpy", "matplotlib", "tqdm"),
    "submitit": ("torch", "numpy", "xxhash", "submitit"),
    "lightning": ("torch", "numpy", "xxhash", "pytorch_lightning"),
}

#: Exit code of a command whose extra is not installed (a usage error).
MISSING_EXTRA_EXIT = 2


def missing_modules(extra: str, unused: tuple[str, ...] = ()) -> list[str]:
    """The modules of ``extra`` that cannot be imported here, bar ``unused``
    (those this use of the command does without).

    :raises KeyError: ``extra`` is not one of EXTRA_MODULES.
    """
    return [m for m in EXTRA_MODULES[extra]
            if m not in unused and importlib.util.find_spec(m) is None]


def require(extra: str, command: str, unused: tuple[str, ...] = ()) -> int | None:
    """None when ``extra`` is installed (``unused`` modules aside); else
    print one line naming the extra and the missing modules to stderr and
    return MISSING_EXTRA_EXIT."""
    missing = missing_modules(extra, unused)
    if not missing:
        return None
    print(f"{command}: error: this command needs the '{extra}' extra "
          f"(missing: {', '.join(missing)}); install it with: "
          f"pip install 'slurm-singularity[{extra}]'", file=sys.stderr)
    return MISSING_EXTRA_EXIT
