"""The policy file's model: tiers, accounts, defaults, elastic rules.

Pure code: no I/O beyond parsing the text handed in. See ``api.py`` (value
types), ``load.py`` (TOML -> Policy, fail closed), ``rules.py`` (what the
policy does with one submission), ``render.py`` (policy.conf and
job_submit.lua).
"""

from __future__ import annotations

from pathlib import Path


def default_policy_path() -> Path:
    """The documented default policy, ``templates/policy.toml``."""
    from .. import paths
    return paths.TEMPLATES_DIR / "policy.toml"
