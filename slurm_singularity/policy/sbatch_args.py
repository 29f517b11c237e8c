"""sbatch options -> ``rules.Submission``, the way sbatch would hand them to
job_submit.lua, so ``singularity-admin job explain`` can run the rules on a
command line a user is about to type.

Pure: the caller reads a batch script (for its ``#SBATCH`` lines) and passes
the text in. Only the options that the rules look at are understood; the
others are returned so the caller can say they were ignored.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import replace

from .api import PolicyError
from .rules import Submission


class SbatchArgsError(PolicyError):
    """An option the rules need is malformed; the message names it."""


#: long option -> (Submission field, how to convert the value)
_VALUE_OPTIONS = {
    "--sla": "sla", "--elastic": "elastic", "--world-size": "world_size",
    "--ckpt-dir": "ckpt_dir", "--proxy": "proxy", "--deterministic": "deterministic",
    "--account": "account", "--partition": "partition",
    "--gres": "tres_per_node", "--gpus": "tres_per_job", "--gpus-per-node": "tres_per_node",
    "--gpus-per-socket": "tres_per_socket", "--gpus-per-task": "tres_per_task",
    "--nodes": "min_nodes", "--ntasks": "num_tasks", "--sockets-per-node": "sockets_per_node",
}
#: options without a value -> (Submission field); the value is "" as in
#: job_submit.lua's spank_job_env.
_FLAG_OPTIONS = {"--transparent": "transparent"}
_SHORT = {"-A": "--account", "-p": "--partition", "-G": "--gpus", "-N": "--nodes",
          "-n": "--ntasks"}
_SBATCH_LINE = re.compile(r"^#SBATCH\s+(.*)$")


#: The largest count (nodes, tasks, GPUs) an option may give; sbatch's own
#: limits are lower still.
MAX_COUNT = 1_000_000
#: A GPU request: ``gpu``, ``gpu:N``, ``gpu:TYPE:N`` (a type starts with a letter,
#: so ``gpu:-3`` is a bad count, not a type).
_GPU_SPEC = re.compile(r"^gpu(?::[A-Za-z][A-Za-z0-9_.-]*)?(?::(\d+))?$")


def _gpu_tres(option: str, value: str) -> str:
    """``--gpus=4`` / ``--gpus=a100:4`` -> ``gres:gpu:4`` / ``gres:gpu:a100:4``;
    ``--gres=gpu:4,foo:1`` -> ``gres:gpu:4,gres:foo:1`` (what sbatch sends).

    :raises SbatchArgsError: a GPU count that is not a whole number in
        0..MAX_COUNT (``gpu:-3``, ``gpu:nan``: sbatch refuses those too).
    """
    parts = ([part.strip() for part in value.split(",") if part.strip()] if option == "--gres"
             else ["gpu:" + value])
    for part in parts:
        if part.split(":", 1)[0] != "gpu":
            continue
        m = _GPU_SPEC.match(part)
        if not m or (m.group(1) is not None and int(m.group(1)) > MAX_COUNT):
            raise SbatchArgsError(f"{option}={value}: a GPU count must be a whole number "
                                  f"between 0 and {MAX_COUNT} (gpu:N or gpu:TYPE:N)")
    return ",".join("gres:" + part for part in parts)


def _count(option: str, value: str) -> int:
    head = value.split("-", 1)[0]     # --nodes=2-4: the minimum
    if (not head.isascii() or not head.isdigit() or not 1 <= int(head) <= MAX_COUNT):
        raise SbatchArgsError(f"{option}={value}: expected a whole number between 1 and "
                              f"{MAX_COUNT}")
    return int(head)


def script_options(script: str) -> list[str]:
    """The options of a batch script's ``#SBATCH`` lines (up to its first command)."""
    out: list[str] = []
    for line in script.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not stripped.startswith("#SBATCH")):
            continue
        m = _SBATCH_LINE.match(stripped)
        if not m:
            break
        out.extend(shlex.split(m.group(1), comments=True))
    return out


def parse_sbatch_args(argv: list[str], script: str | None = None
                      ) -> tuple[Submission, list[str]]:
    """Options (``#SBATCH`` lines of ``script`` first, then ``argv``, so the
    command line wins as in sbatch) -> (Submission, ignored arguments).

    :raises SbatchArgsError: a known option without its value, or a bad count.
    """
    values: dict[str, object] = {}
    ignored: list[str] = []
    args = (script_options(script) if script else []) + list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, sep, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in _SHORT:
            name = _SHORT[name]
        elif arg[:2] in _SHORT and len(arg) > 2:      # -A research, -Aresearch
            name, sep, value = _SHORT[arg[:2]], "=", arg[2:]
        if name in _FLAG_OPTIONS and not sep:
            values[_FLAG_OPTIONS[name]] = ""
            i += 1
            continue
        if name not in _VALUE_OPTIONS:
            ignored.append(arg)
            i += 1
            continue
        if not sep:
            if i + 1 >= len(args):
                raise SbatchArgsError(f"{name} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        field = _VALUE_OPTIONS[name]
        if field.startswith("tres_"):
            values[field] = _gpu_tres(name, value)
        elif field == "min_nodes":
            values["min_nodes"] = _count(name, value)
            low, dash, high = value.partition("-")
            values["max_nodes"] = _count(name, high) if dash else None
        elif field in ("num_tasks", "sockets_per_node"):
            values[field] = _count(name, value)
        else:
            values[field] = value
    return replace(Submission(), **values), ignored
