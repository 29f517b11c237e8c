#!/usr/bin/env bash
# Run every benchmark under bench/ and print its JSON verdict line. A
# benchmark that crashes fails `make bench`; a missed goal shows as ok=false.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
results=()
for b in bench/*.py; do
  [ -e "$b" ] || continue
  case "$(basename "$b")" in _*) continue ;; esac   # helpers, not benchmarks
  echo "== $b" >&2
  out=$(.venv/bin/python "$b" 2>&1 | tee /dev/stderr)
  rc=$?
  last=$(printf '%s\n' "$out" | tail -n 1)
  if [ $rc -ne 0 ] || ! printf '%s' "$last" | .venv/bin/python -c 'import json,sys; json.loads(sys.stdin.read())' 2>/dev/null; then
    echo "bench: $b failed (exit $rc)" >&2; status=1
  else
    results+=("$last")
  fi
done
echo
echo "Benchmarks:"
for r in "${results[@]}"; do echo "  $r"; done
exit $status
