"""The worker side of the device proxy: ``attach(addr, job)`` returns a
:class:`ProxyDevice`, and tensors put on it are :class:`ProxyTensor` s.

This module is the connection: handles, requests and replies, named state,
atomic batches, the dispatch mode that makes the meta device the proxy.
What one operator on proxy tensors becomes is ``dispatch.py``'s business.
Autograd runs in the worker on the wrappers, so backward's operators go the
same way as forward's. The worker waits only when it reads a value:
``.item()``, ``.cpu()``, ``print``, ``bool(t)``, or the proxy's own requests
(lookup, snapshot). Operators that take a ``torch.Generator`` run in the
worker on fetched values (the generator lives here) and their results are
uploaded.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import threading
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from slurm_singularity.proxy import ring
from slurm_singularity.proxy.api import ChannelClosed, ProxyError, RemoteError
from slurm_singularity.proxy.dispatch import (
    COALESCE, OperatorCalls, ProxyTensor, SentTemplate, aten, op_info, route,
)
from slurm_singularity.proxy.local_ops import WorkerSideOps
from slurm_singularity.proxy.wire import MsgKind, decode_message, encode_message, header

__all__ = ["ProxyDevice", "ProxyMode", "ProxyTensor", "attach"]

log = logging.getLogger(__name__)
#: Frees are sent in groups of this many handles.
FREE_BATCH = 256
#: Largest reply the worker accepts, bytes.
MAX_REPLY_BYTES = 1 << 34
_BATCHABLE = frozenset({MsgKind.OP, MsgKind.PUT, MsgKind.FREE, MsgKind.BIND,
                        MsgKind.SET_META, MsgKind.SEED, MsgKind.DEF, MsgKind.RUN,
                        MsgKind.DRAW})


class ProxyDevice(WorkerSideOps, OperatorCalls):
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
        #: the handles this worker gives out (``next`` of a count is atomic:
        #: tensors made on two threads never share one)
        self._ids = itertools.count(1)
        self._rid = 0
        self._frees: list[int] = []
        self._batch: list[bytes] | None = None
        self._meta_cache: dict[Any, Any] = {}
        self._templates: dict[tuple, SentTemplate] = {}
        self._next_tid = 1
        self._scratch_buffers: dict[tuple, torch.Tensor] = {}
        self.closed = False
        reply = self._request(MsgKind.ATTACH, [job])
        atexit.register(self.close)  # queued work reaches the proxy at exit
        self.device_name: str = reply[0]
        self.names_at_attach: list[str] = reply[1]

    # -- transport ---------------------------------------------------------------
    def _new_id(self) -> int:
        return next(self._ids)

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


class ProxyMode(TorchDispatchMode):
    """Routes operators that create tensors on the meta device to the proxy
    (everything else goes on to ``ProxyTensor`` or the real backend)."""

    def __init__(self, dev: ProxyDevice) -> None:
        super().__init__()
        self.dev = dev

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch would wrap __torch_dispatch__ in a dynamo-disabling shim (two
        # Python frames per operator); the worker's operators never run under
        # torch.compile's tracer, so the plain method is used
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if ProxyTensor in types:
            # handled here rather than re-dispatched to ProxyTensor: one
            # trip through the dispatcher less per operator
            return route(func, args, kwargs)
        target = kwargs.get("device")
        if target is not None and target.type == "meta":
            if func is aten._to_copy.default and isinstance(args[0], torch.Tensor) \
                    and args[0].device.type != "meta":
                rest = {k: v for k, v in kwargs.items() if k != "device"}
                return self.dev.put(func(args[0], **rest))
            return self.dev._dispatch(func, op_info(func), args, kwargs)
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
