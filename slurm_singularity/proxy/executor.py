"""What the proxy does with a decoded message: the device-side tensor tables,
the named (persistent) tensors of each job, the jobs' random streams,
operator execution and snapshots.

Kept apart from the socket and thread handling in ``server.py`` so that the
rules (which operators may run, what a message body must look like, what
survives a worker) can be read in one place. Every body is checked against
the shape its kind requires before anything runs; a failure raises
:class:`WireError` (bad message, replied to at once) or is kept as the
connection's deferred error (a failed asynchronous operation, reported at
the worker's next synchronous request, the way CUDA reports kernel errors).
"""

from __future__ import annotations

import io
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from slurm_singularity.proxy.api import WireError
from slurm_singularity.proxy.template import (
    TEMPLATE_ID, Template, compile_template, run_tid, store,
)
from slurm_singularity.proxy.wire import (
    HEADER_BYTES, PROXY_DEVICE, Handle, MsgKind, decode_frame,
)

log = logging.getLogger(__name__)

_OP_NAME = re.compile(r"^([a-z_][a-z0-9_]*)\.([A-Za-z0-9_]+)$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,200}$")
#: Operators a worker may not run even though aten has them: they reach raw
#: storage or process state.
_DENIED = frozenset({"set_", "_set_from", "from_file", "_copy_from_and_resize",
                     "record_stream", "_foreach_set_"})
#: Kinds allowed inside an atomic BATCH.
_BATCHABLE = frozenset({MsgKind.OP, MsgKind.PUT, MsgKind.FREE, MsgKind.BIND,
                        MsgKind.SET_META, MsgKind.SEED, MsgKind.DEF, MsgKind.RUN,
                        MsgKind.DRAW})
_OPS: dict[str, Any] = {}


def resolve_op(name: Any) -> torch._ops.OpOverload:
    """``"add_.Tensor"`` -> ``torch.ops.aten.add_.Tensor``.

    :raises WireError: not a str, not an aten operator overload, or denied.
    """
    op = _OPS.get(name) if isinstance(name, str) else None
    if op is not None:
        return op
    m = _OP_NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise WireError(f"op name {name!r} is not 'name.overload'")
    base, overload = m.groups()
    if base in _DENIED:
        raise WireError(f"op aten.{name} is not allowed through the proxy")
    packet = getattr(torch.ops.aten, base, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket) or overload not in packet.overloads():
        raise WireError(f"op aten.{name} does not exist")
    op = getattr(packet, overload)
    _OPS[name] = op
    return op


def _check(body: Any, types: tuple, kind: MsgKind) -> list:
    if not isinstance(body, list) or len(body) != len(types):
        raise WireError(f"{kind.name} body must be a list of {len(types)} items, "
                        f"got {type(body).__name__}")
    for i, (item, t) in enumerate(zip(body, types)):
        if not isinstance(item, t) or (t is int and isinstance(item, bool)):
            raise WireError(f"{kind.name} item {i} must be {getattr(t, '__name__', t)}, "
                            f"got {type(item).__name__}")
    return body


def _ids(values: Any, kind: MsgKind) -> list[int]:
    if not isinstance(values, list) or not all(
            type(v) is int and 0 <= v < 1 << 63 for v in values):
        raise WireError(f"{kind.name} handle list must be a list of ints >= 0")
    return values


def _name(name: str, what: str) -> str:
    if not _JOB_NAME.match(name):
        raise WireError(f"{what} {name!r} must be 1-200 of [A-Za-z0-9_.:/@+-]")
    return name


@dataclass
class JobState:
    """What a job keeps in the proxy across worker restarts."""

    name: str
    tensors: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    rng_state: torch.Tensor | None = None
    committed_rng: torch.Tensor | None = None


class Device:
    """The proxy's device, its jobs and its random-stream switching."""

    def __init__(self, device: torch.device, max_tensor_bytes: int) -> None:
        self.device = device
        self.max_tensor_bytes = max_tensor_bytes
        self.jobs: dict[str, JobState] = {}
        self.lock = threading.RLock()
        if device.type == "cuda":
            self.generator = torch.cuda.default_generators[device.index or 0]
        else:
            self.generator = torch.default_generator
        self._loaded: JobState | None = None
        self._fresh = self.generator.get_state()

    def job(self, name: str) -> JobState:
        job = self.jobs.get(name)
        if job is None:
            job = self.jobs[name] = JobState(name)
        return job

    def load_rng(self, job: JobState) -> None:
        """Make the device's default generator hold ``job``'s stream."""
        if self._loaded is job:
            return
        if self._loaded is not None:
            self._loaded.rng_state = self.generator.get_state()
        self.generator.set_state(job.rng_state if job.rng_state is not None else self._fresh)
        self._loaded = job

    def rng_of(self, job: JobState) -> torch.Tensor:
        if self._loaded is job:
            return self.generator.get_state()
        return job.rng_state if job.rng_state is not None else self._fresh

    def set_rng(self, job: JobState, state: torch.Tensor) -> None:
        job.rng_state = state
        if self._loaded is job:
            self.generator.set_state(state)

    def seed(self, job: JobState, seed: int) -> None:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        self.set_rng(job, gen.get_state())
        job.committed_rng = gen.get_state()

    def snapshot(self, job: JobState) -> bytes:
        """Named tensors + meta + random stream -> a ``torch.save`` blob that
        ``torch.load(weights_only=True)`` reads back."""
        state = {"tensors": {n: t.detach().cpu().clone() for n, (t, _) in job.tensors.items()},
                 "host": sorted(n for n, (_, h) in job.tensors.items() if h),
                 "meta": dict(job.meta), "rng": self.rng_of(job).clone()}
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    def restore(self, job: JobState, blob: bytes) -> None:
        """:raises WireError: the blob is not a snapshot."""
        try:
            state = torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as err:
            raise WireError(f"RESTORE blob is not a proxy snapshot: {err}") from None
        if not (isinstance(state, dict) and isinstance(state.get("tensors"), dict)
                and isinstance(state.get("meta"), dict)
                and isinstance(state.get("rng"), torch.Tensor)):
            raise WireError("RESTORE blob lacks tensors/meta/rng")
        host = set(state.get("host", []))
        job.tensors = {n: (t.to(self.device) if n not in host else t, n in host)
                       for n, t in state["tensors"].items() if isinstance(t, torch.Tensor)}
        job.meta = dict(state["meta"])
        self.set_rng(job, state["rng"])
        job.committed_rng = state["rng"]


class Session:
    """One worker connection's view: its handle table and its job."""

    def __init__(self, device: Device, peer: str) -> None:
        self.device = device
        self.peer = peer
        self.table: dict[int, torch.Tensor] = {}
        self.templates: dict[int, Template] = {}
        self._draw_gen: torch.Generator | None = None
        self.job: JobState | None = None
        self.deferred: str | None = None
        self.on_attach: Callable[[str], bool] | None = None

    # -- decoding helpers -------------------------------------------------
    def _arg(self, value: Any) -> Any:
        if isinstance(value, Handle):
            try:
                return self.table[value.id]
            except KeyError:
                raise WireError(f"unknown tensor handle {value.id}") from None
        if value is PROXY_DEVICE:
            return self.device.device
        if isinstance(value, torch.Tensor):
            return value.to(self.device.device)
        if isinstance(value, list):
            return [self._arg(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._arg(v) for v in value)
        if isinstance(value, dict):
            return {k: self._arg(v) for k, v in value.items()}
        return value

    def _need_job(self, kind: MsgKind) -> JobState:
        if self.job is None:
            raise WireError(f"{kind.name} before ATTACH")
        return self.job

    def _tensor(self, hid: int) -> torch.Tensor:
        try:
            return self.table[hid]
        except KeyError:
            raise WireError(f"unknown tensor handle {hid}") from None

    # -- operators ---------------------------------------------------------
    def _call(self, body: Any, kind: MsgKind) -> Any:
        name, args, kwargs, outs = _check(body, (str, list, dict, list), kind)
        op = resolve_op(name)
        outs = _ids(outs, kind)
        job = self._need_job(kind)
        a, kw = self._arg(args), self._arg(kwargs)
        if torch.Tag.nondeterministic_seeded in op.tags:
            self.device.load_rng(job)
        result = op(*a, **kw)
        if kind is MsgKind.CALL:
            if isinstance(result, torch.Tensor):
                raise WireError(f"CALL of aten.{name} returned a tensor; use OP")
            return result
        store(name, result, outs, self.table)
        return None

    def _draw(self, body: Any) -> None:
        """Repeat a worker's random draw from its generator's state: on a CPU
        generator, as the worker did, then onto the device."""
        kind = MsgKind.DRAW
        name, args, kwargs, out, state = _check(body, (str, list, dict, int, torch.Tensor), kind)
        op = resolve_op(name)
        if torch.Tag.nondeterministic_seeded not in op.tags or \
                "generator" not in (a.name for a in op._schema.arguments):
            raise WireError(f"DRAW of aten.{name}, which does not draw from a generator")
        if not args or not isinstance(args[0], Handle):
            raise WireError("DRAW's first argument must be a tensor handle")
        if not 0 <= out < 1 << 63:
            raise WireError(f"DRAW out handle {out} out of range")
        if "generator" in kwargs:
            raise WireError("DRAW kwargs may not name a generator")
        target = self._tensor(args[0].id)
        rest, kw = self._arg(args[1:]), self._arg(kwargs)
        if self._draw_gen is None:
            self._draw_gen = torch.Generator()
        try:
            self._draw_gen.set_state(state)
        except (RuntimeError, TypeError) as err:
            raise WireError(f"DRAW state is not a CPU generator's state: {err}") from None
        local = torch.empty_strided(target.shape, target.stride(), dtype=target.dtype)
        result = op(local, *rest, generator=self._draw_gen, **kw)
        if out:
            self.table[out] = result.to(self.device.device)
        else:
            target.copy_(result)

    def _define(self, body: Any) -> None:
        self._need_job(MsgKind.DEF)
        tpl = compile_template(body, self.device.device, resolve_op)
        self.templates[tpl.tid] = tpl

    def _bound(self, buf: Any, off: int, n: int) -> tuple[Template, tuple]:
        """The RUN body at ``buf[off:off+n]`` -> its template and values
        (checked, not run).

        :raises WireError: an undefined template, a malformed body.
        """
        tid = run_tid(buf, off, n)
        tpl = self.templates.get(tid)
        if tpl is None:
            raise WireError(f"RUN of template {tid}, which was never defined")
        return tpl, tpl.parse(buf, off, n)

    def run_at(self, buf: Any, off: int, n: int) -> None:
        """Run the whole RUN message (header included) at ``buf[off:off+n]``:
        the hot path, taken by the connection loop before any decoding
        (``handle`` never sees a RUN; a batch's RUNs go through ``_bound``
        and ``_run``).

        :raises WireError: a malformed message, an unknown handle.
        """
        body, size = off + HEADER_BYTES, n - HEADER_BYTES
        tpl = (self.templates.get(TEMPLATE_ID.unpack_from(buf, body)[0])
               if size >= TEMPLATE_ID.size else None)
        if tpl is None:  # _bound raises, saying why
            return self._run(*self._bound(buf, body, size))
        if tpl.seeded:
            self.device.load_rng(self._need_job(MsgKind.RUN))
        tpl.run(self.table, tpl.parse(buf, body, size))
        return None

    def _run(self, tpl: Template, values: tuple) -> None:
        if tpl.seeded:
            self.device.load_rng(self._need_job(MsgKind.RUN))
        tpl.run(self.table, values)

    # -- dispatch ------------------------------------------------------------
    def handle(self, kind_raw: int, body: Any) -> Any:
        """Execute one message; returns the OK reply's value for reply kinds.

        :raises WireError: a malformed body or an unknown kind.
        :raises Exception: an operator failed (the caller decides whether it
            is deferred or replied).
        """
        try:
            kind = MsgKind(kind_raw)
        except ValueError:
            raise WireError(f"unknown message kind {kind_raw}") from None
        dev = self.device
        if kind is MsgKind.ATTACH:
            (job_name,) = _check(body, (str,), kind)
            if self.job is not None:
                raise WireError("ATTACH twice on one connection")
            _name(job_name, "job name")
            alone = self.on_attach(job_name) if self.on_attach is not None else True
            self.job = dev.job(job_name)
            if alone and self.job.committed_rng is not None:
                # a restarted worker continues the stream from its last commit
                dev.set_rng(self.job, self.job.committed_rng.clone())
            return [str(dev.device), sorted(self.job.tensors)]
        if kind in (MsgKind.OP, MsgKind.CALL):
            return self._call(body, kind)
        if kind is MsgKind.DEF:
            self._define(body)
            return None
        if kind is MsgKind.DRAW:
            self._need_job(kind)
            self._draw(body)
            return None
        if kind is MsgKind.PUT:
            hid, tensor = _check(body, (int, torch.Tensor), kind)
            self.table[hid] = tensor.to(dev.device)
            return None
        if kind is MsgKind.GET:
            (hid,) = _check(body, (int,), kind)
            return self._tensor(hid).detach().cpu()
        if kind is MsgKind.FREE:
            (ids,) = _check(body, (list,), kind)
            for hid in _ids(ids, kind):
                self.table.pop(hid, None)
            return None
        if kind is MsgKind.SYNC:
            _check(body, (), kind)
            return None
        if kind is MsgKind.STATS:
            _check(body, (), kind)
            return self.stats()
        job = self._need_job(kind)
        if kind is MsgKind.BIND:
            name, hid, host = _check(body, (str, int, bool), kind)
            job.tensors[_name(name, "tensor name")] = (self._tensor(hid), host)
            return None
        if kind is MsgKind.LOOKUP:
            name, hid = _check(body, (str, int), kind)
            if name not in job.tensors:
                raise WireError(f"job {job.name} has no tensor named {name!r}")
            t, host = job.tensors[name]
            self.table[hid] = t
            return [t.dtype, list(t.shape), list(t.stride()), t.storage_offset(), host,
                    t.detach().cpu() if host else None]
        if kind is MsgKind.SET_META:
            key, value = _check(body, (str, object), kind)
            if not isinstance(value, (int, float, str, bool, type(None))):
                raise WireError("SET_META value must be int, float, str, bool or None")
            job.meta[_name(key, "meta key")] = value
            return None
        if kind is MsgKind.GET_META:
            (key,) = _check(body, (str,), kind)
            return job.meta.get(key)
        if kind is MsgKind.SEED:
            (seed,) = _check(body, (int,), kind)
            dev.seed(job, seed)
            return None
        if kind is MsgKind.SNAPSHOT:
            _check(body, (), kind)
            return dev.snapshot(job)
        if kind is MsgKind.RESTORE:
            (blob,) = _check(body, (bytes,), kind)
            dev.restore(job, blob)
            return None
        if kind is MsgKind.BATCH:
            return self._batch(body, job)
        raise WireError(f"{kind.name} is not a request")

    def _batch(self, body: Any, job: JobState) -> None:
        """Decode every sub-message first, then run them all and commit the
        job's random stream: a worker killed while sending a batch leaves the
        job exactly as it was before it."""
        (items,) = _check(body, (list,), MsgKind.BATCH)
        decoded = []
        for i, raw in enumerate(items):
            if not isinstance(raw, bytes):
                raise WireError(f"BATCH item {i} is not bytes")
            kind, _rid, sub = decode_frame(raw, self.device.max_tensor_bytes)
            if kind not in _BATCHABLE:
                raise WireError(f"BATCH item {i}: kind {kind} may not be batched")
            if kind == MsgKind.DEF:
                # a definition changes no job state: it takes effect now, so
                # that the RUNs after it in this batch find it
                self._define(sub)
            elif kind == MsgKind.RUN:
                decoded.append((kind, self._bound(sub, 0, len(sub))))
            else:
                decoded.append((kind, sub))
        for kind, sub in decoded:
            if kind == MsgKind.RUN:
                self._run(*sub)
            else:
                self.handle(kind, sub)
        job.committed_rng = self.device.rng_of(job).clone()
        return None

    def stats(self) -> dict[str, Any]:
        dev = self.device.device
        out: dict[str, Any] = {"device": str(dev), "handles": len(self.table),
                               "templates": len(self.templates),
                               "jobs": len(self.device.jobs)}
        if dev.type == "cuda":
            out["memory_allocated"] = int(torch.cuda.memory_allocated(dev))
            from slurm_singularity.proxy.devices import gpu_report

            out.update({f"gpu_{k}": v for k, v in gpu_report(dev.index or 0).items()})
        return out
