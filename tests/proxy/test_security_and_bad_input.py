"""Only the job's user can open a proxy's channel, and malformed, truncated
and oversized messages get an error reply while the proxy keeps serving its
other workers."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from slurm_singularity.proxy import ring
from slurm_singularity.proxy.api import ProxyRefused, WireError
from slurm_singularity.proxy.client import attach
from slurm_singularity.proxy.wire import MsgKind, decode_message, encode_message

from tests.proxy.rawwire import LIMIT, RawWorker, errors as _errors

NOBODY = 65534


def _as_nobody(addr: str) -> int:
    """Exit status of a forked child that drops to uid 65534 and connects."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            ring.connect(addr, timeout=5).close()
        except PermissionError:
            code = 10
        except ProxyRefused:
            code = 11
        except BaseException:
            code = 12
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_another_user_cannot_reach_the_proxy_socket(proxy):
    sock = Path(proxy.addr)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert _as_nobody(proxy.addr) == 10
    assert not [p for p in Path("/dev/shm").glob(f"singularity-proxy-{proxy.pid}-*")]


def test_another_user_is_refused_by_peer_credentials_and_logged(open_proxy):
    sock = Path(open_proxy.addr)
    os.chmod(sock.parent.parent, 0o711)
    os.chmod(sock.parent, 0o711)
    os.chmod(sock, 0o666)
    assert _as_nobody(open_proxy.addr) == 11
    log = open_proxy.log_file.read_text()
    assert f"refused a connection from uid {NOBODY}" in log
    dev = attach(open_proxy.addr, "owner")  # its own user still gets in
    assert dev.fetch(dev.put(torch.ones(2)) * 3).tolist() == [3.0, 3.0]
    dev.close()


def test_malformed_truncated_and_oversized_messages_get_error_replies(open_proxy):
    w = RawWorker(open_proxy.addr)
    other = attach(open_proxy.addr, "bystander")
    kept = other.put(torch.arange(4.0))
    good = encode_message(MsgKind.OP, 0, ["add.Tensor", [], {}, [7]])
    cases = {
        b"\x02": "truncated",                                   # header cut short
        good[:-3]: "truncated",                                 # body cut short
        encode_message(MsgKind.OP, 0, ["nonexistent_op.default", [], {}, [1]]): "does not exist",
        encode_message(MsgKind.OP, 0, ["set_.source_Storage", [], {}, [1]]): "not allowed",
        encode_message(MsgKind.GET, 5, [123456]): "unknown tensor handle",
        bytes([77]) + bytes(8) + b"N": "unknown message kind",
        encode_message(MsgKind.PUT, 0, [1, 2, 3]): "PUT body",
        good[:9] + b"Z": "unknown type tag",
        good + b"xx": "trailing bytes",
        good[:9] + b"t" + bytes([0, 1]) + struct.pack("<qq", 4, 999): "expected 16",
    }
    for payload, words in cases.items():
        errors = _errors(w.sync_after(payload))
        assert errors and words in errors[0], (payload, errors)
    big = encode_message(MsgKind.PUT, 0, [9, torch.zeros(LIMIT // 4 + 16)])
    errors = _errors(w.sync_after(big))
    assert errors and "larger than the limit" in errors[0]
    assert other.fetch(kept + 1).tolist() == [1.0, 2.0, 3.0, 4.0]
    other.close()


def test_a_worker_that_dies_inside_a_message_does_not_stop_the_others(open_proxy):
    other = attach(open_proxy.addr, "bystander2")
    w = RawWorker(open_proxy.addr)
    w.ch.send_raw(struct.pack("<I", 1000) + b"\x02" * 100)  # a frame that never ends
    w.ch.close()
    t = other.put(torch.ones(3))
    assert other.fetch(t * 2).tolist() == [2.0, 2.0, 2.0]
    other.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from(list(MsgKind)), st.binary(max_size=60)).map(
        lambda kb: bytes([int(kb[0])]) + bytes(8) + kb[1]),
    st.tuples(st.integers(0, 40), st.integers(0, 255)).map(
        lambda ib: _mutate(ib[0], ib[1])),
))
def test_fuzzed_messages_get_an_error_reply_and_the_proxy_keeps_serving(open_proxy, data):
    w = _fuzz_worker(open_proxy.addr)
    replies = w.sync_after(data)
    try:
        decode_message(data)
        locally_bad = False
    except (WireError, ValueError):
        locally_bad = True
    if locally_bad:
        assert _errors(replies), data
    assert replies[-1][1] == w.rid  # the SYNC was answered
    dev = _fuzz_bystander(open_proxy.addr)
    assert dev.fetch(dev.put(torch.tensor([1.0, 2.0])) + 1).tolist() == [2.0, 3.0]


_VALID = encode_message(MsgKind.OP, 0, ["mul.Tensor", [], {"other": 2.5}, [11, 12]])
_WORKERS: dict[str, object] = {}


def _mutate(index: int, byte: int) -> bytes:
    raw = bytearray(_VALID)
    raw[index % len(raw)] = byte
    return bytes(raw[: max(1, len(raw) - index % 5)])


def _fuzz_worker(addr: str) -> RawWorker:
    if "raw" not in _WORKERS:
        _WORKERS["raw"] = RawWorker(addr)
    return _WORKERS["raw"]  # type: ignore[return-value]


def _fuzz_bystander(addr: str):
    if "dev" not in _WORKERS:
        _WORKERS["dev"] = attach(addr, "fuzz-bystander")
    return _WORKERS["dev"]
