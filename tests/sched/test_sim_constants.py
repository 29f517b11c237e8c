"""Every constant of the simulator's job model says where its value comes from."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from slurm_singularity import paths
from slurm_singularity.sched.sim import constants

SOURCE = Path(constants.__file__)
ROOT = paths.TEMPLATES_DIR.parent
#: The words a constant's comment must use to say where its value comes from.
KINDS = ("MEASURED by ``bench/", "SLURM:", "CONFIGURED:", "ASSUMPTION", "FROM THE ARTIFACT")


def documented_constants() -> dict[str, str]:
    """Each module-level UPPER_CASE number (or tuple) with the ``#:`` comment above it."""
    lines = SOURCE.read_text().splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(SOURCE.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id.isupper() \
                and isinstance(getattr(constants, node.targets[0].id), (int, float, tuple)):
            k = node.lineno - 2
            comment: list[str] = []
            while k >= 0 and lines[k].startswith("#:"):
                comment.insert(0, lines[k][2:].strip())
                k -= 1
            out[node.targets[0].id] = " ".join(comment)
    return out


def test_every_constant_names_its_provenance():
    docs = documented_constants()
    assert len(docs) >= 20
    missing = [name for name, doc in docs.items() if not any(kind in doc for kind in KINDS)]
    assert not missing, f"constants that do not say where they come from: {missing}"


def test_every_measured_constant_names_a_benchmark_that_exists_and_its_figure():
    measured = {n: d for n, d in documented_constants().items() if "MEASURED by" in d}
    assert {"CHECKPOINT_FIXED_S", "CHECKPOINT_BYTES_PER_S", "RESTART_S", "HANDOVER_S",
            "SLURM_REQUEUE_S", "DAEMON_RESIZE_S", "SPLICE_COST_PER_RANK"} <= set(measured)
    for name, doc in measured.items():
        bench = re.search(r"MEASURED by ``(bench/\w+\.py)``", doc)
        assert bench, name
        assert (ROOT / bench.group(1)).is_file(), (name, bench.group(1))
        assert re.search(r"\d+(\.\d+)? ?(ms|s|MB)\b", doc), f"{name}: no measured figure in {doc!r}"


@pytest.mark.parametrize("name, cited", [
    ("SLURM_PERIOD_S", "templates/slurm.conf.j2"),
    ("DAEMON_SETTLE_S", "sched/executor.py"),
    ("DAEMON_PERIOD_S", "cli/schedd.py"),
])
def test_a_configured_constant_equals_the_setting_it_cites(name, cited):
    value = getattr(constants, name)
    text = (ROOT / "slurm_singularity" / cited).read_text() if cited.startswith(("sched", "cli")) \
        else (ROOT / cited).read_text()
    assert cited in documented_constants()[name]
    assert re.search(rf"(=|default=) ?({value:g}|{value})\b", text), (name, value)


def test_the_checkpoint_line_passes_through_the_two_measured_points():
    doc = documented_constants()["CHECKPOINT_FIXED_S"]
    (mb1, ms1), (mb2, ms2) = [(float(a), float(b)) for a, b in
                              re.findall(r"([\d.]+) MB (?:durable )?in ([\d.]+) ms", doc)[:2]]
    for mb, ms in ((mb1, ms1), (mb2, ms2)):
        assert constants.checkpoint_s(mb * 1e6) == pytest.approx(ms / 1e3, rel=0.02)
