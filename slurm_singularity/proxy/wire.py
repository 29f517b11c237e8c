"""The proxy's message encoding: a small, explicit, typed format.

Why not pickle: the proxy serves several workers and must survive any byte
sequence a broken (or hostile) worker of the same user sends it. Decoding
here builds only None, bool, int, float, str, bytes, lists, tuples, str-keyed
dicts, tensor handles, dtypes, the proxy's own device, layouts, memory formats
and raw tensors (dtype, shape, bytes); every read is bounds-checked and every
limit (depth, lengths, sizes) is enforced, so a malformed, truncated or
oversized message raises :class:`WireError` naming what was wrong and the
offset, and nothing else happens.

A message is ``kind:u8 | request_id:u64 | body`` where ``body`` is one encoded
value; the channel frames messages with a ``u32`` length (see ``ring.py``).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import torch

from slurm_singularity.proxy.api import WireError

#: Deepest nesting of lists/tuples/dicts in one value.
MAX_DEPTH = 16
#: Most items in one list, tuple or dict.
MAX_ITEMS = 1 << 20
#: Most dimensions of a tensor.
MAX_NDIM = 16
#: Template ids run from 1 to this; a DEF of a used id replaces that template.
MAX_TEMPLATES = 8192
#: Largest encoded DEF body (its constant arguments), bytes.
MAX_TEMPLATE_BYTES = 16 << 10
#: Most tensor arguments plus outputs of one template.
MAX_TEMPLATE_SLOTS = 4096


class MsgKind(enum.IntEnum):
    """What a message asks for. Requests < 100 come from a worker; replies
    >= 100 come from the proxy."""

    ATTACH = 1      # [job: str] -> OK [device: str, names: list[str]]
    OP = 2          # [op: str, args: list, kwargs: dict, outs: list[int]] no reply
    PUT = 3         # [handle: int, tensor] no reply
    GET = 4         # [handle: int] -> OK tensor
    FREE = 5        # [handles: list[int]] no reply
    BIND = 6        # [name: str, handle: int, host: bool] no reply
    LOOKUP = 7      # [name: str, handle: int] -> OK [dtype, shape, stride, offset, host]
    SET_META = 8    # [key: str, value] no reply
    GET_META = 9    # [key: str] -> OK value
    SEED = 10       # [seed: int] no reply
    BATCH = 11      # [messages: list[bytes]] no reply; executed as one unit
    SYNC = 12       # [] -> OK None (all earlier work done, errors reported)
    SNAPSHOT = 13   # [] -> OK bytes
    RESTORE = 14    # [blob: bytes] -> OK None
    CALL = 15       # like OP, but the op returns a Python value -> OK value
    STATS = 16      # [] -> OK dict
    DEF = 17        # [tid: int, op: str, args: list, kwargs: dict, n_in: int, n_out: int]
    #                 no reply; an OP whose tensor arguments are slots Handle(1..n_in)
    RUN = 18        # raw body, not an encoded value: tid:u32 | n_in + n_out handles:u64
    #                 (an out handle 0: that output is written in place) no reply
    DRAW = 19       # [op: str, args: list, kwargs: dict, out: int, state: uint8 tensor] no
    #                 reply; a random op drawn from a CPU generator in ``state`` (the
    #                 worker's, before its own draw): the same numbers, not uploaded
    OK = 100
    ERROR = 101


#: Kinds whose sender waits for a reply.
REPLY_KINDS = frozenset({MsgKind.ATTACH, MsgKind.GET, MsgKind.LOOKUP, MsgKind.GET_META,
                         MsgKind.SYNC, MsgKind.SNAPSHOT, MsgKind.RESTORE, MsgKind.CALL,
                         MsgKind.STATS})


class Handle:
    """A worker-allocated id of a tensor that lives in the proxy (a plain
    slotted class: one is built per tensor argument of every operator)."""

    __slots__ = ("id",)

    def __init__(self, id: int) -> None:
        if not 0 < id < 1 << 63:
            raise WireError(f"handle id {id} out of range")
        self.id = id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("handle", self.id))

    def __repr__(self) -> str:
        return f"Handle({self.id})"


class ProxyDeviceRef:
    """Marker for "the proxy's device" in an argument (``device=``)."""

    _instance: "ProxyDeviceRef | None" = None

    def __new__(cls) -> "ProxyDeviceRef":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ProxyDeviceRef()"


PROXY_DEVICE = ProxyDeviceRef()

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
    torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
    torch.complex128,
)
_DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
LAYOUTS = (torch.strided, torch.sparse_coo)
_LAYOUT_CODE = {v: i for i, v in enumerate(LAYOUTS)}
MEMORY_FORMATS = (torch.contiguous_format, torch.preserve_format, torch.channels_last,
                  torch.channels_last_3d)
_MF_CODE = {v: i for i, v in enumerate(MEMORY_FORMATS)}

_Q = struct.Struct("<q")
_D = struct.Struct("<d")
_I = struct.Struct("<I")
_HDR = struct.Struct("<BQ")
#: Bytes of a message's header (kind, request id) before its body.
HEADER_BYTES = _HDR.size


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODE[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} is not supported by the proxy") from None


def _encode(value: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise WireError(f"value nested deeper than {MAX_DEPTH}")
    t = type(value)  # fast paths for the common exact types
    if t is Handle:
        out += b"h"
        out += _Q.pack(value.id)
        return
    if t is int and -(1 << 63) <= value < 1 << 63:
        out += b"i"
        out += _Q.pack(value)
        return
    if t is float:
        out += b"f"
        out += _D.pack(value)
        return
    if t is list or t is tuple:
        out += b"l" if t is list else b"u"
        out += _I.pack(len(value))
        for item in value:
            _encode(item, out, depth + 1)
        return
    if value is None:
        out += b"N"
    elif value is True:
        out += b"T"
    elif value is False:
        out += b"F"
    elif isinstance(value, Handle):
        out += b"h"
        out += _Q.pack(value.id)
    elif isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            raise WireError(f"integer {value} does not fit in 64 bits")
        out += b"i"
        out += _Q.pack(value)
    elif isinstance(value, float):
        out += b"f"
        out += _D.pack(value)
    elif isinstance(value, str):
        raw = value.encode()
        out += b"s"
        out += _I.pack(len(raw))
        out += raw
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out += b"y"
        out += _I.pack(len(value))
        out += value
    elif isinstance(value, (list, tuple)):
        out += b"l" if isinstance(value, list) else b"u"
        out += _I.pack(len(value))
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, dict):
        out += b"m"
        out += _I.pack(len(value))
        for key, item in value.items():
            if not isinstance(key, str):
                raise WireError(f"dict key {key!r} is not a str")
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    elif isinstance(value, torch.Tensor):
        encode_tensor(value, out)
    elif isinstance(value, torch.dtype):
        out += b"d"
        out.append(dtype_code(value))
    elif value is PROXY_DEVICE:
        out += b"D"
    elif isinstance(value, torch.layout):
        if value not in _LAYOUT_CODE:
            raise WireError(f"layout {value} is not supported")
        out += b"L"
        out.append(_LAYOUT_CODE[value])
    elif isinstance(value, torch.memory_format):
        out += b"M"
        out.append(_MF_CODE[value])
    else:
        raise WireError(f"cannot encode a {type(value).__name__}")


def encode_tensor(tensor: torch.Tensor, out: bytearray) -> None:
    """Append a plain CPU (or any real) tensor as dtype, shape and raw bytes."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dim() > MAX_NDIM:
        raise WireError(f"tensor has {t.dim()} dimensions, more than {MAX_NDIM}")
    out += b"t"
    out.append(dtype_code(t.dtype))
    out.append(t.dim())
    for size in t.shape:
        out += _Q.pack(size)
    nbytes = t.numel() * t.element_size()
    out += _Q.pack(nbytes)
    if nbytes:
        out += memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode_into(value: Any, out: bytearray) -> None:
    """Append one encoded value (for callers that assemble a body by hand)."""
    _encode(value, out, 1)


def header(kind: MsgKind, request_id: int) -> bytes:
    return _HDR.pack(int(kind), request_id)


def encode_message(kind: MsgKind, request_id: int, body: Any) -> bytes:
    out = bytearray(_HDR.pack(int(kind), request_id))
    _encode(body, out, 0)
    return bytes(out)


class _Reader:
    __slots__ = ("buf", "pos", "max_tensor_bytes")

    def __init__(self, buf: memoryview, max_tensor_bytes: int) -> None:
        self.buf = buf
        self.pos = 0
        self.max_tensor_bytes = max_tensor_bytes

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise WireError(f"truncated message: {what} needs {n} bytes at offset "
                            f"{self.pos}, {len(self.buf) - self.pos} left")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def q(self, what: str) -> int:
        return _Q.unpack(self.take(8, what))[0]

    def count(self, what: str) -> int:
        n = _I.unpack(self.take(4, what))[0]
        if n > MAX_ITEMS:
            raise WireError(f"{what} has {n} items, more than {MAX_ITEMS}")
        return n

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError(f"value nested deeper than {MAX_DEPTH}")
        # fast paths for the common tags; anything unusual (including every
        # error) falls through to the checked path below
        buf, pos = self.buf, self.pos
        end = len(buf)
        if pos < end:
            tag = buf[pos]
            if tag in (0x68, 0x69, 0x66):  # h i f
                if pos + 9 <= end:
                    self.pos = pos + 9
                    if tag == 0x66:
                        return _D.unpack_from(buf, pos + 1)[0]
                    v = _Q.unpack_from(buf, pos + 1)[0]
                    if tag == 0x69:
                        return v
                    if 0 < v:
                        return Handle(v)
                    self.pos = pos
            elif tag in (0x6C, 0x75):  # l u
                if pos + 5 <= end:
                    n = _I.unpack_from(buf, pos + 1)[0]
                    if n <= MAX_ITEMS and n <= end - pos - 5:
                        self.pos = pos + 5
                        items = [self.value(depth + 1) for _ in range(n)]
                        return items if tag == 0x6C else tuple(items)
            elif tag == 0x73:  # s
                if pos + 5 <= end:
                    n = _I.unpack_from(buf, pos + 1)[0]
                    if pos + 5 + n <= end:
                        try:
                            text = str(buf[pos + 5:pos + 5 + n], "utf-8")
                        except UnicodeDecodeError:
                            text = None
                        if text is not None:
                            self.pos = pos + 5 + n
                            return text
            elif tag == 0x4E:
                self.pos = pos + 1
                return None
        at = self.pos
        tag = bytes(self.take(1, "a type tag"))
        if tag == b"N":
            return None
        if tag == b"T":
            return True
        if tag == b"F":
            return False
        if tag == b"i":
            return self.q("an int")
        if tag == b"f":
            return _D.unpack(self.take(8, "a float"))[0]
        if tag == b"h":
            return Handle(self.q("a handle"))
        if tag == b"s":
            raw = self.take(self.count("a str"), "a str")
            try:
                return bytes(raw).decode()
            except UnicodeDecodeError:
                raise WireError(f"str at offset {at} is not UTF-8") from None
        if tag == b"y":
            return bytes(self.take(self.count("bytes"), "bytes"))
        if tag in (b"l", b"u"):
            n = self.count("a list")
            items = [self.value(depth + 1) for _ in range(n)]
            return items if tag == b"l" else tuple(items)
        if tag == b"m":
            n = self.count("a dict")
            out: dict[str, Any] = {}
            for _ in range(n):
                key = self.value(depth + 1)
                if not isinstance(key, str):
                    raise WireError(f"dict key at offset {at} is not a str")
                out[key] = self.value(depth + 1)
            return out
        if tag == b"t":
            return self.tensor()
        if tag == b"d":
            code = self.u8("a dtype")
            if code >= len(DTYPES):
                raise WireError(f"unknown dtype code {code} at offset {at}")
            return DTYPES[code]
        if tag == b"D":
            return PROXY_DEVICE
        if tag == b"L":
            code = self.u8("a layout")
            if code >= len(LAYOUTS):
                raise WireError(f"unknown layout code {code} at offset {at}")
            return LAYOUTS[code]
        if tag == b"M":
            code = self.u8("a memory format")
            if code >= len(MEMORY_FORMATS):
                raise WireError(f"unknown memory format code {code} at offset {at}")
            return MEMORY_FORMATS[code]
        raise WireError(f"unknown type tag {tag!r} at offset {at}")

    def tensor(self) -> torch.Tensor:
        at = self.pos
        code = self.u8("a tensor dtype")
        if code >= len(DTYPES):
            raise WireError(f"unknown dtype code {code} in tensor at offset {at}")
        dtype = DTYPES[code]
        ndim = self.u8("a tensor rank")
        if ndim > MAX_NDIM:
            raise WireError(f"tensor at offset {at} has {ndim} dims, more than {MAX_NDIM}")
        shape = [self.q("a tensor dim") for _ in range(ndim)]
        if any(s < 0 for s in shape):
            raise WireError(f"tensor at offset {at} has a negative dim {shape}")
        nbytes = self.q("tensor byte count")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if nbytes != numel * itemsize:
            raise WireError(f"tensor at offset {at}: {nbytes} bytes for shape {shape} "
                            f"of {dtype}, expected {numel * itemsize}")
        if nbytes > self.max_tensor_bytes:
            raise WireError(f"tensor at offset {at} has {nbytes} bytes, more than "
                            f"{self.max_tensor_bytes}")
        raw = self.take(nbytes, "tensor data")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # the payload is a fresh bytearray per message: share it rather than
        # copy it, unless the data would be misaligned for the kernels
        flat = torch.frombuffer(raw if not raw.readonly else bytearray(raw), dtype=torch.uint8)
        if flat.data_ptr() % 64:
            flat = flat.clone()
        return flat.view(dtype).reshape(shape)


def decode_message(payload: bytes | memoryview, max_tensor_bytes: int = 1 << 34
                   ) -> tuple[int, int, Any]:
    """``payload`` -> ``(kind, request_id, body)``; ``kind`` is range-checked
    by the caller against :class:`MsgKind`.

    :raises WireError: malformed, truncated, trailing bytes, over a limit.
    """
    reader = _Reader(memoryview(payload), max_tensor_bytes)
    raw = reader.take(_HDR.size, "the message header")
    kind, request_id = _HDR.unpack(raw)
    body = reader.value(0)
    if reader.pos != len(reader.buf):
        raise WireError(f"{len(reader.buf) - reader.pos} trailing bytes after the body")
    return kind, request_id, body


def decode_frame(payload: bytes | memoryview, max_tensor_bytes: int = 1 << 34
                 ) -> tuple[int, int, Any]:
    """Like :func:`decode_message`, but a RUN's body is returned as its raw
    bytes (a memoryview): it is not an encoded value, and it is the message
    sent most often, so its few fields are read by its handler."""
    if len(payload) >= _HDR.size and payload[0] == MsgKind.RUN:
        kind, request_id = _HDR.unpack_from(payload)
        return kind, request_id, memoryview(payload)[_HDR.size:]
    if payload[:1] == bytes([MsgKind.DEF]) and len(payload) > MAX_TEMPLATE_BYTES:
        raise WireError(f"DEF message of {len(payload)} bytes is larger than "
                        f"{MAX_TEMPLATE_BYTES} bytes")
    return decode_message(payload, max_tensor_bytes)
