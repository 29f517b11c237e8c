"""singularity-proxy writes a pid file, serves, and on SIGTERM closes its
workers' connections and removes its socket and pid file; bad options are
refused with a message naming them."""

from __future__ import annotations

import os
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
    (["--device", "cpu", "--socket", "/tmp/x.sock", "--ring-bytes", str(1 << 40)],
     f"ring_bytes={1 << 40}: a power of two in [4096, {1 << 30}]"),
    (["--device", "cpu", "--socket", "/tmp/x.sock", "--max-message-bytes", str(10 ** 15)],
     f"max_message_bytes={10 ** 15}: must be in [64, {1 << 36}]"),
    (["--device", "cpu", "--socket", "/tmp/x.sock", "--threads", "100000"],
     "threads=100000: must be in [0, 1024]"),
    (["--device", "cpu", "--socket", "/tmp/x.sock", "--threads", "-1"], "threads=-1"),
    (["--device", "cpu"], "--socket"),
    (["--device", "cpu", "--socket", "/tmp/x.sock", "--cpus", "one"], "--cpus 'one'"),
    (["--device", "cpu", "--socket", "/tmp/x.sock", "--cpus", "-1"], "cpus=(-1,)"),
])
def test_bad_options_are_refused_with_a_message_naming_them(argv, words):
    r = subprocess.run([sys.executable, "-m", "slurm_singularity.cli.proxy", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert words in r.stderr


def test_a_proxy_given_cpus_runs_on_those_alone(tmp_path):
    last = max(os.sched_getaffinity(0))
    (h,) = start_proxies(1, tmp_path, device="cpu", cpus=(last,))
    try:
        assert os.sched_getaffinity(h.pid) == {last}
        dev = attach(h.addr, "pinned")
        assert dev.fetch(dev.put(torch.ones(2)) * 3).tolist() == [3.0, 3.0]
        dev.close()
    finally:
        stop_proxies([h])


def test_a_proxy_refuses_cpus_it_may_not_use(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slurm_singularity.cli.proxy", "--device", "cpu",
                        "--socket", str(tmp_path / "p.sock"), "--cpus", "4095"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "cpus=4095: this process may not run there" in r.stderr
    assert not (tmp_path / "p.sock").exists()
