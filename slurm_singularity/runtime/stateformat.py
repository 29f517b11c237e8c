"""A checkpoint's payload: a JSON header describing the state, then the
bytes of its tensors, each 64-byte aligned.

Why not ``torch.save``: it pickles, writes a zip record per tensor through
about 1,200 small ``write`` calls for the example model, and its loader has
to be told not to run code. Here the state becomes a small JSON tree plus a
list of tensor buffers that go to the file in a few ``os.writev`` calls, and
loading runs no code from the file by construction.

Payload layout::

    header length (16 decimal digits) | b"\\n" | header (JSON) | zero padding
    to a multiple of 64 | tensor 0 bytes | padding | tensor 1 bytes | ...

The header is ``{"state": TREE, "tensors": [[dtype, shape, offset,
nbytes], ...]}`` with offsets counted from the start of the tensor area.
TREE encodes, so that every type round-trips: a dict as ``{"d": [[key,
value], ...]}``, a list as ``{"l": [...]}``, a tuple as ``{"t": [...]}``,
a tensor as ``{"T": index}``, a numpy array as ``{"A": index}`` (stored as
a tensor, restored as an array); ``str``, ``int``, ``float`` (NaN and the
infinities included), ``bool`` and ``None`` as themselves, and a numpy
scalar as the Python number it holds. Two entries that
are the same tensor (tied weights) share one index, stored once.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch

from slurm_singularity.runtime.api import JobRuntimeError

ALIGN = 64
_LEN_DIGITS = 16


class StateFormatError(JobRuntimeError, ValueError):
    """The state holds something this format cannot store, or a payload's
    header is malformed; the message names the place."""


@dataclass
class Encoded:
    """A state ready to write: ``head`` (length line, header, padding) then
    ``buffers`` in order (tensor bytes and padding), ``nbytes`` in all."""

    head: bytes
    buffers: list[memoryview] = field(default_factory=list)
    nbytes: int = 0


def encode(state: Any) -> Encoded:
    """``state`` -> header and tensor buffers (views of the tensors' memory,
    or of a contiguous CPU copy where a tensor is not one).

    :raises StateFormatError: an object of an unsupported type (names its
        path in the state).
    """
    tensors: list[torch.Tensor] = []
    index: dict[tuple[Any, ...], int] = {}
    tree = _encode(state, tensors, index, ())
    table, buffers, offset = [], [], 0
    for tensor in tensors:
        data = _plain_cpu(tensor)
        raw = data.reshape(-1).view(torch.uint8)
        nbytes = raw.numel()
        table.append([str(data.dtype).removeprefix("torch."), list(data.shape), offset, nbytes])
        if nbytes:
            buffers.append(memoryview(raw.numpy()))
        pad = -nbytes % ALIGN
        if pad:
            buffers.append(memoryview(bytes(pad)))
        offset += nbytes + pad
    header = json.dumps({"state": tree, "tensors": table}, separators=(",", ":")).encode()
    head = f"{len(header):0{_LEN_DIGITS}d}\n".encode() + header
    head += bytes(-len(head) % ALIGN)
    return Encoded(head=head, buffers=buffers, nbytes=len(head) + offset)


def decode(payload: bytes | memoryview) -> Any:
    """Payload bytes -> state; every tensor is a fresh CPU tensor.

    :raises StateFormatError: the header is malformed or points outside the
        payload (names what).
    """
    payload = memoryview(payload)
    try:
        length = int(bytes(payload[:_LEN_DIGITS]))
        header = json.loads(bytes(payload[_LEN_DIGITS + 1:_LEN_DIGITS + 1 + length]))
        tree, table = header["state"], header["tensors"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFormatError(f"payload header is malformed: {exc}") from None
    start = _LEN_DIGITS + 1 + length
    start += -start % ALIGN
    tensors = [_tensor(payload, start, entry, i) for i, entry in enumerate(table)]
    return _decode(tree, tensors, "state")


def _plain_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with the same values (itself when it is one)."""
    data = tensor.detach() if tensor.requires_grad else tensor
    if data.device.type != "cpu":
        data = data.cpu()
    if data.is_conj() or data.is_neg():
        data = data.resolve_conj().resolve_neg()
    return data if data.is_contiguous() else data.contiguous()


def _where(path: tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{key!r}]" for key in path)


def _tensor(payload: memoryview, start: int, entry: Any, i: int) -> torch.Tensor:
    try:
        dtype_name, shape, offset, nbytes = entry
        dtype = getattr(torch, dtype_name)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{dtype_name!r} is not a dtype")
        shape = [int(n) for n in shape]
        if int(offset) < 0 or start + int(offset) + int(nbytes) > len(payload):
            raise ValueError("its bytes lie outside the payload")
        if math.prod(shape) * dtype.itemsize != int(nbytes):
            raise ValueError(f"{nbytes} bytes do not hold {shape} of {dtype_name}")
    except (TypeError, ValueError, AttributeError) as exc:
        raise StateFormatError(f"tensor {i} of the header is malformed: {exc}") from None
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():     # a read-only buffer: cloned at once
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(payload, dtype=torch.uint8, count=int(nbytes),
                               offset=start + int(offset))
    return raw.clone().view(dtype).reshape(shape)


def _encode(obj: Any, tensors: list[torch.Tensor], index: dict, path: tuple[Any, ...]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, numpy.generic) and not isinstance(obj, (numpy.object_, numpy.void)):
        return _encode(obj.item(), tensors, index, path)
    if isinstance(obj, numpy.ndarray):
        try:
            as_tensor = torch.from_numpy(numpy.ascontiguousarray(obj))
        except TypeError as exc:
            raise StateFormatError(f"{_where(path)} is a numpy array a checkpoint cannot "
                                   f"store: {exc}") from None
        return {"A": _encode(as_tensor, tensors, index, path)["T"]}
    if isinstance(obj, torch.Tensor):
        key = (str(obj.device), obj.untyped_storage().data_ptr(), obj.storage_offset(),
               tuple(obj.shape), tuple(obj.stride()), obj.dtype)
        found = index.get(key)
        if found is None:
            found = index[key] = len(tensors)
            tensors.append(obj)
        return {"T": found}
    if isinstance(obj, dict):
        return {"d": [[_encode(k, tensors, index, (*path, "<key>")),
                       _encode(v, tensors, index, (*path, k))] for k, v in obj.items()]}
    if isinstance(obj, list):
        return {"l": [_encode(v, tensors, index, (*path, i)) for i, v in enumerate(obj)]}
    if isinstance(obj, tuple):
        return {"t": [_encode(v, tensors, index, (*path, i)) for i, v in enumerate(obj)]}
    raise StateFormatError(f"{_where(path)} is a {type(obj).__name__}, which a checkpoint cannot "
                           "store (tensors, dicts, lists, tuples, str, int, float, bool, None)")


def _decode(node: Any, tensors: list[torch.Tensor], where: str) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        (tag, value), = node.items()
        try:
            if tag == "T":
                return tensors[value]
            if tag == "A":
                return tensors[value].numpy()
            if tag == "d":
                return {_decode(k, tensors, where): _decode(v, tensors, f"{where}[{k!r}]")
                        for k, v in value}
            if tag == "l":
                return [_decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
            if tag == "t":
                return tuple(_decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value))
        except (TypeError, ValueError, IndexError) as exc:
            raise StateFormatError(f"payload header at {where} is malformed: {exc}") from None
    raise StateFormatError(f"payload header at {where} holds an unknown node {str(node)[:60]}")
