#!/usr/bin/env bash
# CRIU for transparent mode (`sbatch --transparent`). Called by setup.sh.
#
# Why a build: Debian 12's criu 3.17 fails `criu check` on kernels >= 6.13
# ("vdso: Unexpected rt vDSO area bounds"; the [vvar_vclock] mapping needs
# CRIU >= 4.1), and no registry these machines reach has a newer one. So:
#   1. a criu on PATH or at $CRIU_PREFIX/sbin/criu that passes `criu check`
#      and is >= 4.1 is used as it is (a site's own package);
#   2. else CRIU 4.2 is built from its source tarball, found as
#      $SINGULARITY_CRIU_TARBALL, else <checkout>/../shared/vendor/, else (for
#      a git worktree) <main checkout>/../shared/vendor/; installed as
#      $CRIU_PREFIX/sbin/criu. A second run finds it and does nothing.
# Without a tarball this prints one message and leaves transparent mode off
# (jobs asking for it are refused at step start with the same message);
# everything else works.
set -euo pipefail
cd "$(dirname "$0")/.."

CRIU_VERSION=4.2
CRIU_SHA256=7e705f59d18a90b39b4f6b029a26eea46346d90085c654ad9ac187cd9f7f3306
CRIU_PREFIX=${CRIU_PREFIX:-/usr/local}
BUILD_DIR=${SINGULARITY_CRIU_BUILD_DIR:-/var/cache/slurm-singularity}
CRIU_BUILD_DEPS=(libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
                 python3-protobuf libcap-dev libnl-3-dev libnet1-dev pkg-config libbsd-dev
                 libaio-dev libgnutls28-dev uuid-dev gcc make)

# A criu that is recent enough and works on this kernel.
usable() {
  local bin=$1 v
  [ -x "$bin" ] || return 1
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p')
  [ -n "$v" ] || return 1
  # >= 4.1: major > 4, or major 4 and minor >= 1.
  local major=${v%%.*} rest=${v#*.}; local minor=${rest%%.*}
  { [ "$major" -gt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -ge 1 ]; }; } || return 1
  "$bin" check >/dev/null 2>&1
}

for bin in "$CRIU_PREFIX/sbin/criu" "$(command -v criu || true)"; do
  if [ -n "$bin" ] && usable "$bin"; then
    exit 0
  fi
done

find_tarball() {
  local name=criu-$CRIU_VERSION.tar.gz main
  if [ -n "${SINGULARITY_CRIU_TARBALL:-}" ]; then
    echo "$SINGULARITY_CRIU_TARBALL"; return
  fi
  if [ -f "../shared/vendor/$name" ]; then
    echo "$PWD/../shared/vendor/$name"; return
  fi
  main=$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
  if [ -n "$main" ] && [ -f "$(dirname "$main")/../shared/vendor/$name" ]; then
    echo "$(dirname "$main")/../shared/vendor/$name"; return
  fi
}

tarball=$(find_tarball)
if [ -z "$tarball" ] || [ ! -f "$tarball" ]; then
  echo "setup: transparent mode is off: no working CRIU >= 4.1 (\`criu check\`) and" \
       "no source to build one: set SINGULARITY_CRIU_TARBALL to criu-$CRIU_VERSION.tar.gz" \
       "(tried ${SINGULARITY_CRIU_TARBALL:-../shared/vendor/criu-$CRIU_VERSION.tar.gz})" >&2
  exit 0
fi
if [ "$(sha256sum "$tarball" | cut -d' ' -f1)" != "$CRIU_SHA256" ]; then
  echo "setup: error: $tarball is not CRIU $CRIU_VERSION (sha256 differs)" >&2; exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: error: building CRIU into $CRIU_PREFIX needs root" >&2; exit 1
fi

missing=()
for p in "${CRIU_BUILD_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing CRIU's build dependencies: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

echo "setup: building CRIU $CRIU_VERSION from $tarball (about 2 minutes)"
start=$(date +%s)
mkdir -p "$BUILD_DIR"
rm -rf "$BUILD_DIR/criu-$CRIU_VERSION"
tar xzf "$tarball" -C "$BUILD_DIR"
make -s -C "$BUILD_DIR/criu-$CRIU_VERSION" -j"$(nproc)" criu >"$BUILD_DIR/criu-build.log" 2>&1 || {
  echo "setup: error: building CRIU failed; last lines of $BUILD_DIR/criu-build.log:" >&2
  tail -20 "$BUILD_DIR/criu-build.log" >&2; exit 1; }
install -D -m 0755 "$BUILD_DIR/criu-$CRIU_VERSION/criu/criu" "$CRIU_PREFIX/sbin/criu"
if ! "$CRIU_PREFIX/sbin/criu" check >/dev/null 2>&1; then
  echo "setup: error: the CRIU just built fails \`$CRIU_PREFIX/sbin/criu check\`:" >&2
  "$CRIU_PREFIX/sbin/criu" check >&2 || true; exit 1
fi
echo "setup: CRIU $CRIU_VERSION installed as $CRIU_PREFIX/sbin/criu in $(( $(date +%s) - start )) s"
