"""Where the project's own files are: templates, the SPANK plugin, state.

The package is installed editable from the repository (``make setup``), so
the repository root is the parent of the package directory.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = REPO_ROOT / "templates"
SPANK_PLUGIN = REPO_ROOT / "spank" / "singularity.so"
DEFAULT_STATE_DIR = REPO_ROOT / ".state" / "cluster"
