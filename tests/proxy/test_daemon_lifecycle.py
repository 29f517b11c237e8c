"""singularity-proxy writes a pid file, serves, and on SIGTERM closes its
workers' connections and removes its socket and pid file; bad options are
refused with a message naming them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from slurm_singularity.proxy.api import ChannelClosed, ProxyError, start_proxies, stop_proxies
from slurm_singularity.proxy.client import attach


def test_sigterm_stops_the_proxy_cleanly_and_removes_socket_and_pid_file(tmp_path):
    (h,) = start_proxies(1, tmp_path, device="cpu")
    assert int(h.pid_file.read_text()) == h.pid
    dev = attach(h.addr, "lifecycle")
    assert dev.fetch(dev.put(torch.ones(2)) + 1).tolist() == [2.0, 2.0]
    stop_proxies([h])
    assert not h.socket_path.exists() and not h.pid_file.exists()
    assert "proxy stopped" in h.log_file.read_text()
    with pytest.raises((ChannelClosed, ProxyError, OSError)):
        dev.sync()


@pytest.mark.parametrize("argv, words", [
    (["--device", "gpu0", "--socket", "/tmp/x.sock"], "device='gpu0'"),
    (["--device", "cpu", "--socket", "/tmp/x.sock", "--ring-bytes", "1000"], "ring_bytes=1000"),
    (["--device", "cpu"], "--socket"),
])
def test_bad_options_are_refused_with_a_message_naming_them(argv, words):
    r = subprocess.run([sys.executable, "-m", "slurm_singularity.cli.proxy", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert words in r.stderr
