"""Shared by the benchmarks (not a benchmark: make bench skips files that
start with "_"): load examples/train_lm.py as a module."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"
    spec = importlib.util.spec_from_file_location("train_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
