"""The back-end channel, sans-I/O: requests the back-end sends to the
front-end (e.g. CONFIG_CHANGE_MSG) and the front-end's acks (spec
"Back-end message types", REPLY_ACK).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .codec import MessageDecoder, Payload, close_fds, encode
from .constants import BackendRequest
from .errors import ProtocolError


# -- the back-end channel ---------------------------------------------------------------


def encode_backend_request(
    request: BackendRequest, payload: Payload | None = None, need_reply: bool = False
) -> bytes:
    """One back-end request (e.g. CONFIG_CHANGE_MSG, no payload). Set
    ``need_reply`` only with REPLY_ACK negotiated (``conn.reply_ack``)."""
    return encode(BackendRequest(request), payload, need_reply=need_reply)


@dataclass(frozen=True)
class BackendAck:
    """The front-end's u64 answer to a back-end request: 0 is success."""

    request: BackendRequest
    value: int

    @property
    def ok(self) -> bool:
        return self.value == 0


class BackendChannel:
    """Sans-I/O reader of the front-end's replies on the back-end channel.

    ``encode_request`` builds a request and remembers that an ack is due if
    it set NEED_REPLY; each ack read is checked against the oldest such
    request (when any was sent through this object). Fds that come with a
    reply are closed: no reply this layer understands carries one.
    """

    def __init__(self) -> None:
        self._decoder = MessageDecoder.for_backend_replies()
        self._awaiting: deque[BackendRequest] = deque()

    def encode_request(
        self, request: BackendRequest, payload: Payload | None = None, *, need_reply: bool = False
    ) -> bytes:
        data = encode_backend_request(request, payload, need_reply=need_reply)
        if need_reply:
            self._awaiting.append(BackendRequest(request))
        return data

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self._decoder.feed(data, fds)

    def next_ack(self) -> BackendAck | None:
        message = self._decoder.next_message()
        if message is None:
            return None
        close_fds(message.fds)
        if self._awaiting:
            expected = self._awaiting.popleft()
            if message.request is not expected:
                self._decoder.close()
                raise ProtocolError(
                    f"reply to back-end {message.request.name}, but {expected.name} awaits one"
                )
        return BackendAck(message.request, message.payload.value)

    def receive_reply(self, data: bytes, fds: Sequence[int] = ()) -> int | None:
        """Feed ``data``; return the ack value of the next whole reply, or None."""
        if data or fds:
            self.feed(data, fds)
        ack = self.next_ack()
        return None if ack is None else ack.value

    def close(self) -> None:
        self._decoder.close()
