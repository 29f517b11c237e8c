"""The one reader of Slurm's GRES and TRES spellings.

Why one: GPU counts were read in five places that disagreed (for
``gpu:8(S:0-1)`` one said 8 and the submission rules 1; for ``gres/gpu=2``
one said 2 and another 0). Every count of GPUs in this project, from squeue,
sinfo, sacct, ``scontrol show job`` or a submission's ``tres_per_*``, goes
through ``parse`` here; ``job_submit.lua`` carries the same rules in Lua
(``templates/job_submit.lua.j2``, ``gpus_in_tres``) and a test holds the two
to the same table.

The spellings Slurm 22.05 prints (all tested):

- GRES form, ``NAME[:TYPE][:COUNT][(DETAIL)]``, optionally prefixed
  ``gres:`` or ``gres/``: sinfo's ``gpu:8`` and ``gpu:8(S:0-1)``, typed
  ``gpu:a100:4(S:0-1)``, a submission's ``gres:gpu:2`` (22.05) or
  ``gres/gpu:2`` (later), squeue's ``gres_detail`` ``gpu:2(IDX:0-1)``; a
  missing count is 1 (``gpu``, ``gres:gpu:``).
- TRES form, ``gres/NAME[:TYPE]=COUNT`` among ``cpu=``, ``mem=``, ``node=``,
  ``billing=`` (``tres_req_str``, sacct's ``AllocTRES``). A typed entry there
  is a breakdown of the untyped one (``gres/gpu=4,gres/gpu:a100=4`` is 4
  GPUs), so the typed entries count only where no untyped one is given.
- Nothing: ``""``, ``N/A``, ``(null)``, ``None``.
- Several entries comma-separated (commas inside a detail's parentheses do
  not separate entries).

Per node or per job is not a spelling but a field: ``tres_per_node`` is per
node, ``tres_per_job`` and ``tres_req_str`` are the whole job's; the typed
job record (``cli.py``) multiplies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .api import SlurmOutputError

#: What Slurm prints for "no GRES".
EMPTY = frozenset({"", "N/A", "(null)", "None", "none"})
#: A count: digits with an optional binary suffix (Slurm prints ``mps:1K``).
_COUNT = re.compile(r"^(\d+)([KMGT]?)$")
_SUFFIX = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
#: Split at commas that are not inside parentheses.
_ENTRIES = re.compile(r",(?![^(]*\))")


@dataclass(frozen=True)
class Gres:
    """One GRES entry: ``gpu:a100:4(S:0-1)`` is ``Gres("gpu", "a100", 4, "0-1")``."""

    name: str                  # "gpu", "mps", "craynetwork", ...
    type: str | None           # "a100"; None when untyped
    count: int
    sockets: str | None = None  # "(S:0-1)": the sockets it is bound to
    indices: str | None = None  # "(IDX:0-3)": the device indices it holds
    #: Read from a TRES string (``gres/gpu=2``), not a GRES one.
    tres: bool = False


def _count(text: str, entry: str, source: str) -> int:
    m = _COUNT.match(text)
    if not m:
        raise SlurmOutputError(source, entry, f"count {text} is not a whole number")
    return int(m.group(1)) * _SUFFIX[m.group(2)]


def _detail(text: str) -> tuple[str | None, str | None]:
    """``S:0-1`` / ``IDX:0-3`` / ``S:0,IDX:0-1`` -> (sockets, indices)."""
    found: dict[str, str] = {}
    for part in re.split(r",(?=(?:S|IDX):)", text):
        key, _, value = part.partition(":")
        found[key] = value
    return found.get("S"), found.get("IDX")


def _entry(entry: str, source: str) -> Gres | None:
    body, paren, rest = entry.partition("(")
    sockets = indices = None
    if paren:
        if not rest.endswith(")"):
            raise SlurmOutputError(source, entry, "unbalanced parenthesis")
        sockets, indices = _detail(rest[:-1])
    body = body.strip()
    if "=" in body:
        key, _, value = body.partition("=")
        if not key.startswith("gres/"):
            return None                       # cpu=, mem=, node=, billing=, license/...
        name, _, typ = key[len("gres/"):].partition(":")
        return Gres(name, typ or None, _count(value.strip(), entry, source), sockets, indices,
                    tres=True)
    for prefix in ("gres:", "gres/"):
        if body.startswith(prefix):
            body = body[len(prefix):]
            break
    parts = body.split(":")
    name, rest_parts = parts[0], parts[1:]
    if not name:
        raise SlurmOutputError(source, entry, "no GRES name")
    count = 1
    if rest_parts and (rest_parts[-1] == "" or _COUNT.match(rest_parts[-1])):
        last = rest_parts.pop()
        count = _count(last, entry, source) if last else 1
    typ = ":".join(rest_parts) or None
    return Gres(name, typ, count, sockets, indices)


def parse(text: str | None, source: str = "gres") -> tuple[Gres, ...]:
    """Every GRES entry of ``text`` (TRES entries other than ``gres/`` dropped).

    :raises SlurmOutputError: an entry that is not one of the spellings above
        (names ``source``, the field it came from, and the entry).
    """
    if text is None or text.strip() in EMPTY:
        return ()
    out = []
    for raw in _ENTRIES.split(text.strip()):
        raw = raw.strip()
        if raw and raw not in EMPTY:
            g = _entry(raw, source)
            if g is not None:
                out.append(g)
    return tuple(out)


def count(text: str | None, name: str = "gpu", source: str = "gres") -> int:
    """How many of GRES ``name`` ``text`` holds: typed entries summed; in a
    TRES string the untyped total where there is one.

    :raises SlurmOutputError: as ``parse``.
    """
    entries = [g for g in parse(text, source) if g.name == name]
    untyped_tres = [g for g in entries if g.tres and g.type is None]
    if untyped_tres:
        return sum(g.count for g in untyped_tres) + sum(
            g.count for g in entries if not g.tres)
    return sum(g.count for g in entries)


def gpus(text: str | None, source: str = "gres") -> int:
    """GPUs in a GRES or TRES string; 0 for none. :raises SlurmOutputError:"""
    return count(text, "gpu", source)


def request(count: int, name: str = "gpu") -> str:
    """A GRES request as ``scontrol update TresPerNode=`` takes it in 22.05:
    ``request(8)`` -> ``gres:gpu:8``."""
    return f"gres:{name}:{count}"
