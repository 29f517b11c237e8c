"""The worker side of the device proxy: ``attach(addr, job)`` returns a
:class:`ProxyDevice`, and tensors put on it are :class:`ProxyTensor` s.

Why a tensor subclass: model code must run unchanged. A ``ProxyTensor`` is a
storage-less wrapper (device ``meta`` as far as the worker's torch is
concerned) holding a handle; every aten operator on it reaches
``__torch_dispatch__``, which works out the result's shape and dtype locally
on meta tensors (cached per argument signature), allocates the result's
handle itself, and sends the operator to the proxy without waiting. Autograd
runs in the worker on these wrappers, so backward's operators go the same
way. The worker waits only when it reads a value: ``.item()``, ``.cpu()``,
``print``, ``bool(t)``, or the proxy's own requests (lookup, snapshot).
Operators that take a ``torch.Generator`` run in the worker on fetched
values (the generator lives here) and their results are uploaded.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import struct
import threading
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from slurm_singularity.proxy import ring
from slurm_singularity.proxy.api import ChannelClosed, ProxyError, RemoteError
from slurm_singularity.proxy.local_ops import WorkerSideOps
from slurm_singularity.proxy.wire import (
    MAX_TEMPLATE_BYTES, MAX_TEMPLATES, MsgKind, decode_message, encode_into, encode_message,
    PROXY_DEVICE, Handle, encode_tensor, header,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten
_META = torch.device("meta")
_Q = struct.Struct("<q")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_RUN_HEAD = header(MsgKind.RUN, 0)
#: Frees are sent in groups of this many handles.
FREE_BATCH = 256
#: Asynchronous messages buffered before they are written to the ring.
COALESCE = 32
#: Largest reply the worker accepts, bytes.
MAX_REPLY_BYTES = 1 << 34
_BATCHABLE = frozenset({MsgKind.OP, MsgKind.PUT, MsgKind.FREE, MsgKind.BIND,
                        MsgKind.SET_META, MsgKind.SEED, MsgKind.DEF, MsgKind.RUN,
                        MsgKind.DRAW})


class _Local(Exception):
    """Raised while encoding: this call must run in the worker."""


class _Inline(Exception):
    """Raised while keying a call: it carries a tensor's value (a CPU tensor),
    so it is sent as a full OP rather than as a template run."""


class _Template:
    """The worker's record of a template it defined in the proxy."""

    __slots__ = ("tid", "meta", "ids", "single")

    def __init__(self, tid: int, meta: Any, n: int, n_float: int,
                 single: tuple | None = None) -> None:
        self.tid = tid
        self.meta = meta
        self.ids = struct.Struct(f"<I{n}Q{n_float}d")
        #: (size, stride, dtype, offset) when the call returns one new tensor
        #: (most do): its wrapper is made without looking at ``meta`` again
        self.single = single


#: Cached for a call signature whose constants are too large for a template.
_NO_TEMPLATE = _Template(0, None, 0, 0)


def _scalar_key(value: Any) -> Any:
    """A cache-key part that tells 1, 1.0 and True, and 0.0 and -0.0, apart
    (they are equal as dict keys but give different results)."""
    t = type(value)
    if t is float:
        return _F64.pack(value)
    return (t, value)


class _OpInfo:
    """What the client needs to know about one operator overload."""

    __slots__ = ("name", "name_wire", "writes", "tensor_returns", "has_generator", "pointwise")

    def __init__(self, func: torch._ops.OpOverload) -> None:
        schema = func._schema
        self.name = f"{func._schema.name.split('::', 1)[1]}.{func._overloadname}"
        wire = bytearray()
        encode_into(self.name, wire)
        self.name_wire = bytes(wire)
        self.has_generator = any("Generator" in str(a.type) for a in schema.arguments)
        writes: list[Any] = []
        for ret in schema.returns:
            target = None
            if ret.alias_info is not None and ret.alias_info.is_write:
                for i, a in enumerate(schema.arguments):
                    if (a.alias_info is not None and a.alias_info.is_write
                            and a.alias_info.before_set == ret.alias_info.before_set):
                        target = (i, a.name, a.kwarg_only)
                        break
            writes.append(target)
        self.writes = writes
        self.tensor_returns = all("Tensor" in str(r.type) for r in schema.returns)
        #: its float arguments change no output shape: a template takes them
        #: as values rather than as part of its signature
        self.pointwise = torch.Tag.pointwise in func.tags


_INFO: dict[Any, _OpInfo] = {}


def _info(func: Any) -> _OpInfo:
    info = _INFO.get(func)
    if info is None:
        info = _INFO[func] = _OpInfo(func)
    return info


class ProxyTensor(torch.Tensor):
    """A tensor that lives in a device proxy; the worker holds its handle."""

    _pdev: "ProxyDevice"
    _hid: int
    #: shape, stride, dtype, offset: this tensor's part of a call signature
    _key: tuple

    @staticmethod
    def __new__(cls, dev: "ProxyDevice", hid: int, size, stride, dtype, offset: int = 0,
                requires_grad: bool = False, key: tuple | None = None) -> "ProxyTensor":
        r = torch.Tensor._make_wrapper_subclass(
            cls, size, strides=stride, storage_offset=offset, dtype=dtype, device=_META,
            requires_grad=requires_grad)
        r._pdev = dev
        r._hid = hid
        r._key = key if key is not None else (tuple(size), tuple(stride), dtype, offset)
        return r

    def __del__(self) -> None:
        try:
            self._pdev._release(self._hid)
        except Exception:
            pass

    def __reduce_ex__(self, protocol: int) -> Any:
        # pickling (torch.save of a state_dict, all_gather_object) stores the
        # value, read back from the proxy, as a plain CPU tensor
        return self._pdev.fetch(self).__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict) -> "ProxyTensor":
        with torch.no_grad():
            out = self.clone()
        out.requires_grad_(self.requires_grad)
        memo[id(self)] = out
        return out

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"ProxyTensor(job={self._pdev.job}, {self._pdev.fetch(self)!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = _find_device(args, kwargs)
        return dev._dispatch(func, args, kwargs)


def _find_device(args: Any, kwargs: dict) -> "ProxyDevice":
    for a in args:
        if isinstance(a, ProxyTensor):
            return a._pdev
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, ProxyTensor):
                    return b._pdev
    for a in kwargs.values():
        if isinstance(a, ProxyTensor):
            return a._pdev
    raise ProxyError("no proxy tensor among the arguments")


class ProxyDevice(WorkerSideOps):
    """A worker's connection to one device proxy under one job name."""

    def __init__(self, channel: ring.Channel, job: str, rng: str = "proxy") -> None:
        if rng not in ("proxy", "worker"):
            raise ValueError(f"rng={rng!r}: expected 'proxy' or 'worker'")
        self.channel = channel
        self.job = job
        #: "proxy": random operators draw from the job's stream in the proxy
        #: (fast; survives worker restarts with the last committed step).
        #: "worker": they draw from this process's CPU generator, so the
        #: worker's own RNG state management (e.g. the runtime's per-rank
        #: streams and checkpoints) governs them and results equal a CPU run.
        self.rng = rng
        self._lock = threading.RLock()
        self._next_id = 1
        self._rid = 0
        self._frees: list[int] = []
        self._batch: list[bytes] | None = None
        self._meta_cache: dict[Any, Any] = {}
        self._templates: dict[tuple, _Template] = {}
        self._next_tid = 1
        self._scratch_buffers: dict[tuple, torch.Tensor] = {}
        self.closed = False
        reply = self._request(MsgKind.ATTACH, [job])
        atexit.register(self.close)  # queued work reaches the proxy at exit
        self.device_name: str = reply[0]
        self.names_at_attach: list[str] = reply[1]

    # -- transport ---------------------------------------------------------------
    def _new_id(self) -> int:
        hid = self._next_id
        self._next_id += 1
        return hid

    def _send(self, kind: MsgKind, body: Any, raw: bytes | bytearray | None = None) -> None:
        """Queue a message (``raw``: an already encoded body)."""
        if self.closed:
            raise ProxyError(f"job {self.job}: the connection to the proxy is closed")
        self._post(kind, header(kind, 0) + raw if raw is not None
                   else encode_message(kind, 0, body))

    def _post(self, kind: MsgKind, msg: bytes | bytearray) -> None:
        """Queue an encoded message (into the atomic batch, if one is open)."""
        with self._lock:
            if self._batch is not None and kind in _BATCHABLE:
                self._batch.append(msg)
            else:
                self.channel.queue(msg)
                if self.channel.queued >= COALESCE:
                    self.channel.flush()

    def _flush_frees(self) -> None:
        if self._frees:
            ids, self._frees = self._frees, []
            self._send(MsgKind.FREE, [ids])

    def _release(self, hid: int) -> None:
        if self.closed:
            return
        self._frees.append(hid)
        if len(self._frees) >= FREE_BATCH and not self._lock._is_owned():  # type: ignore[attr-defined]
            self._flush_frees()

    def _request(self, kind: MsgKind, body: Any, raw: bytes | bytearray | None = None) -> Any:
        """Send a request and wait for its reply.

        :raises RemoteError: the proxy reported an error (for this request or
            an earlier asynchronous one).
        :raises ChannelClosed: the proxy went away.
        """
        with self._lock:
            if self.closed:
                raise ProxyError(f"job {self.job}: the connection to the proxy is closed")
            if self._batch is not None:
                raise ProxyError(f"{kind.name} reads from the proxy inside an atomic block")
            self._flush_frees()
            self._rid += 1
            rid = self._rid
            self.channel.send(header(kind, rid) + raw if raw is not None
                              else encode_message(kind, rid, body))
            while True:
                rkind, got, value = decode_message(self.channel.recv(MAX_REPLY_BYTES),
                                                   MAX_REPLY_BYTES)
                if rkind == MsgKind.ERROR:
                    raise RemoteError(f"proxy: {value}")
                if got == rid:
                    return value

    # -- tensors -----------------------------------------------------------------
    def _wrap(self, hid: int, meta: torch.Tensor) -> ProxyTensor:
        return ProxyTensor(self, hid, meta.shape, meta.stride(), meta.dtype,
                           meta.storage_offset())

    def put(self, tensor: torch.Tensor) -> ProxyTensor:
        """Copy a local tensor to the proxy (asynchronously)."""
        if isinstance(tensor, ProxyTensor):
            return tensor
        hid = self._new_id()
        t = tensor.detach().contiguous()
        self._send(MsgKind.PUT, [hid, t])
        return ProxyTensor(self, hid, t.shape, t.stride(), t.dtype)

    def fetch(self, tensor: ProxyTensor) -> torch.Tensor:
        """The tensor's value as a CPU tensor (waits for the proxy)."""
        return self._request(MsgKind.GET, [tensor._hid])

    def module(self, module: nn.Module) -> nn.Module:
        """Move a module's parameters and buffers to the proxy, in place."""
        return module._apply(lambda t: self.put(t))

    def mode(self) -> "ProxyMode":
        """A dispatch mode under which the meta device *is* this proxy:
        ``module.to("meta")`` and ``torch.ones(..., device=x.device)`` create
        proxy tensors, so code written for ``job.device`` runs unchanged."""
        return ProxyMode(self)

    def manual_seed(self, seed: int) -> None:
        """Seed this job's random stream in the proxy (dropout, bernoulli...)."""
        self._send(MsgKind.SEED, [int(seed)])

    def flush(self) -> None:
        """Hand buffered asynchronous work to the proxy without waiting."""
        with self._lock:
            self._flush_frees()
            self.channel.flush()

    def sync(self) -> None:
        """Wait until the proxy has run everything sent so far.

        :raises RemoteError: an earlier asynchronous operation failed.
        """
        self._request(MsgKind.SYNC, [])

    def stats(self) -> dict[str, Any]:
        return self._request(MsgKind.STATS, [])

    # -- named, persistent state ----------------------------------------------
    def register(self, name: str, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` in the proxy under ``name`` for this job; a CPU
        tensor is kept as a host value (given back as a CPU tensor)."""
        if isinstance(tensor, ProxyTensor):
            self._send(MsgKind.BIND, [name, tensor._hid, False])
        else:
            hid = self._new_id()
            self._send(MsgKind.PUT, [hid, tensor.detach().contiguous()])
            self._send(MsgKind.BIND, [name, hid, True])
            self._send(MsgKind.FREE, [[hid]])

    def lookup(self, name: str) -> torch.Tensor:
        """The tensor this job keeps under ``name`` (no copy on the device).

        :raises RemoteError: no such name.
        """
        hid = self._new_id()
        dtype, shape, stride, offset, host, value = self._request(MsgKind.LOOKUP, [name, hid])
        if host:
            self._frees.append(hid)
            return value
        return ProxyTensor(self, hid, shape, stride, dtype, offset)

    def set_meta(self, key: str, value: int | float | str | bool | None) -> None:
        self._send(MsgKind.SET_META, [key, value])

    def get_meta(self, key: str) -> Any:
        return self._request(MsgKind.GET_META, [key])

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Everything sent inside reaches the proxy as one message that it
        runs as a unit: a worker killed inside (or while sending) leaves the
        job's state as it was before. Reads inside raise ProxyError."""
        with self._lock:
            if self._batch is not None:
                raise ProxyError("atomic blocks do not nest")
            self._flush_frees()
            self._batch = []
        try:
            yield
        except BaseException:
            self._batch = None
            raise
        with self._lock:
            batch, self._batch = self._batch, None
            self._send(MsgKind.BATCH, [batch])
            self.channel.flush()  # a committed step reaches the proxy now

    def snapshot(self) -> bytes:
        """This job's named tensors, meta and random stream as bytes
        (``torch.load(..., weights_only=True)`` reads them)."""
        return self._request(MsgKind.SNAPSHOT, [])

    def restore(self, blob: bytes) -> None:
        self._request(MsgKind.RESTORE, [blob])

    def close(self) -> None:
        """Send what is queued, wait for it, and leave (named state stays)."""
        if not self.closed:
            atexit.unregister(self.close)
            try:
                self._flush_frees()
                self.sync()
            except (ProxyError, OSError):
                pass
            self.closed = True
            self.channel.close()

    # -- dispatch ----------------------------------------------------------------
    def _enc(self, value: Any, key: list, out: bytearray) -> None:
        """Append ``value``'s wire encoding to ``out`` and its cache-key part
        to ``key`` in one pass (the hot path of every operator)."""
        if isinstance(value, ProxyTensor):
            if value._pdev is not self:
                raise ProxyError("tensors of two different proxies in one operator")
            key.append((tuple(value.shape), value.stride(), value.dtype,
                        value.storage_offset()))
            out += b"h"
            out += _Q.pack(value._hid)
        elif isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                raise ProxyError(f"a {value.device.type} tensor mixed with proxy tensors; "
                                 "put it on the proxy first")
            key.append(("cpu", tuple(value.shape), value.dtype))
            encode_tensor(value, out)
        elif isinstance(value, torch.device):
            if value.type != "meta":
                raise _Local()
            key.append(_META)
            out += b"D"
        elif isinstance(value, (list, tuple)):
            key.append(len(value))
            out += b"l" if isinstance(value, list) else b"u"
            out += _U32.pack(len(value))
            for v in value:
                self._enc(v, key, out)
        elif isinstance(value, torch.Generator):
            raise _Local()
        else:
            key.append(_scalar_key(value))
            encode_into(value, out)

    def _sig(self, value: Any, key: list, hids: list[int]) -> None:
        """Append ``value``'s part of the call signature to ``key`` and its
        proxy tensors' handles to ``hids`` (what a template run sends).

        :raises _Inline: a CPU tensor among the arguments.
        :raises _Local: the call must run in the worker.
        """
        if isinstance(value, ProxyTensor):
            if value._pdev is not self:
                raise ProxyError("tensors of two different proxies in one operator")
            key.append(value._key)
            hids.append(value._hid)
        elif isinstance(value, torch.Tensor):
            raise _Inline()
        elif isinstance(value, (list, tuple)):
            key.append(len(value))
            for v in value:
                self._sig(v, key, hids)
        elif isinstance(value, torch.device):
            if value.type != "meta":
                raise _Local()
            key.append(_META)
        elif isinstance(value, torch.Generator):
            raise _Local()
        else:
            key.append(_scalar_key(value))

    @staticmethod
    def _float_slot(info: "_OpInfo", value: Any) -> bool:
        """A float argument of a pointwise operator: sent with each run."""
        return type(value) is float and info.pointwise

    @staticmethod
    def _slotted(value: Any, slots: list[int]) -> Any:
        """``value`` with its proxy tensors as numbered slots (a DEF body)."""
        if isinstance(value, ProxyTensor):
            slots[0] += 1
            return Handle(slots[0])
        if isinstance(value, torch.device):
            return PROXY_DEVICE
        if isinstance(value, (list, tuple)):
            return type(value)(ProxyDevice._slotted(v, slots) for v in value)
        return value

    def _define(self, func: Any, info: "_OpInfo", args: tuple, kwargs: dict,
                key: tuple) -> _Template:
        """Work out the call's outputs and define it as a template in the
        proxy (one DEF message, in order with everything else)."""
        meta_out = self._meta_call(func, args, kwargs)
        n_out = (1 if isinstance(meta_out, torch.Tensor) else
                 sum(isinstance(m, torch.Tensor) for m in meta_out)
                 if isinstance(meta_out, (tuple, list)) else 0)
        with self._lock:
            if self._next_tid > MAX_TEMPLATES:  # start over: a DEF replaces an id
                self._templates.clear()
                self._next_tid = 1
            slots = [0]
            floats: list[int | str] = []
            targs = []
            for i, a in enumerate(args):
                if self._float_slot(info, a):
                    floats.append(i)
                    targs.append(None)
                else:
                    targs.append(self._slotted(a, slots))
            tkwargs = {}
            for k, v in kwargs.items():
                if self._float_slot(info, v):
                    floats.append(k)
                    tkwargs[k] = None
                else:
                    tkwargs[k] = self._slotted(v, slots)
            body = [self._next_tid, info.name, targs, tkwargs, slots[0], n_out, floats]
            msg = encode_message(MsgKind.DEF, 0, body)
            if len(msg) > MAX_TEMPLATE_BYTES:
                tpl = _NO_TEMPLATE
            else:
                single = None
                if isinstance(meta_out, torch.Tensor) and not (info.writes and info.writes[0]):
                    single = (tuple(meta_out.shape), meta_out.stride(), meta_out.dtype,
                              meta_out.storage_offset())
                tpl = _Template(self._next_tid, meta_out, slots[0] + n_out, len(floats),
                                single)
                self._next_tid += 1
                self._post(MsgKind.DEF, msg)
            self._templates[key] = tpl
        return tpl

    def _templated(self, func: Any, info: "_OpInfo", args: tuple, kwargs: dict) -> Any:
        """Send the call as a run of its template (defined on first use);
        ``_NO_TEMPLATE`` if it must go as a full OP message.

        :raises _Local: the call must run in the worker.
        """
        key: list = [func]
        hids: list[int] = []
        floats: list[float] = []
        pointwise = info.pointwise
        try:
            for a in args:
                if type(a) is ProxyTensor and a._pdev is self:  # the common case
                    key.append(a._key)
                    hids.append(a._hid)
                elif pointwise and type(a) is float:
                    key.append(float)
                    floats.append(a)
                else:
                    self._sig(a, key, hids)
            for k, v in kwargs.items():
                key.append(k)
                if pointwise and type(v) is float:
                    key.append(float)
                    floats.append(v)
                else:
                    self._sig(v, key, hids)
        except _Inline:
            return _NO_TEMPLATE
        tkey = tuple(key)
        try:
            tpl = self._templates.get(tkey)
        except TypeError:  # an unhashable argument
            return _NO_TEMPLATE
        if tpl is None:
            tpl = self._define(func, info, args, kwargs, tkey)
        if tpl is _NO_TEMPLATE:
            return _NO_TEMPLATE
        single = tpl.single
        if single is not None:
            hid = self._next_id
            self._next_id += 1
            result = ProxyTensor(self, hid, single[0], single[1], single[2], single[3],
                                 key=single)
            self._post(MsgKind.RUN, _RUN_HEAD + tpl.ids.pack(tpl.tid, *hids, hid, *floats))
            return result
        outs: list[int] = []
        result = self._results(tpl.meta, info, args, kwargs, outs)
        self._post(MsgKind.RUN, _RUN_HEAD + tpl.ids.pack(tpl.tid, *hids, *outs, *floats))
        return result

    @staticmethod
    def _to_meta(value: Any) -> Any:
        if isinstance(value, ProxyTensor):
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                       device=_META)
        if isinstance(value, torch.Tensor):
            return value.to(_META)
        if isinstance(value, (list, tuple)):
            return type(value)(ProxyDevice._to_meta(v) for v in value)
        return value

    def _meta_call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """The call's outputs as meta tensors (their shapes, strides, dtypes)."""
        try:
            return func(*self._to_meta(args), **{k: self._to_meta(v) for k, v in kwargs.items()})
        except NotImplementedError as err:
            raise ProxyError(f"{func} has no shape function for the proxy: {err}") from None

    def _infer(self, func: Any, args: tuple, kwargs: dict, key: tuple) -> Any:
        out = self._meta_cache.get(key)
        if out is None:
            out = self._meta_call(func, args, kwargs)
            if len(self._meta_cache) > 8192:
                self._meta_cache.clear()
            self._meta_cache[key] = out
        return out

    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if func.namespace == "c10d":
            return self._collective(func, args, kwargs)
        if func is aten._local_scalar_dense.default:
            return self.fetch(args[0]).item()
        if func is aten._to_copy.default:
            target = kwargs.get("device")
            if target is not None and target.type != "meta":
                return func(self.fetch(args[0]), **kwargs)
        if func is aten.copy_.default and not isinstance(args[0], ProxyTensor):
            return args[0].copy_(self.fetch(args[1]))
        info = _info(func)
        if self.rng == "worker" and torch.Tag.nondeterministic_seeded in func.tags:
            return self._random_here(func, args, kwargs, info)
        if info.tensor_returns:
            try:
                result = self._templated(func, info, args, kwargs)
            except _Local:
                return self._run_locally(func, args, kwargs, info)
            if result is not _NO_TEMPLATE:
                return result
        key: list = [func]
        body = bytearray(b"l\x04\x00\x00\x00")  # [name, args, kwargs, outs]
        body += info.name_wire
        try:
            body += b"l"
            body += _U32.pack(len(args))
            for a in args:
                self._enc(a, key, body)
            body += b"m"
            body += _U32.pack(len(kwargs))
            for k, v in kwargs.items():
                key.append(k)
                encode_into(k, body)
                self._enc(v, key, body)
        except _Local:
            return self._run_locally(func, args, kwargs, info)
        if not info.tensor_returns:
            body += b"l\x00\x00\x00\x00"
            return self._request(MsgKind.CALL, None, raw=body)
        try:
            meta_out = self._infer(func, args, kwargs, tuple(key))
        except TypeError:  # an unhashable argument: no cache
            meta_out = self._meta_call(func, args, kwargs)
        outs: list[int] = []
        result = self._results(meta_out, info, args, kwargs, outs)
        body += b"l"
        body += _U32.pack(len(outs))
        for hid in outs:
            body += b"i"
            body += _Q.pack(hid)
        self._send(MsgKind.OP, None, raw=body)
        return result

    def _results(self, meta_out: Any, info: _OpInfo, args: tuple, kwargs: dict,
                 outs: list[int]) -> Any:
        """The call's results as proxy tensors shaped like ``meta_out``; their
        handles (0: written in place) appended to ``outs``."""
        if isinstance(meta_out, torch.Tensor):
            return self._out(meta_out, 0, info, args, kwargs, outs)
        if isinstance(meta_out, (tuple, list)):
            return type(meta_out)(
                self._out(m, i, info, args, kwargs, outs) if isinstance(m, torch.Tensor) else m
                for i, m in enumerate(meta_out))
        return meta_out

    def _out(self, meta: torch.Tensor, i: int, info: _OpInfo, args: tuple, kwargs: dict,
             outs: list[int]) -> Any:
        target = info.writes[i] if i < len(info.writes) else None
        if target is not None:
            pos, name, kwarg_only = target
            outs.append(0)
            return args[pos] if not kwarg_only and pos < len(args) else kwargs[name]
        hid = self._new_id()
        outs.append(hid)
        return self._wrap(hid, meta)


class ProxyMode(TorchDispatchMode):
    """Routes operators that create tensors on the meta device to the proxy
    (everything else goes on to ``ProxyTensor`` or the real backend)."""

    def __init__(self, dev: ProxyDevice) -> None:
        super().__init__()
        self.dev = dev

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, ProxyTensor) for t in types):
            # handled here rather than re-dispatched to ProxyTensor: one
            # trip through the dispatcher less per operator
            return _find_device(args, kwargs)._dispatch(func, args, kwargs)
        target = kwargs.get("device")
        if target is not None and target.type == "meta":
            if func is aten._to_copy.default and isinstance(args[0], torch.Tensor) \
                    and args[0].device.type != "meta":
                rest = {k: v for k, v in kwargs.items() if k != "device"}
                return self.dev.put(func(args[0], **rest))
            return self.dev._dispatch(func, args, kwargs)
        return func(*args, **kwargs)


def attach(addr: str | os.PathLike, job: str, timeout: float = 30.0,
           rng: str = "proxy") -> ProxyDevice:
    """Connect to the proxy at ``addr`` (its socket path) as job ``job``;
    a worker that attaches under a job name that the proxy knows finds that
    job's named tensors and meta (see :meth:`ProxyDevice.lookup`).

    :raises ProxyRefused: this process's user may not use that proxy.
    :raises OSError: nothing listens at ``addr``.
    :raises ChannelClosed: the proxy went away during the handshake.
    """
    channel = ring.connect(addr, timeout=timeout)
    try:
        return ProxyDevice(channel, job, rng=rng)
    except (ProxyError, ChannelClosed):
        channel.close()
        raise
