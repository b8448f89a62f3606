"""vhost-user messages on the wire: typed payloads, ``encode`` and a decoder.

A message is a 12-byte header (u32 request, u32 flags, u32 body size, all in
native byte order) and a body. Each payload type below knows its bytes
(``construct`` structs); one table per direction says, for every request,
which payload type its body is, whether its size is fixed, and which fds may
come with it. The decoder applies that table to every message before anyone
sees it, so a handler only ever receives a body of exactly the right size
with exactly the right fds.

The back-end decodes requests and encodes replies; tests that play the
front-end by hand do the opposite (the conformance kit,
``vhostballoon.testing``, has its own codec, ``testing/wire.py``, so that a
bug here cannot agree with itself)::

    from vhostballoon.vhost_user.codec import MessageDecoder, encode, Empty
    from vhostballoon.vhost_user.constants import Request

    sock.sendall(encode(Request.GET_FEATURES, Empty()))
    replies = MessageDecoder.for_replies()
    replies.feed(sock.recv(4096))
    reply = replies.next_message()   # Message(GET_FEATURES, flags=0x5, U64(...))

File descriptors: feed each ``recvmsg`` chunk with the fds that came with
it. On a unix stream socket the kernel hands over the fds of one
``sendmsg`` with the chunk that holds that sendmsg's first byte, and it ends
the chunk within that sendmsg (``unix_stream_read_generic`` stops after an
skb that carries fds). A chunk may still *start* with the tail of earlier
messages that had no fds. So the fds fed with a chunk belong to the LAST
message that begins in that chunk; fds fed with a chunk in which no message
begins are a ProtocolError. A sender must therefore send each fd-carrying
message with its own ``sendmsg`` (QEMU does).

Every fd handed to a decoder is owned by it until ``next_message`` returns
it inside a Message (then the caller owns it); fds of a rejected message are
closed before the error is raised, and ``close()`` closes the rest.
"""

from __future__ import annotations

import enum
import os
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import construct as c

from .constants import (
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_BODY_SIZE,
    MAX_FDS,
    NEED_REPLY,
    REPLY,
    VERSION,
    VERSION_MASK,
    BackendRequest,
    Request,
)
from .errors import LocalProtocolError, ProtocolError

__all__ = [
    "ConfigSpace",
    "Direction",
    "Empty",
    "FdRule",
    "MemoryRegion",
    "MemoryTable",
    "Message",
    "MessageDecoder",
    "MessageSpec",
    "Payload",
    "Raw",
    "SingleMemoryRegion",
    "U64",
    "VringAddr",
    "VringFd",
    "VringState",
    "close_fds",
    "encode",
    "encode_payload",
]

from .payloads import (  # noqa: E402 (the bodies, re-exported: codec is where callers look)
    ConfigSpace,
    Empty,
    MemoryRegion,
    MemoryTable,
    Payload,
    Raw,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringFd,
    VringState,
    encode_payload,
    _HEADER_FAST,
)


# -- messages -------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One decoded message. ``request`` is a Request or BackendRequest member;
    ``fds`` are owned by whoever received the Message."""

    request: int
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY)

    @property
    def size(self) -> int:
        """The body size (the decoder checked it equals the header's)."""
        return len(encode_payload(self.payload))

    @property
    def name(self) -> str:
        return getattr(self.request, "name", str(self.request))


def encode(
    request: int,
    payload: Payload | None = None,
    *,
    flags: int = VERSION,
    reply: bool = False,
    need_reply: bool = False,
) -> bytes:
    """Header + body of one message.

    ``reply`` sets the REPLY flag (back-end replies, front-end replies on the
    back-end channel); ``need_reply`` sets NEED_REPLY. The payload type is not
    checked against the request, so tests can build malformed messages.
    """
    body = encode_payload(Empty() if payload is None else payload)
    if reply:
        flags |= REPLY
    if need_reply:
        flags |= NEED_REPLY
    try:
        header = _HEADER_FAST.pack(int(request), flags, len(body))
    except (c.ConstructError, OverflowError, struct.error) as exc:
        raise LocalProtocolError(f"cannot encode header of request {request}: {exc}") from exc
    return header + body


# -- the wire tables -------------------------------------------------------------


class FdRule(enum.Enum):
    """How many fds may come with a message."""

    NONE = "none"
    ONE = "exactly 1"
    OPTIONAL = "0 or 1"
    PER_REGION = "1 per memory region"
    VRING_FILE = "1, or none when the no-fd bit is set"
    ANY = f"up to {MAX_FDS}"


@dataclass(frozen=True)
class MessageSpec:
    """What a message's body and fds must be. The size is ``payload.fixed_size``
    when that is not None, else computed by ``payload.from_bytes`` (memory
    table: 8 + 32 * nregions; config: 12 + size). ``empty_ok``: a 0-byte body
    is also accepted and decodes as Empty (GET_CONFIG's failure reply)."""

    payload: type
    fds: FdRule = FdRule.NONE
    empty_ok: bool = False


_NO_BODY = MessageSpec(Empty)
_U64_BODY = MessageSpec(U64)
_STATE_BODY = MessageSpec(VringState)
_VRING_FILE_BODY = MessageSpec(VringFd, FdRule.VRING_FILE)
_UNINTERPRETED = MessageSpec(Raw, FdRule.ANY)

# Front-end -> back-end requests (spec "Front-end message types").
REQUEST_SPECS: Mapping[Request, MessageSpec] = {
    Request.GET_FEATURES: _NO_BODY,
    Request.SET_FEATURES: _U64_BODY,
    Request.SET_OWNER: _NO_BODY,
    Request.RESET_OWNER: _NO_BODY,
    Request.SET_MEM_TABLE: MessageSpec(MemoryTable, FdRule.PER_REGION),
    Request.SET_VRING_NUM: _STATE_BODY,
    Request.SET_VRING_ADDR: MessageSpec(VringAddr),
    Request.SET_VRING_BASE: _STATE_BODY,
    Request.GET_VRING_BASE: _STATE_BODY,
    Request.SET_VRING_KICK: _VRING_FILE_BODY,
    Request.SET_VRING_CALL: _VRING_FILE_BODY,
    Request.SET_VRING_ERR: _VRING_FILE_BODY,
    Request.GET_PROTOCOL_FEATURES: _NO_BODY,
    Request.SET_PROTOCOL_FEATURES: _U64_BODY,
    Request.GET_QUEUE_NUM: _NO_BODY,
    Request.SET_VRING_ENABLE: _STATE_BODY,
    Request.SET_BACKEND_REQ_FD: MessageSpec(Empty, FdRule.ONE),  # QEMU: size 0, 1 fd
    Request.GET_CONFIG: MessageSpec(ConfigSpace),
    Request.SET_CONFIG: MessageSpec(ConfigSpace),
    Request.RESET_DEVICE: _NO_BODY,
    Request.GET_MAX_MEM_SLOTS: _NO_BODY,
    Request.ADD_MEM_REG: MessageSpec(SingleMemoryRegion, FdRule.ONE),
    # spec REM_MEM_REG: no fd SHOULD be passed; the back-end MAY accept one
    # and MUST then close it unused.
    Request.REM_MEM_REG: MessageSpec(SingleMemoryRegion, FdRule.OPTIONAL),
    Request.SET_STATUS: _U64_BODY,
    Request.GET_STATUS: _NO_BODY,
}
# Everything else is read whole (up to MAX_BODY_SIZE and MAX_FDS) so that the
# connection can refuse it by name.
REQUEST_SPECS = {r: REQUEST_SPECS.get(r, _UNINTERPRETED) for r in Request}

# Back-end -> front-end replies, by the request they answer. A request without
# a reply of its own is answered (when NEED_REPLY asks) by a u64 ack.
REPLY_SPECS: Mapping[Request, MessageSpec] = {
    Request.GET_VRING_BASE: _STATE_BODY,
    # spec GET_CONFIG: "zero length of payload to indicate an error"
    Request.GET_CONFIG: MessageSpec(ConfigSpace, empty_ok=True),
    # Replies this layer does not model (postcopy, inflight, device state,
    # shared objects, ...): read whole.
    Request.SET_LOG_BASE: _UNINTERPRETED,
    Request.CREATE_CRYPTO_SESSION: _UNINTERPRETED,
    Request.POSTCOPY_ADVISE: _UNINTERPRETED,
    Request.GET_INFLIGHT_FD: _UNINTERPRETED,
    Request.GET_SHARED_OBJECT: _UNINTERPRETED,
    Request.SET_DEVICE_STATE_FD: _UNINTERPRETED,
    Request.GET_SHMEM_CONFIG: _UNINTERPRETED,
}
REPLY_SPECS = {r: REPLY_SPECS.get(r, _U64_BODY) for r in Request}

# Back-end -> front-end requests on the back-end channel (spec "Back-end
# message types").
BACKEND_REQUEST_SPECS: Mapping[BackendRequest, MessageSpec] = {
    BackendRequest.IOTLB_MSG: MessageSpec(Raw),
    BackendRequest.CONFIG_CHANGE_MSG: _NO_BODY,
    BackendRequest.VRING_HOST_NOTIFIER_MSG: MessageSpec(Raw, FdRule.OPTIONAL),
    BackendRequest.VRING_CALL: _STATE_BODY,
    BackendRequest.VRING_ERR: _STATE_BODY,
    BackendRequest.SHARED_OBJECT_ADD: MessageSpec(Raw),
    BackendRequest.SHARED_OBJECT_REMOVE: MessageSpec(Raw),
    BackendRequest.SHARED_OBJECT_LOOKUP: MessageSpec(Raw),
}

# Front-end -> back-end replies on the back-end channel: a u64 (QEMU
# backend_read: payload.u64 = !!ret, size 8; LOOKUP may add a dma-buf fd).
BACKEND_REPLY_SPECS: Mapping[BackendRequest, MessageSpec] = {
    r: MessageSpec(U64, FdRule.OPTIONAL if r is BackendRequest.SHARED_OBJECT_LOOKUP else FdRule.NONE)
    for r in BackendRequest
}


class Direction(enum.Enum):
    """Which stream a decoder reads."""

    REQUESTS = "front-end requests"  # read by the back-end
    REPLIES = "back-end replies"  # read by the front-end
    BACKEND_REQUESTS = "back-end channel requests"  # read by the front-end
    BACKEND_REPLIES = "back-end channel replies"  # read by the back-end


_DIRECTION_TABLES: dict[Direction, tuple[type, Mapping, bool]] = {
    # direction: (request enum, spec table, carries replies)
    Direction.REQUESTS: (Request, REQUEST_SPECS, False),
    Direction.REPLIES: (Request, REPLY_SPECS, True),
    Direction.BACKEND_REQUESTS: (BackendRequest, BACKEND_REQUEST_SPECS, False),
    Direction.BACKEND_REPLIES: (BackendRequest, BACKEND_REPLY_SPECS, True),
}


def close_fds(fds: Sequence[int]) -> None:
    """Close each fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _count(n: int, what: str = "fd") -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


@dataclass
class _FdChunk:
    start: int  # stream offset of the chunk's first byte
    end: int  # stream offset just past its last byte
    fds: tuple[int, ...]


class MessageDecoder:
    """Bytes and fds in, whole validated :class:`Message` objects out.

    One decoder reads one direction (see :class:`Direction`); use the
    ``for_*`` constructors. After a ProtocolError the decoder has closed every
    fd it held and raises again on every call.
    """

    def __init__(self, direction: Direction = Direction.REQUESTS) -> None:
        self._direction = direction
        self._kinds, self._specs, self._replies = _DIRECTION_TABLES[direction]
        self._buffer = bytearray()
        self._offset = 0  # stream offset of _buffer[0]
        self._fd_chunks: deque[_FdChunk] = deque()
        self._error: ProtocolError | None = None
        self._closed = False
        self._names: dict[int, str] = {}  # request -> name for errors, known requests only

    @classmethod
    def for_requests(cls) -> MessageDecoder:
        """Front-end requests, as the back-end reads them."""
        return cls(Direction.REQUESTS)

    @classmethod
    def for_replies(cls) -> MessageDecoder:
        """The back-end's replies, as a front-end reads them."""
        return cls(Direction.REPLIES)

    @classmethod
    def for_backend_requests(cls) -> MessageDecoder:
        """Back-end channel requests, as a front-end reads them."""
        return cls(Direction.BACKEND_REQUESTS)

    @classmethod
    def for_backend_replies(cls) -> MessageDecoder:
        """The front-end's replies on the back-end channel, as the back-end reads them."""
        return cls(Direction.BACKEND_REPLIES)

    @property
    def direction(self) -> Direction:
        return self._direction

    @property
    def has_partial_message(self) -> bool:
        """True if bytes of an unfinished message are buffered (an EOF now
        would cut a message short)."""
        return bool(self._buffer)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add one received chunk and the fds that came with it (the decoder
        now owns them)."""
        fds = tuple(fds)
        if self._closed:
            close_fds(fds)
            raise LocalProtocolError("feed() after close()")
        if self._error is not None:
            close_fds(fds)
            raise ProtocolError(str(self._error))
        if fds and not data:
            close_fds(fds)
            raise LocalProtocolError("fds fed without data (the kernel passes fds only with bytes)")
        if len(fds) > MAX_FDS:
            self._fail_with(ProtocolError(f"{len(fds)} fds arrived with one chunk (at most {MAX_FDS})"), fds)
        start = self._offset + len(self._buffer)
        self._buffer += data
        if fds:
            self._fd_chunks.append(_FdChunk(start, start + len(data), fds))

    def next_message(self) -> Message | None:
        """The next whole message, or None if more bytes are needed."""
        if self._closed:
            raise LocalProtocolError("next_message() after close()")
        if self._error is not None:
            raise ProtocolError(str(self._error))
        try:
            return self._next_message()
        except ProtocolError as exc:
            self._fail_with(exc)

    def close(self) -> None:
        """Close every fd still held. Idempotent."""
        self._closed = True
        self._close_held()

    # -- internals --

    def _close_held(self) -> None:
        while self._fd_chunks:
            close_fds(self._fd_chunks.popleft().fds)
        self._buffer.clear()

    def _fail_with(self, exc: ProtocolError, extra_fds: Sequence[int] = ()):
        close_fds(extra_fds)
        self._error = exc
        self._close_held()
        raise exc

    def _name(self, request: int) -> str:
        member = self._kinds._value2member_map_.get(request)
        label = member.name if member is not None else f"request {request}"
        if self._kinds is BackendRequest:
            label = f"back-end {label}"
        return f"reply to {label}" if self._replies else label

    def _next_message(self) -> Message | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        request, flags, size = _HEADER_FAST.unpack_from(self._buffer)
        name = self._names.get(request)
        if name is None:
            name = self._name(request)
            if request in self._kinds._value2member_map_:
                self._names[request] = name
        version = flags & VERSION_MASK
        if version != VERSION:
            raise ProtocolError(f"{name}: version {version} in flags {flags:#x} (expected {VERSION})")
        kind = self._kinds._value2member_map_.get(request)
        if kind is None:
            raise ProtocolError(f"unknown {name}" if not self._replies else f"{name}: unknown request")
        unknown_bits = flags & ~KNOWN_FLAGS
        if unknown_bits:
            raise ProtocolError(f"{name}: unknown flag bits {unknown_bits:#x} in flags {flags:#x}")
        if self._replies:
            if not flags & REPLY:
                raise ProtocolError(f"{name}: REPLY flag missing in flags {flags:#x}")
            if flags & NEED_REPLY:
                raise ProtocolError(f"{name}: NEED_REPLY flag set on a reply (flags {flags:#x})")
        elif flags & REPLY:
            raise ProtocolError(f"{name}: REPLY flag set on a request (flags {flags:#x})")
        spec: MessageSpec = self._specs[kind]
        fixed = spec.payload.fixed_size
        if size > MAX_BODY_SIZE:
            raise ProtocolError(f"{name}: body is {size} bytes (at most {MAX_BODY_SIZE})")
        if fixed is not None and size != fixed and not (spec.empty_ok and size == 0):
            raise ProtocolError(f"{name}: body is {size} bytes, expected {fixed}")
        total = HEADER_SIZE + size
        if len(self._buffer) < total:
            return None
        fds = self._take_fds(name, self._offset, self._offset + total)
        try:
            body = bytes(self._buffer[HEADER_SIZE:total])
            if spec.empty_ok and size == 0:
                payload: Payload = Empty()
            else:
                payload = spec.payload.from_bytes(name, body)
            _check_fds(name, spec.fds, payload, len(fds))
        except ProtocolError as exc:
            close_fds(fds)
            if not fds and self._fd_chunks and self._fd_chunks[0].start <= self._offset:
                raise ProtocolError(
                    f"{exc} (the fds fed with its first byte belong to a later message that "
                    "begins in the same chunk: send each fd-carrying message with its own sendmsg)"
                ) from None
            raise
        del self._buffer[:total]
        self._offset += total
        return Message(kind, flags, payload, fds)

    def _take_fds(self, name: str, start: int, end: int) -> tuple[int, ...]:
        """The fds of the message at stream offsets [start, end): those of the
        chunk in which it is the last message to begin."""
        taken: tuple[int, ...] = ()
        while self._fd_chunks and self._fd_chunks[0].start < end:
            chunk = self._fd_chunks[0]
            if chunk.start <= start:  # the message begins in this chunk
                if chunk.end > end:
                    break  # a later message begins in it too: they are its fds
                taken = self._fd_chunks.popleft().fds
                continue
            if chunk.end > end:
                break  # the next message begins in this chunk
            close_fds(taken)
            raise ProtocolError(
                f"{name}: {_count(len(chunk.fds))} arrived with bytes "
                f"{chunk.start - start}..{chunk.end - start - 1} of the message, "
                "not with its first byte"
            )
        return taken


def _check_fds(name: str, rule: FdRule, payload: Payload, count: int) -> None:
    carries = f"{name} carries {_count(count)}"
    if rule is FdRule.NONE:
        if count:
            raise ProtocolError(f"{carries}, takes none")
    elif rule is FdRule.ONE:
        if count != 1:
            raise ProtocolError(f"{carries}, takes exactly 1")
    elif rule is FdRule.OPTIONAL:
        if count > 1:
            raise ProtocolError(f"{carries}, takes at most 1")
    elif rule is FdRule.PER_REGION:
        assert isinstance(payload, MemoryTable)
        nregions = len(payload.regions)
        if count != nregions:
            raise ProtocolError(f"{name}: {_count(nregions, 'region')} but {_count(count)}")
    elif rule is FdRule.VRING_FILE:
        assert isinstance(payload, VringFd)
        if payload.invalid and count:
            raise ProtocolError(f"{carries} but its no-fd bit (0x100) is set")
        if not payload.invalid and count != 1:
            raise ProtocolError(f"{carries}, takes exactly 1 (no-fd bit not set)")
    elif rule is FdRule.ANY:
        pass  # at most MAX_FDS per chunk, checked by feed()
