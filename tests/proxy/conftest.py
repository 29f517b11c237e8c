"""Fixtures of the device-proxy tests: one emulated (CPU) proxy per test
module, started with ``start_proxies`` and stopped by pid."""

from __future__ import annotations

import pytest
import torch

from slurm_singularity.proxy.api import ProxyHandle, start_proxies, stop_proxies

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> ProxyHandle:
    state = tmp_path_factory.mktemp("proxy-state")
    handles = start_proxies(1, state, device="cpu")
    yield handles[0]
    stop_proxies(handles)


def proxy_log(handle: ProxyHandle) -> str:
    return handle.log_file.read_text() if handle.log_file else ""
