"""A worker that speaks the proxy's wire format by hand (for the tests of
bad input), and the limit of the ``open_proxy`` fixture."""

from __future__ import annotations

from slurm_singularity.proxy import ring
from slurm_singularity.proxy.wire import MsgKind, decode_message, encode_message

#: max_message_bytes of the ``open_proxy`` fixture.
LIMIT = 1 << 20


class RawWorker:
    """A worker that speaks the wire format by hand."""

    def __init__(self, addr: str) -> None:
        self.ch = ring.connect(addr)
        self.rid = 1000
        assert self.request(MsgKind.ATTACH, ["fuzz"])[-1][0] == MsgKind.OK

    def request(self, kind: MsgKind, body) -> list[tuple[int, int, object]]:
        """Send a request; return every reply up to and including its own."""
        self.rid += 1
        self.ch.send(encode_message(kind, self.rid, body))
        return self.replies_until(self.rid)

    def replies_until(self, rid: int) -> list[tuple[int, int, object]]:
        got = []
        while True:
            got.append(decode_message(self.ch.recv(1 << 30)))
            if got[-1][1] == rid:
                return got

    def sync_after(self, payload: bytes) -> list[tuple[int, int, object]]:
        self.ch.send(payload)
        return self.request(MsgKind.SYNC, [])


def errors(replies) -> list[str]:
    return [v for k, _r, v in replies if k == MsgKind.ERROR]
