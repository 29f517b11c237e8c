"""Fixtures of the device-proxy tests: one emulated (CPU) proxy per test
module, started with ``start_proxies`` and stopped by pid."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from slurm_singularity.proxy.api import (
    ProxyHandle, ProxySettings, start_proxies, start_proxy, stop_proxies,
)
from tests.proxy.rawwire import LIMIT

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> ProxyHandle:
    state = tmp_path_factory.mktemp("proxy-state")
    handles = start_proxies(1, state, device="cpu")
    yield handles[0]
    stop_proxies(handles)


@pytest.fixture(scope="module")
def open_proxy():
    """A proxy whose directory and socket a test opens to everyone, so that
    only the peer-credential check stands between another user and it; it
    also has a small message limit."""
    base = Path(tempfile.mkdtemp(prefix="sgpx-", dir="/tmp"))
    spec = ProxySettings(device="cpu", socket_path=base / "p" / "dev0.sock",
                         max_message_bytes=LIMIT, ring_bytes=1 << 16)
    handle = start_proxy(spec, log_file=base / "dev0.log")
    yield handle
    stop_proxies([handle])
    shutil.rmtree(base, ignore_errors=True)


def proxy_log(handle: ProxyHandle) -> str:
    return handle.log_file.read_text() if handle.log_file else ""
