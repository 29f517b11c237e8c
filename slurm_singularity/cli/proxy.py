"""singularity-proxy: not yet implemented (built by a later issue)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("singularity-proxy: not yet implemented", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
