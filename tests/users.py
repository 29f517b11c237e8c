"""Real unprivileged users for the security tests.

A hostile user is tested as one: a login made with ``useradd`` (uid not 0,
own home, no supplementary groups), running commands through
``subprocess`` with that uid, never root pretending. The accounts are made
once per machine and kept (creating and deleting logins on every run would
race with their leftover processes); their names are fixed so that a site
that runs the suite sees who they are.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: The two hostile users of tests/security/ (u1 attacks, u2 is attacked, or
#: the other way round).
NAMES = ("sing-u1", "sing-u2")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) as this user sees it."""
        env = dict(os.environ if base is None else base)
        env.update(HOME=str(self.home), USER=self.name, LOGNAME=self.name)
        return env

    def run(self, *cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``cmd`` as this user (real and effective uid and gid, no
        supplementary groups) and capture its output as text."""
        return subprocess.run(list(cmd), env=self.env(env), cwd=cwd or self.home,
                              user=self.uid, group=self.gid, extra_groups=[],
                              capture_output=True, text=True, timeout=timeout, check=check)


class UsersUnavailable(RuntimeError):
    """The test process cannot make the users (it is not root)."""


def ensure_users() -> tuple[User, ...]:
    """The users of NAMES, created with ``useradd -m`` where missing.

    :raises UsersUnavailable: not root, or useradd failed (message says why).
    """
    users = []
    for name in NAMES:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            if os.geteuid() != 0:
                raise UsersUnavailable(f"creating test user {name} needs root") from None
            r = subprocess.run(["useradd", "-m", "-U", "-s", "/bin/bash", name],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise UsersUnavailable(f"useradd {name} failed: {r.stderr.strip()}")
            pw = pwd.getpwnam(name)
        home = Path(pw.pw_dir)
        if not home.is_dir():
            home.mkdir(mode=0o700, parents=True)
            os.chown(home, pw.pw_uid, pw.pw_gid)
        users.append(User(name, pw.pw_uid, pw.pw_gid, home))
    return tuple(users)
