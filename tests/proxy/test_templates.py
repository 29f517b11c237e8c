"""The proxy's fast paths. Operator templates (DEF once, RUN by id): the
results equal eager CPU results whatever the constants, a worker that runs
out of template ids starts over. Random draws repeated in the proxy from the
worker's generator state (DRAW): the same numbers as a CPU run, and the
worker's generator ends where a CPU run's would. Malformed DEF/RUN/DRAW
messages get an error reply naming the problem while the proxy keeps
serving."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from slurm_singularity.proxy import dispatch as C
from slurm_singularity.proxy.api import ProxyError
from slurm_singularity.proxy.client import attach
from slurm_singularity.proxy.wire import Handle, MsgKind, encode_message, header

from tests.proxy.rawwire import RawWorker, errors as _errors


def test_constants_that_compare_equal_still_get_their_own_results(proxy):
    """1, 1.0 and True are equal dict keys; so are 0.0 and -0.0. A template
    keyed on them alone would replay the first one's dtype or sign."""
    dev = attach(proxy.addr, "tpl-constants")
    ints = dev.put(torch.arange(4))
    floats = dev.put(torch.tensor([1.0, -2.0, 3.0]))
    for value in (1, 1.0, True, 2, 2.5):
        want = torch.arange(4) * value
        got = dev.fetch(ints * value)
        assert got.dtype == want.dtype and torch.equal(got, want), value
    for zero in (0.0, -0.0, 0.0):
        want = torch.tensor([1.0, -2.0, 3.0]) * zero
        got = dev.fetch(floats * zero)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), zero
    # the float of a pointwise operator travels with each run: one template
    steps = [dev.fetch(floats.add(floats, alpha=a)) for a in (0.5, -1.25, 3.0)]
    assert [s.tolist() for s in steps] == [
        [1.5, -3.0, 4.5], [-0.25, 0.5, -0.75], [4.0, -8.0, 12.0]]
    assert dev.stats()["templates"] <= 8
    dev.close()


def test_a_worker_that_runs_out_of_template_ids_starts_over(proxy, monkeypatch):
    monkeypatch.setattr(C, "MAX_TEMPLATES", 3)
    dev = attach(proxy.addr, "tpl-wrap")
    x = dev.put(torch.arange(6.0))
    local = torch.arange(6.0)
    for _ in range(3):
        for shape in ((6,), (2, 3), (3, 2), (1, 6), (6, 1)):
            got = dev.fetch(x.reshape(shape).relu().neg() + 1)
            assert torch.equal(got, (local.reshape(shape).relu().neg() + 1))
    assert dev.stats()["templates"] == 3
    dev.close()


def test_templates_inside_an_atomic_block_are_defined_before_their_runs(proxy):
    dev = attach(proxy.addr, "tpl-atomic")
    w = dev.put(torch.ones(3))
    with dev.atomic():
        w.mul_(3.0).sub_(1.0)  # first uses: DEF and RUN both inside the batch
        dev.register("w", w)
    assert dev.fetch(dev.lookup("w")).tolist() == [2.0, 2.0, 2.0]
    dev.close()


def test_random_draws_in_the_proxy_equal_the_workers_own(proxy):
    dev = attach(proxy.addr, "draw", rng="worker")
    x = dev.put(torch.zeros(1000))
    torch.manual_seed(3)
    x.normal_(mean=1.0, std=2.0)                  # in place: DRAW
    y = torch.randn_like(x)                       # a new tensor: DRAW
    mask = torch.empty_like(x).bernoulli_(0.25)   # dropout's mask: uploaded as bytes
    after = torch.rand(4)
    torch.manual_seed(3)
    want_x = torch.zeros(1000).normal_(mean=1.0, std=2.0)
    want_y = torch.randn_like(want_x)
    want_mask = torch.empty_like(want_x).bernoulli_(0.25)
    assert torch.equal(torch.rand(4), after)      # the worker's stream moved the same
    assert torch.equal(dev.fetch(x), want_x)
    assert torch.equal(dev.fetch(y), want_y)
    assert torch.equal(dev.fetch(mask), want_mask)
    dev.close()


def _def(tid, name, args, kwargs, n_in, n_out, floats=()):
    return encode_message(MsgKind.DEF, 0, [tid, name, args, kwargs, n_in, n_out, list(floats)])


def _run(tid, fmt, *values):
    return header(MsgKind.RUN, 0) + struct.pack("<I" + fmt, tid, *values)


def test_malformed_templates_and_runs_get_error_replies(open_proxy):
    w = RawWorker(open_proxy.addr)
    bystander = attach(open_proxy.addr, "tpl-bystander")
    kept = bystander.put(torch.arange(3.0))
    w.ch.send(encode_message(MsgKind.PUT, 0, [1, torch.ones(2)]))
    w.ch.send(_def(5, "mul.Tensor", [Handle(1)], {"other": None}, 1, 1, ["other"]))
    cases = {
        _def(6, "mul.Tensor", [Handle(1)], {}, 1, 1)[:-4]: "truncated",
        encode_message(MsgKind.DEF, 0, [6, "mul.Tensor", [], {}, 1, 1]): "list of 7",
        _def(0, "mul.Tensor", [Handle(1)], {}, 1, 1): "tid 0 is outside",
        _def(6, "mul.Tensor", [Handle(2)], {}, 1, 1): "slot 2 is outside 1..1",
        _def(6, "mul.Tensor", [Handle(1), torch.ones(1)], {}, 1, 1): "tensor values",
        _def(6, "mul.Tensor", [Handle(1), 2.0], {}, 1, 1, [1]): "float slot 0",
        _def(6, "mul.Tensor", [Handle(1)], {}, 1, 1, ["other"]): "float slot 0",
        _def(6, "set_.source_Storage", [], {}, 0, 1): "not allowed",
        _def(6, "mul.Tensor", [], {}, 5000, 1): "at most 4096",
        _def(6, "mul.Tensor", [1], {}, "1", 1): "n_in must be an int",
        _def(6, "mul.Tensor", [Handle(1), list(range(3000))], {}, 1, 1): "larger than 16384",
        header(MsgKind.RUN, 0) + b"\x05\x00": "shorter than a template id",
        _run(99, "QQ", 1, 2): "never defined",
        _run(5, "QQ", 1, 2): "expected 24",
        _run(5, "QQd", 77, 2, 1.5): "unknown tensor handle 77",
        _run(5, "QQd", 1, 1 << 63, 1.5): ">= 2**63",
    }
    for payload, words in cases.items():
        errors = _errors(w.sync_after(payload))
        assert errors and words in errors[0], (payload, errors)
    # the good template still works after all of that
    w.ch.send(_run(5, "QQd", 1, 2, 1.5))
    replies = w.request(MsgKind.GET, [2])
    assert replies[-1][2].tolist() == [1.5, 1.5]
    assert bystander.fetch(kept * 2).tolist() == [0.0, 2.0, 4.0]
    bystander.close()


def test_a_bad_run_among_buffered_runs_fails_alone_and_order_is_kept(open_proxy):
    # the proxy runs the RUN frames already in its read buffer in one go;
    # one bad frame among them is reported and the others still run, in order
    w = RawWorker(open_proxy.addr)
    w.ch.send(encode_message(MsgKind.PUT, 0, [1, torch.ones(2)]))
    w.ch.send(_def(5, "mul.Tensor", [Handle(1)], {"other": None}, 1, 1, ["other"]))
    for frame in (_run(5, "QQd", 1, 2, 1.5),                      # 2 = 1 * 1.5
                  _run(5, "QQd", 77, 4, 1.5),                     # unknown handle
                  _run(5, "QQd", 2, 3, 2.0),                      # 3 = 2 * 2
                  encode_message(MsgKind.PUT, 0, [2, torch.full((2,), 7.0)]),
                  _run(5, "QQd", 2, 5, 0.5)):                     # 5 = 7 * 0.5
        w.ch.queue(frame)
    w.ch.flush()
    replies = w.request(MsgKind.GET, [3])
    assert _errors(replies) == ["bad message: unknown tensor handle 77"]
    assert replies[-1][2].tolist() == [3.0, 3.0]
    assert w.request(MsgKind.GET, [5])[-1][2].tolist() == [3.5, 3.5]
    w.ch.close()


def test_in_place_operators_return_their_argument(proxy):
    dev = attach(proxy.addr, "tpl-inplace")
    x, y = dev.put(torch.arange(4.0)), dev.put(torch.ones(4))
    for _ in range(3):  # the first call defines the template, the others run it
        assert x.add_(y, alpha=2.0) is x
    assert dev.fetch(x).tolist() == [6.0, 7.0, 8.0, 9.0]
    dev.close()


def test_in_place_operators_that_change_a_layout_are_refused_by_name(proxy):
    # the worker's wrapper keeps its layout: t_() on it would leave the
    # worker and the proxy disagreeing about the tensor's shape
    dev = attach(proxy.addr, "tpl-layout-change")
    x = dev.put(torch.arange(6.0).reshape(2, 3))
    for call, name in ((lambda: x.t_(), "aten.t_"), (lambda: x.unsqueeze_(0), "aten.unsqueeze_"),
                       (lambda: x.resize_(3, 2), "aten.resize_"),
                       (lambda: torch.add(x, x, out=dev.put(torch.zeros(6))), "aten.add.out")):
        with pytest.raises(ProxyError, match=name):
            call()
    assert tuple(x.shape) == (2, 3)
    assert dev.fetch(x.t()).tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    out = dev.put(torch.zeros(2, 3))
    assert torch.add(x, x, out=out) is out  # an out= of the right shape is fine
    assert dev.fetch(out).tolist() == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]
    dev.close()


def test_call_signatures_still_match_after_the_layout_table_starts_over(proxy, monkeypatch):
    monkeypatch.setattr(C, "MAX_LAYOUTS", 4)
    dev = attach(proxy.addr, "tpl-layouts")
    local = torch.arange(24.0)
    x = dev.put(local)
    for _ in range(2):
        for shape in ((24,), (2, 12), (3, 8), (4, 6), (6, 4), (8, 3), (12, 2)):
            got = dev.fetch((x.reshape(shape) * 2).sum(0))
            assert torch.equal(got, (local.reshape(shape) * 2).sum(0)), shape
    dev.close()


def test_malformed_draws_get_error_replies(open_proxy):
    w = RawWorker(open_proxy.addr)
    w.ch.send(encode_message(MsgKind.PUT, 0, [1, torch.ones(8)]))
    state = torch.default_generator.get_state()
    cases = {
        encode_message(MsgKind.DRAW, 0, ["normal_.default", [Handle(1)], {}, 0]): "list of 5",
        encode_message(MsgKind.DRAW, 0, ["add_.Tensor", [Handle(1), 1.0], {}, 0, state]):
            "does not draw from a generator",
        encode_message(MsgKind.DRAW, 0, ["normal_.default", [2.0], {}, 0, state]):
            "first argument must be a tensor handle",
        encode_message(MsgKind.DRAW, 0, ["normal_.default", [Handle(9)], {}, 0, state]):
            "unknown tensor handle 9",
        encode_message(MsgKind.DRAW, 0, ["normal_.default", [Handle(1)], {}, 0,
                                         torch.zeros(7, dtype=torch.uint8)]):
            "not a CPU generator's state",
        encode_message(MsgKind.DRAW, 0, ["normal_.default", [Handle(1)], {}, -3, state]):
            "out of range",
        encode_message(MsgKind.DRAW, 0, ["normal_.default", [Handle(1)],
                                         {"generator": None}, 0, state]): "may not name",
    }
    for payload, words in cases.items():
        errors = _errors(w.sync_after(payload))
        assert errors and words in errors[0], (payload, errors)
    w.ch.send(encode_message(MsgKind.DRAW, 0, ["normal_.default", [Handle(1)], {}, 0, state]))
    got = w.request(MsgKind.GET, [1])[-1][2]
    gen = torch.Generator()
    gen.set_state(state)
    assert torch.equal(got, torch.empty(8).normal_(generator=gen))
    w.ch.close()


_DEF7 = _def(7, "add.Tensor", [Handle(1), Handle(2)], {"alpha": None}, 2, 1, ["alpha"])
_RUN7 = _run(7, "QQQd", 1, 1, 3, 0.5)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(which=st.booleans(), index=st.integers(0, 80), byte=st.integers(0, 255),
       cut=st.integers(0, 6))
def test_fuzzed_templates_and_runs_never_stop_the_proxy(open_proxy, which, index, byte, cut):
    w = _raw(open_proxy.addr)
    raw = bytearray(_DEF7 if which else _RUN7)
    raw[index % len(raw)] = byte
    replies = w.sync_after(bytes(raw[: len(raw) - cut]))
    assert replies[-1][1] == w.rid  # the SYNC was answered
    w.ch.send(_DEF7)
    w.ch.send(_RUN7)  # the unmutated pair still works on the same connection
    assert w.request(MsgKind.GET, [3])[-1][2].tolist() == [1.5, 1.5]


_RAW: dict[str, RawWorker] = {}


def _raw(addr: str) -> RawWorker:
    if addr not in _RAW:
        _RAW[addr] = w = RawWorker(addr)
        w.ch.send(encode_message(MsgKind.PUT, 0, [1, torch.ones(2)]))
    return _RAW[addr]


@pytest.fixture(autouse=True, scope="module")
def _close_raw():
    yield
    for w in _RAW.values():
        w.ch.close()
