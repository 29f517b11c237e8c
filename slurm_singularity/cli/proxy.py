"""singularity-proxy: the device proxy daemon, one per physical device.

Thin layer over :mod:`slurm_singularity.proxy.server`: parse options, set up
logging, install the SIGTERM/SIGINT handlers (they only set a flag; the
serve loop then closes connections, removes the socket and the pid file).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from slurm_singularity.cli import extras
from slurm_singularity.proxy.api import ProxySettings, ProxySpecError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="singularity-proxy",
                                description="Own one device and serve its workers over "
                                            "shared memory.")
    p.add_argument("--device", required=True,
                   help="GPU index (as seen in CUDA_VISIBLE_DEVICES) or 'cpu' for the "
                        "emulated device")
    p.add_argument("--socket", required=True, type=Path,
                   help="handshake socket path; its directory is made 0700")
    p.add_argument("--pid-file", type=Path, default=None,
                   help="pid file (default: SOCKET.pid)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the CPU device (0: torch default)")
    p.add_argument("--ring-bytes", type=int, default=1 << 22,
                   help="size of each shared ring in bytes, a power of two (default 4 MiB)")
    p.add_argument("--max-message-bytes", type=int, default=1 << 30,
                   help="largest message a worker may send, bytes (default 1 GiB)")
    p.add_argument("--cpus", default=None,
                   help="CPUs to run on, comma-separated (default: those inherited)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (rc := extras.require("proxy", "singularity-proxy")) is not None:
        return rc
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s singularity-proxy %(levelname)s %(message)s")
    try:
        cpus = None
        if args.cpus is not None:
            try:
                cpus = tuple(int(c) for c in args.cpus.split(","))
            except ValueError:
                raise ProxySpecError(f"--cpus {args.cpus!r}: comma-separated CPU numbers "
                                     "expected") from None
        settings = ProxySettings(device=args.device, socket_path=args.socket,
                                 pid_file=args.pid_file, threads=args.threads,
                                 ring_bytes=args.ring_bytes,
                                 max_message_bytes=args.max_message_bytes, cpus=cpus)
    except ProxySpecError as err:
        print(f"singularity-proxy: {err}", file=sys.stderr)
        return 2
    from slurm_singularity.proxy.server import ProxyServer

    try:
        server = ProxyServer(settings)
        server.bind()
    except (OSError, RuntimeError, ProxySpecError) as err:
        print(f"singularity-proxy: cannot serve device {args.device} on {args.socket}: {err}",
              file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _f: server.stop(signal.Signals(signum).name))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
