"""The worker's operator dispatch: what happens to one aten operator on
proxy tensors, from ``__torch_dispatch__`` to the message that carries it.

Why a module of its own: this is the hot path of every training step (a
few hundred operators each), so it is written for speed and kept apart from
the connection's bookkeeping in ``client.py``. Most operators take the
template path: their call signature (operator, argument layouts, constants)
is looked up in a per-connection table, defined in the proxy once (DEF) and
then sent as a fixed-size RUN frame of handles and floats. The rest go as a
full OP message, or run in the worker (``local_ops.py``).

Why a tensor subclass: model code must run unchanged. A ``ProxyTensor`` is a
storage-less wrapper (device ``meta`` as far as the worker's torch is
concerned) holding a handle; every aten operator on it reaches
``__torch_dispatch__``, which works out the result's layout locally on meta
tensors (once per signature), allocates the result's handle itself, and
sends the operator to the proxy without waiting.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

import torch

from slurm_singularity.proxy.api import ProxyError
from slurm_singularity.proxy.wire import (
    MAX_TEMPLATE_BYTES, MAX_TEMPLATES, PROXY_DEVICE, Handle, MsgKind, encode_into,
    encode_message, encode_tensor,
)

aten = torch.ops.aten
_META = torch.device("meta")
_Q = struct.Struct("<q")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
#: Asynchronous messages buffered before they are written to the ring.
COALESCE = 32


class _Local(Exception):
    """Raised while encoding: this call must run in the worker."""


class _Inline(Exception):
    """Raised while keying a call: it carries a tensor's value (a CPU tensor),
    so it is sent as a full OP rather than as a template run."""


class SentTemplate:
    """The worker's record of a template it defined in the proxy."""

    __slots__ = ("tid", "meta", "frame", "head", "single", "alias")

    def __init__(self, tid: int, meta: Any, n: int, n_float: int,
                 single: tuple | None = None, alias: int | None = None) -> None:
        self.tid = tid
        self.meta = meta
        #: a whole RUN frame: ring length prefix, message header, template id,
        #: handles, floats (packed in one call)
        self.frame = struct.Struct(f"<IBQI{n}Q{n_float}d")
        self.head = (self.frame.size - 4, int(MsgKind.RUN), 0, tid)
        #: (size, stride, dtype, offset, layout id) when the call returns one
        #: new tensor (most do): its wrapper is made from these alone
        self.single = single
        #: the position of the argument an in-place call writes and returns
        self.alias = alias


#: Cached for a call signature whose constants are too large for a template.
_NO_TEMPLATE = SentTemplate(0, None, 0, 0)

#: Tensor layouts (size, stride, dtype, offset) -> small ints: a call
#: signature holds its tensors' layout ids, which hash faster than the tuples.
_LAYOUTS: dict[tuple, int] = {}
#: ``next()`` of a count is atomic: two threads never get one id
_layout_ids = itertools.count(1)
#: The table starts over beyond this many layouts (ids are never reused, so a
#: stale id only misses the template cache).
MAX_LAYOUTS = 1 << 16


def _layout_id(size: Any, stride: Any, dtype: torch.dtype, offset: int) -> int:
    key = (tuple(size), tuple(stride), dtype, offset)
    lid = _LAYOUTS.get(key)
    if lid is None:
        if len(_LAYOUTS) >= MAX_LAYOUTS:
            _LAYOUTS.clear()
        lid = _LAYOUTS[key] = next(_layout_ids)
    return lid


def _scalar_key(value: Any, key: list) -> None:
    """Append a scalar's cache-key part: its type, then its value (so that 1,
    1.0 and True, equal as dict keys, are told apart); a float as its bytes
    (0.0 and -0.0 too)."""
    t = type(value)
    if t is float:
        key.append(_F64.pack(value))
    else:
        key.append(t)
        key.append(value)


class OpInfo:
    """What the client needs to know about one operator overload."""

    __slots__ = ("func", "name", "name_wire", "writes", "tensor_returns", "has_generator",
                 "pointwise", "seeded", "plain")

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
        self.seeded = torch.Tag.nondeterministic_seeded in func.tags
        #: an operator that no rule of ``_dispatch`` singles out: it goes
        #: straight to the template path
        self.plain = (func.namespace == "aten" and self.tensor_returns and not self.seeded
                      and func not in _SINGLED_OUT)
        #: kept alive: ``_INFO`` is keyed by its id
        self.func = func


#: Keyed by the overload's id: an OpOverload hashes in Python, an int in C.
_INFO: dict[int, OpInfo] = {}
_PLAIN_SCALARS = frozenset({int, float, bool, str, type(None)})
_SINGLED_OUT = (aten._local_scalar_dense.default, aten._to_copy.default, aten.copy_.default)


def op_info(func: Any) -> OpInfo:
    info = _INFO.get(id(func))
    if info is None:
        info = _INFO[id(func)] = OpInfo(func)
    return info


class ProxyTensor(torch.Tensor):
    """A tensor that lives in a device proxy; the worker holds its handle."""

    _pdev: "ProxyDevice"
    _hid: int
    #: the id of its layout (shape, stride, dtype, offset): this tensor's
    #: part of a call signature
    _key: int

    @staticmethod
    def __new__(cls, dev: "ProxyDevice", hid: int, size, stride, dtype, offset: int = 0,
                requires_grad: bool = False) -> "ProxyTensor":
        r = _make_wrapper(cls, size, strides=stride, storage_offset=offset, dtype=dtype,
                          device=_META, requires_grad=requires_grad)
        r._pdev = dev
        r._hid = hid
        r._key = _layout_id(size, stride, dtype, offset)
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
        return route(func, args, kwargs or {})


_make_wrapper = torch.Tensor._make_wrapper_subclass


def route(func: Any, args: tuple, kwargs: dict) -> Any:
    """An operator on proxy tensors: the template path for plain operators
    (most of a training step), ``ProxyDevice._dispatch`` for the rest."""
    info = _INFO.get(id(func)) or op_info(func)
    a0 = args[0] if args else None
    dev = a0._pdev if type(a0) is ProxyTensor else _find_device(args, kwargs)
    if info.plain:
        return dev._send_call(func, info, args, kwargs)
    return dev._dispatch(func, info, args, kwargs)


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


def _keeps_layout(info: OpInfo, meta_out: Any, args: tuple, kwargs: dict) -> None:
    """Refuse an in-place operator that would change its proxy tensor's
    shape, strides or offset (``t_``, ``unsqueeze_``, ``resize_``, an ``out=``
    of the wrong shape): the worker's wrapper keeps the layout it was made
    with, so its view of the tensor and the proxy's would part.

    :raises ProxyError: naming the operator.
    """
    outs = meta_out if isinstance(meta_out, (tuple, list)) else (meta_out,)
    for m, target in zip(outs, info.writes):
        if target is None or not isinstance(m, torch.Tensor):
            continue
        pos, name, kwarg_only = target
        arg = args[pos] if not kwarg_only and pos < len(args) else kwargs.get(name)
        if isinstance(arg, ProxyTensor) and (
                m.shape != arg.shape or m.stride() != arg.stride()
                or m.storage_offset() != arg.storage_offset()):
            raise ProxyError(
                f"aten.{info.name} would change a proxy tensor's shape or strides in place "
                f"({tuple(arg.shape)} -> {tuple(m.shape)}), which the proxy does not support; "
                "use the out-of-place form (t() for t_(), unsqueeze() for unsqueeze_(), "
                "a new tensor for resize_ or out=)")


class OperatorCalls:
    """Mixed into ``ProxyDevice``: turns operator calls into messages. Needs
    its ``channel``, ``_lock``, ``_batch``, ``_templates``, ``_next_tid``,
    ``_ids``, ``_meta_cache``, ``rng``, ``_send``, ``_request``,
    ``fetch``, ``_new_id``, ``_wrap`` and the ``local_ops`` methods."""

    def _enc(self, value: Any, key: list, out: bytearray) -> None:
        """Append ``value``'s wire encoding to ``out`` and its cache-key part
        to ``key`` in one pass (a full OP message's arguments)."""
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
            _scalar_key(value, key)
            encode_into(value, out)

    def _sig(self, value: Any, key: list, hids: list[int]) -> None:
        """Append ``value``'s part of the call signature to ``key`` and its
        proxy tensors' handles to ``hids`` (what a template run sends).

        :raises _Inline: a CPU tensor among the arguments.
        :raises _Local: the call must run in the worker.
        """
        t = type(value)
        if isinstance(value, ProxyTensor):
            if value._pdev is not self:
                raise ProxyError("tensors of two different proxies in one operator")
            key.append(value._key)
            hids.append(value._hid)
        elif t in _PLAIN_SCALARS:  # before the isinstance checks below (some are slow)
            _scalar_key(value, key)
        elif isinstance(value, (list, tuple)):
            key.append(t)
            key.append(len(value))
            for v in value:
                self._sig(v, key, hids)
        elif isinstance(value, torch.Tensor):
            raise _Inline()
        elif isinstance(value, torch.device):
            if value.type != "meta":
                raise _Local()
            key.append(_META)
        elif isinstance(value, torch.Generator):
            raise _Local()
        else:
            _scalar_key(value, key)

    @staticmethod
    def _float_slot(info: "OpInfo", value: Any) -> bool:
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
            return type(value)(OperatorCalls._slotted(v, slots) for v in value)
        return value

    def _define(self, info: "OpInfo", args: tuple, kwargs: dict, key: tuple) -> SentTemplate:
        """Work out the call's outputs and define it as a template in the
        proxy (one DEF message, in order with everything else)."""
        meta_out = self._meta_call(info.func, args, kwargs)
        _keeps_layout(info, meta_out, args, kwargs)
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
                single = alias = None
                written = info.writes[0] if info.writes else None
                if isinstance(meta_out, torch.Tensor) and written is None:
                    layout = (meta_out.shape, meta_out.stride(), meta_out.dtype,
                              meta_out.storage_offset())
                    single = (*layout, _layout_id(*layout))
                elif isinstance(meta_out, torch.Tensor) and not written[2] \
                        and written[0] < len(args):
                    alias = written[0]
                tpl = SentTemplate(self._next_tid, meta_out, slots[0] + n_out, len(floats),
                                single, alias)
                self._next_tid += 1
                self._post(MsgKind.DEF, msg)
            self._templates[key] = tpl
        return tpl

    def _templated(self, info: "OpInfo", args: tuple, kwargs: dict) -> Any:
        """Send the call as a run of its template (defined on first use);
        ``_NO_TEMPLATE`` if it must go as a full OP message.

        The hot path of a training step: every operator but a few special
        ones comes here, so it is written for speed (one key list, no helper
        calls for the common argument types).

        :raises _Local: the call must run in the worker.
        """
        key: list = [info]
        hids: list[int] = []
        floats: list[float] = []
        pointwise = info.pointwise
        try:
            for a in args:
                t = type(a)
                if t is ProxyTensor and a._pdev is self:  # the common case
                    key.append(a._key)
                    hids.append(a._hid)
                elif t is float and pointwise:
                    key.append(float)
                    floats.append(a)
                elif t is int or t is bool:
                    key.append(t)
                    key.append(a)
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
            tpl = self._define(info, args, kwargs, tkey)
            if tpl is _NO_TEMPLATE:
                return _NO_TEMPLATE
        single = tpl.single
        if single is not None:
            hid = next(self._ids)
            result = _make_wrapper(ProxyTensor, single[0], strides=single[1],
                                   storage_offset=single[3], dtype=single[2], device=_META)
            result._pdev = self
            result._hid = hid
            result._key = single[4]
            self._post_frame(tpl.frame.pack(*tpl.head, *hids, hid, *floats))
            return result
        if tpl.alias is not None:
            self._post_frame(tpl.frame.pack(*tpl.head, *hids, 0, *floats))
            return args[tpl.alias]
        outs: list[int] = []
        result = self._results(tpl.meta, info, args, kwargs, outs)
        self._post_frame(tpl.frame.pack(*tpl.head, *hids, *outs, *floats))
        return result

    def _post_frame(self, frame: bytes) -> None:
        """Queue a whole small frame (length prefix included)."""
        with self._lock:
            if self._batch is not None:
                self._batch.append(frame[4:])  # a batch holds messages, not frames
            else:
                channel = self.channel
                channel.queue_frame(frame)
                if channel.queued >= COALESCE:
                    channel.flush()

    @staticmethod
    def _to_meta(value: Any) -> Any:
        if isinstance(value, ProxyTensor):
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                       device=_META)
        if isinstance(value, torch.Tensor):
            return value.to(_META)
        if isinstance(value, (list, tuple)):
            return type(value)(OperatorCalls._to_meta(v) for v in value)
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

    def _dispatch(self, func: Any, info: OpInfo, args: tuple, kwargs: dict) -> Any:
        """An operator that is not plain (see ``OpInfo.plain``)."""
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
        if self.rng == "worker" and info.seeded:
            return self._random_here(func, args, kwargs, info)
        if info.tensor_returns:
            return self._send_call(func, info, args, kwargs)
        return self._op_message(func, info, args, kwargs)

    def _send_call(self, func: Any, info: OpInfo, args: tuple, kwargs: dict) -> Any:
        """A call with tensor results: a template run if it can be one, else
        a full OP message (or a run in the worker)."""
        try:
            result = self._templated(info, args, kwargs)
        except _Local:
            return self._run_locally(func, args, kwargs, info)
        if result is not _NO_TEMPLATE:
            return result
        return self._op_message(func, info, args, kwargs)

    def _op_message(self, func: Any, info: OpInfo, args: tuple, kwargs: dict) -> Any:
        """Send the call as a full OP message (or a CALL that waits for a
        non-tensor result)."""
        key: list = [info]
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
        _keeps_layout(info, meta_out, args, kwargs)
        outs: list[int] = []
        result = self._results(meta_out, info, args, kwargs, outs)
        body += b"l"
        body += _U32.pack(len(outs))
        for hid in outs:
            body += b"i"
            body += _Q.pack(hid)
        self._send(MsgKind.OP, None, raw=body)
        return result

    def _results(self, meta_out: Any, info: OpInfo, args: tuple, kwargs: dict,
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

    def _out(self, meta: torch.Tensor, i: int, info: OpInfo, args: tuple, kwargs: dict,
             outs: list[int]) -> Any:
        target = info.writes[i] if i < len(info.writes) else None
        if target is not None:
            pos, name, kwarg_only = target
            outs.append(0)
            return args[pos] if not kwarg_only and pos < len(args) else kwargs[name]
        hid = self._new_id()
        outs.append(hid)
        return self._wrap(hid, meta)
