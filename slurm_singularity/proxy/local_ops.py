"""Operators that a proxy device runs in the worker instead of the proxy.

Three kinds must: ``torch.distributed`` collectives (the process group lives
in the worker), random operators when the job's random stream is the
worker's CPU generator (``rng="worker"``), and operators that take a
``torch.Generator`` or ask for a non-proxy device. Kept apart from
``dispatch.py``'s fast asynchronous path because each of these moves tensor
values between worker and proxy.
"""

from __future__ import annotations

from typing import Any

import torch

from slurm_singularity.proxy.dispatch import ProxyTensor
from slurm_singularity.proxy.wire import Handle, MsgKind

#: Draw buffers kept per worker (one per tensor layout, least recently used
#: dropped first).
SCRATCH_BUFFERS = 8


class WorkerSideOps:
    """Mixed into ``ProxyDevice``: needs its ``fetch``, ``put``, ``_send``,
    ``_new_id`` and a ``_scratch_buffers`` dict."""

    _scratch_buffers: dict

    def _collective(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A torch.distributed collective on proxy tensors: run it in the
        worker's process group on fetched values, wait for it, and write
        every proxy tensor it touched back (collectives are in place)."""
        pairs: list[tuple[Any, torch.Tensor]] = []

        def local(v: Any) -> Any:
            if isinstance(v, ProxyTensor):
                t = self.fetch(v)
                pairs.append((v, t))
                return t
            if isinstance(v, (list, tuple)):
                return type(v)(local(x) for x in v)
            return v

        out = func(*local(args), **{k: local(v) for k, v in kwargs.items()})
        for item in (out if isinstance(out, (tuple, list)) else [out]):
            if hasattr(item, "wait") and not isinstance(item, torch.Tensor):
                item.wait()
        for proxy_t, local_t in pairs:
            self._write_back(proxy_t, local_t)
        back = {id(t): p for p, t in pairs}

        def restore(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and id(v) in back:
                return back[id(v)]
            if isinstance(v, (list, tuple)):
                return type(v)(restore(x) for x in v)
            return v

        return restore(out)

    def _random_here(self, func: Any, args: tuple, kwargs: dict, info: Any) -> Any:
        """A random operator drawn from the worker's CPU generator. When its
        result depends only on the shape of its tensor argument (in-place
        fills, ``*_like``), draw here into a local buffer, then, without
        waiting: send a dropout mask as bytes, let the proxy repeat a draw
        that takes a generator from this generator's state (DRAW), or upload
        the values. Otherwise run it here on fetched values."""
        first, rest = args[0], args[1:]
        in_place = bool(info.writes and info.writes[0] is not None)
        shape_only = (isinstance(first, ProxyTensor)
                      and (in_place or func._schema.name.endswith("_like"))
                      and not any(isinstance(v, torch.Tensor) for v in rest)
                      and not any(isinstance(v, torch.Tensor) for v in kwargs.values()))
        if not shape_only:
            return self._run_locally(func, args, kwargs, info)
        lkw = {k: v for k, v in kwargs.items() if k != "device"}
        # the proxy works through what is queued while this process draws
        self.flush()
        # a draw's values are copied into its message at once, so one buffer
        # per shape serves every step (no fresh pages for each dropout)
        local = self._scratch(first.shape, first.stride(), first.dtype)
        if not info.has_generator or any(isinstance(v, torch.Generator)
                                         for v in (*rest, *lkw.values())):
            # the proxy could not repeat this draw: upload its values
            out = func(local, *rest, **lkw)
            if in_place:
                return self._write_back(first, out)
            return self.put(out)
        # the worker's generator must advance exactly as in a run without the
        # proxy, so the draw is made here too
        state = torch.default_generator.get_state()
        out = func(local, *rest, **lkw)
        if func is torch.ops.aten.bernoulli_.float and out.dtype.is_floating_point:
            # dropout's mask: 0s and 1s, sent as one byte each (copy_ turns
            # them back into exactly 0.0 and 1.0). Made as bool and sent as
            # its bytes read as uint8: float -> bool and uint8 -> float are
            # the two conversions that torch vectorizes (8x faster than the
            # other two on a 1 MB mask)
            mask = self._scratch(out.shape, out.stride(), torch.bool)
            mask.copy_(out)
            return self._write_back(first, mask.view(torch.uint8))
        # otherwise the proxy repeats the draw from the same state rather than
        # receiving its values
        hid = 0 if in_place else self._new_id()
        self._send(MsgKind.DRAW, [info.name, [Handle(first._hid), *rest], lkw, hid, state])
        if in_place:
            return first
        return ProxyTensor(self, hid, out.shape, out.stride(), out.dtype)

    def _write_back(self, dst: Any, value: torch.Tensor) -> Any:
        """Copy a local tensor's values into proxy tensor ``dst`` (no wait);
        returns ``dst``."""
        self._send(MsgKind.OP, ["copy_.default", [Handle(dst._hid), value], {}, [0]])
        return dst

    def _scratch(self, shape: Any, stride: Any, dtype: torch.dtype) -> torch.Tensor:
        """A reusable CPU buffer of this layout (a few, the last ones used)."""
        cache = self._scratch_buffers
        key = (tuple(shape), tuple(stride), dtype)
        buf = cache.pop(key, None)
        if buf is None:
            buf = torch.empty_strided(shape, stride, dtype=dtype)
            if len(cache) >= SCRATCH_BUFFERS:
                cache.pop(next(iter(cache)))
        cache[key] = buf
        return buf

    def _run_locally(self, func: Any, args: tuple, kwargs: dict, info: Any) -> Any:
        """Run an operator in the worker on fetched values (a generator or an
        explicit non-proxy device is involved); write back in-place results,
        upload new ones unless a non-proxy device was asked for."""
        def local(v: Any) -> Any:
            if isinstance(v, ProxyTensor):
                return self.fetch(v)
            if isinstance(v, (list, tuple)):
                return type(v)(local(x) for x in v)
            return v

        wants_here = any(isinstance(v, torch.device) and v.type != "meta"
                         for v in kwargs.values())
        out = func(*local(args), **{k: local(v) for k, v in kwargs.items()})

        def back(i: int, value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            target = info.writes[i] if i < len(info.writes) else None
            if target is not None:
                pos, name, kwarg_only = target
                dst = args[pos] if not kwarg_only and pos < len(args) else kwargs[name]
                if isinstance(dst, ProxyTensor):
                    self._write_back(dst, value)
                return dst
            return value if wants_here else self.put(value)

        if isinstance(out, (tuple, list)):
            return type(out)(back(i, v) for i, v in enumerate(out))
        return back(0, out)
