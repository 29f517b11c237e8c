"""Operator templates: an operator sent once (DEF) and then run many times
by id with new tensor handles (RUN).

Why: a training step sends the same few hundred operators with the same
shapes and constants every step; only the handles change. Decoding a typed
OP message costs the proxy more than many small kernels take to run, so the
worker defines each distinct operator signature once and afterwards sends
``tid | handles | floats`` (a few bytes, read with one ``struct.unpack``). A
template keeps its constant arguments ready and knows where its tensor
arguments go, and where the float arguments that change from call to call go
(those of pointwise operators, like an optimizer's step size: they change no
output shape, so one template serves every value).

Pure: no socket, no lock; the session (``executor.py``) owns the table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Callable

import torch

from slurm_singularity.proxy.api import WireError
from slurm_singularity.proxy.wire import (
    MAX_TEMPLATE_SLOTS, MAX_TEMPLATES, PROXY_DEVICE, Handle,
)

#: The template id at the head of a RUN body.
TEMPLATE_ID = struct.Struct("<I")
#: ``(ins) -> value`` for an argument that holds tensor slots.
Getter = Callable[[list], Any]


@dataclass(frozen=True)
class Template:
    """One operator with its constants bound; ``args``/``kwargs`` hold the
    constants, the other fields say where a run's values go.

    A RUN's values are its input handles, its output handles, then its
    floats; ``tensor_at``/``float_at`` map argument positions straight to
    those values (the common case: no per-run lists); ``dyn``/``kwdyn`` build
    the other arguments (lists holding slots, keyword slots) from ``ins``,
    the input tensors followed by the floats."""

    tid: int
    name: str
    op: Any
    n_in: int
    n_out: int
    n_float: int
    args: tuple
    dyn: tuple[tuple[int, Getter], ...]
    kwargs: dict
    kwdyn: tuple[tuple[str, Getter], ...]
    seeded: bool
    ids: struct.Struct
    #: the operator's C++ entry (skips one Python frame per run)
    call: Any
    #: (position, index into a RUN's values) of the arguments that are a
    #: tensor slot, and of those that are a float slot
    tensor_at: tuple[tuple[int, int], ...]
    float_at: tuple[tuple[int, int], ...]

    def parse(self, buf: Any, off: int, n: int) -> tuple:
        """The handles, then the floats, of the RUN body at ``buf[off:off+n]``
        (its template id included).

        :raises WireError: the wrong size; an out handle >= 2**63.
        """
        if n != self.ids.size + TEMPLATE_ID.size:
            raise WireError(f"RUN of template {self.tid} (aten.{self.name}) carries "
                            f"{n - TEMPLATE_ID.size} bytes after its id, expected "
                            f"{self.ids.size} ({self.n_in} in, {self.n_out} out, "
                            f"{self.n_float} floats)")
        values = self.ids.unpack_from(buf, off + TEMPLATE_ID.size)
        if self.n_out and max(values[self.n_in:self.n_in + self.n_out]) >= 1 << 63:
            raise WireError(f"RUN of template {self.tid}: an out handle is >= 2**63")
        return values

    def run(self, table: dict, values: tuple) -> None:
        """Run the operator on the tensors of ``table`` that ``values`` name
        and put its outputs in ``table``.

        :raises WireError: an unknown handle; a result that does not match
            the template's outputs.
        """
        args = list(self.args)
        try:
            for pos, i in self.tensor_at:
                args[pos] = table[values[i]]
            if self.dyn or self.kwdyn:
                ins = [table[hid] for hid in values[:self.n_in]]
                ins.extend(values[self.n_in + self.n_out:])
                for pos, get in self.dyn:
                    args[pos] = get(ins)
        except KeyError as err:
            raise WireError(f"unknown tensor handle {err.args[0]}") from None
        for pos, i in self.float_at:
            args[pos] = values[i]
        kwargs = self.kwargs
        if self.kwdyn:
            kwargs = dict(kwargs)
            for name, get in self.kwdyn:
                kwargs[name] = get(ins)
        result = self.call(*args, **kwargs)
        n_in = self.n_in
        if self.n_out == 1 and isinstance(result, torch.Tensor):
            if values[n_in]:
                table[values[n_in]] = result
        else:
            store(self.name, result, values[n_in:n_in + self.n_out], table)


def store(name: str, result: Any, outs: Any, table: dict) -> None:
    """Put an operator's tensor results in ``table`` under ``outs`` (0: an
    in-place result, already there).

    :raises WireError: the operator made another number of tensors.
    """
    produced = ([result] if isinstance(result, torch.Tensor) else
                [r for r in result if isinstance(r, torch.Tensor)]
                if isinstance(result, (tuple, list)) else [])
    if len(produced) != len(outs):
        raise WireError(f"aten.{name} produced {len(produced)} tensors, "
                        f"message named {len(outs)} handles")
    for hid, t in zip(outs, produced):
        if hid:
            table[hid] = t


def run_tid(buf: Any, off: int, n: int) -> int:
    """The template id at the head of the RUN body at ``buf[off:off+n]``.

    :raises WireError: the body is shorter than an id.
    """
    if n < TEMPLATE_ID.size:
        raise WireError(f"RUN body of {n} bytes is shorter than a template id")
    return TEMPLATE_ID.unpack_from(buf, off)[0]


def _slot_getter(value: Any, n_in: int, device: torch.device) -> tuple[bool, Any]:
    """``(True, getter)`` if ``value`` holds slots, else ``(False, constant)``;
    a slot itself gets an ``int`` (its index) as getter."""
    if isinstance(value, Handle):
        if not 1 <= value.id <= n_in:
            raise WireError(f"DEF slot {value.id} is outside 1..{n_in}")
        return True, value.id - 1
    if value is PROXY_DEVICE:
        return False, device
    if isinstance(value, torch.Tensor):
        raise WireError("DEF arguments may not hold tensor values (send an OP)")
    if isinstance(value, (list, tuple)):
        parts = [_slot_getter(v, n_in, device) for v in value]
        if not any(dynamic for dynamic, _ in parts):
            return False, type(value)(v for _, v in parts)
        kind = type(value)
        parts = [(dynamic, itemgetter(v) if dynamic and type(v) is int else v)
                 for dynamic, v in parts]
        return True, (lambda ins: kind(v(ins) if dynamic else v for dynamic, v in parts))
    if isinstance(value, dict):
        raise WireError("DEF arguments may not hold dicts")
    return False, value


def compile_template(body: Any, device: torch.device, resolve: Callable[[Any], Any]
                     ) -> Template:
    """A DEF body -> a :class:`Template` (``resolve`` maps the op name to the
    operator and refuses denied ones).

    :raises WireError: a malformed body, an unknown or denied operator, a slot
        out of range, a tensor value among the constants.
    """
    if not isinstance(body, list) or len(body) != 7:
        raise WireError(f"DEF body must be a list of 7 items, got {type(body).__name__}")
    tid, name, args, kwargs, n_in, n_out, floats = body
    for what, value in (("tid", tid), ("n_in", n_in), ("n_out", n_out)):
        if type(value) is not int:
            raise WireError(f"DEF {what} must be an int, got {type(value).__name__}")
    if not 1 <= tid <= MAX_TEMPLATES:
        raise WireError(f"DEF tid {tid} is outside 1..{MAX_TEMPLATES}")
    if not (0 <= n_in and 0 <= n_out and n_in + n_out <= MAX_TEMPLATE_SLOTS):
        raise WireError(f"DEF n_in={n_in} n_out={n_out}: each >= 0, at most "
                        f"{MAX_TEMPLATE_SLOTS} together")
    if not isinstance(args, list) or not isinstance(kwargs, dict) \
            or not isinstance(floats, list):
        raise WireError("DEF args and floats must be lists and kwargs a dict")
    if n_in + n_out + len(floats) > MAX_TEMPLATE_SLOTS:
        raise WireError(f"DEF has {len(floats)} float slots, more than the "
                        f"{MAX_TEMPLATE_SLOTS} slots of a template")
    op = resolve(name)
    consts, direct, dyn = [], [], []
    for pos, value in enumerate(args):
        dynamic, v = _slot_getter(value, n_in, device)
        consts.append(None if dynamic else v)
        if dynamic:
            (direct if type(v) is int else dyn).append((pos, v))
    kconsts, kwdyn = {}, []
    for key, value in kwargs.items():
        dynamic, v = _slot_getter(value, n_in, device)
        if dynamic:
            kwdyn.append((key, itemgetter(v) if type(v) is int else v))
            kconsts[key] = None
        else:
            kconsts[key] = v
    for j, where in enumerate(floats):
        if type(where) is int and 0 <= where < len(args) and args[where] is None:
            direct.append((where, n_in + j))
        elif type(where) is str and where in kwargs and kwargs[where] is None:
            kwdyn.append((where, itemgetter(n_in + j)))
        else:
            raise WireError(f"DEF float slot {j} names {where!r}, not an argument "
                            "left None for it")
    # a RUN's values: n_in input handles, n_out output handles, the floats
    tensor_at = tuple((pos, k) for pos, k in direct if k < n_in)
    float_at = tuple((pos, k + n_out) for pos, k in direct if k >= n_in)
    return Template(tid=tid, name=name, op=op, n_in=n_in, n_out=n_out, n_float=len(floats),
                    args=tuple(consts), dyn=tuple(dyn), kwargs=kconsts, kwdyn=tuple(kwdyn),
                    seeded=torch.Tag.nondeterministic_seeded in op.tags,
                    ids=struct.Struct(f"<{n_in + n_out}Q{len(floats)}d"),
                    call=getattr(op, "_op", op), tensor_at=tensor_at, float_at=float_at)
