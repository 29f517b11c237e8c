#!/usr/bin/env bash
# Set up everything slurm-singularity needs on a fresh Debian 12 machine, as
# root: Slurm 22.05 and munge from Debian, the Python environment in .venv,
# the SPANK plugin. Idempotent: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge libslurm-dev libmunge-dev
              slurm-wlm-plugins-dev slurmdbd mariadb-server gcc make)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: error: installing system packages needs root" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # The packages start system-wide daemons we do not use: the local cluster
  # runs its own, on its own ports. Stop them by their pid files, if any.
  for pidfile in /run/munge/munged.pid /run/slurmctld.pid /run/slurmd.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
fi

# Jobs run as their users, so the venv's interpreter must be one every user
# can run: Debian's /usr/bin/python3, not one under root's 0700 home (pyenv).
PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}
PYTHON=$(readlink -f "$PYTHON")
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "setup: installing python3-venv"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi
if [ -x .venv/bin/python ] && [ "$(cat .venv/.interpreter 2>/dev/null)" != "$PYTHON" ]; then
  echo "setup: .venv was made with another interpreter than $PYTHON; making it again"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
  echo "$PYTHON" > .venv/.interpreter
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing the package and its dependencies into .venv"
  # Every extra: a checkout runs the runtime, the proxies, the simulator and
  # the tests. A site's controller installs the base package alone
  # (docs/admin-guide.md, "Install").
  .venv/bin/pip install -q --disable-pip-version-check -e '.[runtime,proxy,sim,test]'
  # The "pynvml" distribution is a deprecated wrapper of nvidia-ml-py that
  # warns on every import (every job's log); a venv made before we moved to
  # nvidia-ml-py still has it. Its module pynvml.py belongs to nvidia-ml-py.
  if .venv/bin/pip show -q pynvml >/dev/null 2>&1; then
    .venv/bin/pip uninstall -q -y --disable-pip-version-check pynvml
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi

scripts/setup-criu.sh
make -s -C spank
echo "setup: done"
