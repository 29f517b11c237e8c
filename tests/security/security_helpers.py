"""Helpers of the security tests: the security policy's text and sbatch as
an unprivileged user."""

from __future__ import annotations

import getpass
import subprocess

from slurm_singularity.policy import default_policy_path


def security_policy_text() -> str:
    text = default_policy_path().read_text()
    members = sorted({"root", getpass.getuser()})
    text = text.replace("[accounts.research]\n",
                        f"[accounts.research]\nmembers = {members!r}\n".replace("'", '"'))
    return text + '''
[accounts.small]
tiers = ["basic"]
gpu_quota = 2
members = ["sing-u1"]

[accounts.team2]
tiers = ["standard", "basic"]
gpu_quota = 8
members = ["sing-u2"]
'''


def submit(cluster, user, *argv: str, script: str = "sleep 300") -> subprocess.CompletedProcess:
    """sbatch as ``user`` (output to /dev/null)."""
    return user.run("sbatch", "--parsable", "-o", "/dev/null", *argv, "--wrap", script,
                    env=cluster.env)
