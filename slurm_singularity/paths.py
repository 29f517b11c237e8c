"""Where the project's own files are: templates, the SPANK plugin, state.

The templates (policy.toml, the .j2 files) are package data, found through
``importlib.resources`` so that an installed wheel finds them as well as a
checkout. In a checkout ``slurm_singularity/templates`` is a link to the
repository's ``templates/`` (the layout the docs and the harness name), and
the path is resolved through it; in a wheel they are a plain folder inside
the package.

``REPO_ROOT``, ``SPANK_PLUGIN`` and ``DEFAULT_STATE_DIR`` mean something only
in a checkout (the tests, the benches and the local test cluster); a site's
install builds the plugin with ``make -C spank`` and names its own paths.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

TEMPLATES_DIR = Path(str(resources.files(__package__) / "templates")).resolve()
REPO_ROOT = Path(__file__).resolve().parent.parent
SPANK_PLUGIN = REPO_ROOT / "spank" / "singularity.so"
DEFAULT_STATE_DIR = REPO_ROOT / ".state" / "cluster"
