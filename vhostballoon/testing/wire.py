"""vhost-user messages as QEMU's front-end writes them and reads the answers.

Written from QEMU ``docs/interop/vhost-user.rst`` ("spec <section>") and from
what QEMU's ``hw/virtio/vhost-user.c`` checks in what it reads, with plain
``struct``; it shares nothing with the back-end's codec, so that a mistake
there cannot agree with itself here.  All numbers are in native byte order
(spec "Message Specification").

Sans-I/O: ``encode`` makes the bytes of a request (or of a reply on the
back-end channel); a ``MessageReader`` takes received bytes and fds and hands
out whole, checked ``Message`` objects.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Protocol, Union

from .fds import close_fds


class Request(enum.IntEnum):
    """spec "Front-end message types" (``:id:``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # SET_SLAVE_REQ_FD in older copies of the spec
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """spec "Back-end message types": requests the back-end sends on the
    channel it was given with SET_BACKEND_REQ_FD."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntFlag):
    """spec "Protocol features" (VHOST_USER_PROTOCOL_F_*), as masks."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5  # SLAVE_REQ in older copies of the spec
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# spec "Communication": #define VHOST_USER_F_PROTOCOL_FEATURES 30 (here a mask).
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

# spec "Header": flags bits 0-1 the version (0x1), bit 2 reply, bit 3 need_reply.
VERSION = 0x1
VERSION_MASK = 0x3
REPLY = 0x4
NEED_REPLY = 0x8

_HEADER = struct.Struct("=III")  # spec "Header": u32 request, u32 flags, u32 size
HEADER_SIZE = _HEADER.size
_U64 = struct.Struct("=Q")  # spec "A single 64-bit integer"
_VRING_STATE = struct.Struct("=II")  # spec "A vring state description": index, num
# spec "A vring address description": index, flags, then descriptor, used,
# available and log addresses (its table also shows a "size" column; QEMU's
# struct vhost_vring_addr has no such field, and neither has the wire).
_VRING_ADDR = struct.Struct("=IIQQQQ")
_REGION = struct.Struct("=QQQQ")  # spec "Memory regions description": gpa, size, user address, mmap offset
_REGION_COUNT = struct.Struct("=II")  # num regions, padding
_SINGLE_REGION_PADDING = struct.Struct("=Q")  # spec "Single memory region description"
_CONFIG_HEADER = struct.Struct("=III")  # spec "Virtio device config space": offset, size, flags
CONFIG_HEADER_SIZE = _CONFIG_HEADER.size

CONFIG_FLAG_FRONTEND = 0  # spec SET_CONFIG flags: 0 a front-end write, 1 live migration
VRING_FD_NOFD = 0x100  # spec SET_VRING_KICK: "Bit 8 is the invalid FD flag"; bits 0-7 the index

# QEMU reads no body larger than VHOST_USER_PAYLOAD_SIZE (its message union,
# about 1 KiB); anything much larger is garbage in the size field.
MAX_BODY_SIZE = 4096


class WireError(Exception):
    """Bytes from the back-end that are not a message QEMU accepts."""


# -- payloads ------------------------------------------------------------------------


class Payload(Protocol):
    def to_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class Empty:
    """No body (size 0)."""

    def to_bytes(self) -> bytes:
        return b""


@dataclass(frozen=True)
class Raw:
    """A body the kit does not interpret."""

    data: bytes

    def to_bytes(self) -> bytes:
        return bytes(self.data)


@dataclass(frozen=True)
class U64:
    value: int
    size: ClassVar[int] = _U64.size

    def to_bytes(self) -> bytes:
        return _U64.pack(self.value)

    @classmethod
    def from_bytes(cls, body: bytes) -> U64:
        return cls(*_U64.unpack(body))


@dataclass(frozen=True)
class VringState:
    index: int
    num: int
    size: ClassVar[int] = _VRING_STATE.size

    def to_bytes(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)

    @classmethod
    def from_bytes(cls, body: bytes) -> VringState:
        return cls(*_VRING_STATE.unpack(body))


@dataclass(frozen=True)
class VringAddr:
    """Ring addresses are the front-end's user addresses (no IOMMU)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    def to_bytes(self) -> bytes:
        return _VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: the queue index, and the "no fd" bit."""

    index: int
    invalid: bool = False

    def to_bytes(self) -> bytes:
        return _U64.pack(self.index | (VRING_FD_NOFD if self.invalid else 0))


@dataclass(frozen=True)
class MemoryRegion:
    gpa: int
    size: int
    uaddr: int
    mmap_offset: int

    def to_bytes(self) -> bytes:
        return _REGION.pack(self.gpa, self.size, self.uaddr, self.mmap_offset)


@dataclass(frozen=True)
class MemoryTable:
    """SET_MEM_TABLE: a region count, padding, the regions (one fd each)."""

    regions: tuple[MemoryRegion, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))

    def to_bytes(self) -> bytes:
        return _REGION_COUNT.pack(len(self.regions), 0) + b"".join(r.to_bytes() for r in self.regions)


@dataclass(frozen=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""

    region: MemoryRegion

    def to_bytes(self) -> bytes:
        return _SINGLE_REGION_PADDING.pack(0) + self.region.to_bytes()


@dataclass(frozen=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: offset, size, flags, then ``size`` bytes
    (a GET_CONFIG request carries ``size`` bytes too: QEMU sends zeros)."""

    offset: int
    size: int
    flags: int
    data: bytes

    def to_bytes(self) -> bytes:
        return _CONFIG_HEADER.pack(self.offset, self.size, self.flags) + bytes(self.data)

    @classmethod
    def from_bytes(cls, body: bytes) -> ConfigSpace:
        offset, size, flags = _CONFIG_HEADER.unpack_from(body)
        return cls(offset, size, flags, bytes(body[CONFIG_HEADER_SIZE:]))


AnyPayload = Union[Empty, Raw, U64, VringState, VringAddr, VringFd, MemoryTable, SingleMemoryRegion, ConfigSpace]


def encode(
    request: int,
    payload: Payload | None = None,
    *,
    reply: bool = False,
    need_reply: bool = False,
) -> bytes:
    """Header and body of one message (version 1; REPLY and NEED_REPLY as asked)."""
    body = b"" if payload is None else payload.to_bytes()
    flags = VERSION | (REPLY if reply else 0) | (NEED_REPLY if need_reply else 0)
    return _HEADER.pack(int(request), flags, len(body)) + body


def header_of(data: bytes) -> tuple[int, int, int] | None:
    """(request, flags, size) of a message's bytes, None if shorter than a header."""
    return _HEADER.unpack_from(data) if len(data) >= HEADER_SIZE else None


# -- messages the front-end reads ---------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One message read from the back-end; ``fds`` are the reader's caller's."""

    request: int  # a Request or BackendRequest member where the number is known
    flags: int
    payload: AnyPayload
    size: int  # of the body
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    @property
    def name(self) -> str:
        return getattr(self.request, "name", f"request {self.request}")


def _reply_payload(request: int, body: bytes) -> AnyPayload:
    """What QEMU takes from a reply: GET_VRING_BASE a vring state, GET_CONFIG
    a config space (or nothing: spec GET_CONFIG "zero length of payload to
    indicate an error"), everything else a u64 (the REPLY_ACK value, or the
    GET_* number); each of exactly its size (``process_message_reply``,
    ``vhost_user_get_u64``: "Received bad msg size")."""
    if request == Request.GET_CONFIG:
        if not body:
            return Empty()
        if len(body) < CONFIG_HEADER_SIZE:
            raise WireError(f"body is {len(body)} bytes, shorter than the {CONFIG_HEADER_SIZE}-byte config header")
        config = ConfigSpace.from_bytes(body)
        if len(config.data) != config.size:
            raise WireError(
                f"body is {len(body)} bytes, expected {CONFIG_HEADER_SIZE + config.size} "
                f"({CONFIG_HEADER_SIZE} + config size {config.size})"
            )
        return config
    kind = VringState if request == Request.GET_VRING_BASE else U64
    if len(body) != kind.size:
        raise WireError(f"body is {len(body)} bytes, expected {kind.size}")
    return kind.from_bytes(body)


# Back-end channel requests: (the payload they carry or None for uninterpreted,
# how many fds may come with them).  spec "Back-end message types".
_BACKEND_REQUESTS: dict[BackendRequest, tuple[type | None, int]] = {
    BackendRequest.IOTLB_MSG: (None, 0),
    BackendRequest.CONFIG_CHANGE_MSG: (Empty, 0),
    BackendRequest.VRING_HOST_NOTIFIER_MSG: (None, 1),  # "the file descriptor ... passed as ancillary data"
    BackendRequest.VRING_CALL: (VringState, 0),
    BackendRequest.VRING_ERR: (VringState, 0),
    BackendRequest.SHARED_OBJECT_ADD: (None, 0),
    BackendRequest.SHARED_OBJECT_REMOVE: (None, 0),
    BackendRequest.SHARED_OBJECT_LOOKUP: (None, 0),
}


def _backend_request_payload(request: BackendRequest, body: bytes, nfds: int) -> AnyPayload:
    kind, max_fds = _BACKEND_REQUESTS[request]
    if nfds > max_fds:
        takes = f"at most {max_fds}" if max_fds else "none"
        raise WireError(f"carries {nfds} fd{'' if nfds == 1 else 's'}, takes {takes}")
    if kind is None:
        return Raw(body)
    if kind is Empty:
        if body:
            raise WireError(f"body is {len(body)} bytes, expected 0")
        return Empty()
    if len(body) != kind.size:
        raise WireError(f"body is {len(body)} bytes, expected {kind.size}")
    return kind.from_bytes(body)


@dataclass
class _FdChunk:
    last_byte: int  # stream offset of the last byte received with these fds
    fds: list[int]


class MessageReader:
    """Bytes and fds in, whole checked messages out, for one direction: the
    back-end's replies, or the back-end's requests on its own channel.

    The kernel hands over a ``sendmsg``'s fds with the ``recvmsg`` that reads
    its first byte and ends that read inside the same ``sendmsg``: the fds fed
    with a chunk belong to the message that holds the chunk's last byte.
    Fds fed to the reader are its own until a Message hands them out; after
    an error it has closed them all and raises again on every call.
    """

    def __init__(self, *, replies: bool) -> None:
        self._replies = replies
        self._buffer = bytearray()
        self._offset = 0  # stream offset of _buffer[0]
        self._fd_chunks: deque[_FdChunk] = deque()
        self._error: WireError | None = None

    @classmethod
    def for_replies(cls) -> MessageReader:
        return cls(replies=True)

    @classmethod
    def for_backend_requests(cls) -> MessageReader:
        return cls(replies=False)

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if self._error is not None:
            close_fds(fds)
            raise self._error
        self._buffer += data
        if fds:
            self._fd_chunks.append(_FdChunk(self._offset + len(self._buffer) - 1, list(fds)))

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes come."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_message()
        except WireError as exc:
            self._error = exc
            self.close()
            raise

    def close(self) -> None:
        """Close every fd still held."""
        while self._fd_chunks:
            close_fds(self._fd_chunks.popleft().fds)
        self._buffer.clear()

    def _next_message(self) -> Message | None:
        header = header_of(self._buffer)
        if header is None:
            return None
        number, flags, size = header
        kinds = Request if self._replies else BackendRequest
        request: int = kinds._value2member_map_.get(number, number)
        name = getattr(request, "name", f"request {number}")
        name = f"reply to {name}" if self._replies else f"back-end {name}"
        version = flags & VERSION_MASK
        if self._replies and flags != REPLY | VERSION:
            # vhost_user_read_header: "Failed to read msg header. Flags ... instead of ..."
            raise WireError(
                f"{name}: flags {flags:#x} (version {version}), expected {REPLY | VERSION:#x} (REPLY, version 1)"
            )
        if not self._replies:
            if version != VERSION:
                raise WireError(f"{name}: version {version} in flags {flags:#x} (expected 1)")
            if flags & ~(VERSION_MASK | NEED_REPLY):
                raise WireError(f"{name}: flags {flags:#x}: only the version and NEED_REPLY may be set")
            if not isinstance(request, BackendRequest):
                raise WireError(f"unknown {name}")
        if size > MAX_BODY_SIZE:
            raise WireError(f"{name}: body is {size} bytes (at most {MAX_BODY_SIZE})")
        end = HEADER_SIZE + size
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER_SIZE:end])
        fds = self._take_fds(self._offset + end)
        try:
            if self._replies:
                payload = _reply_payload(request, body)
            else:
                payload = _backend_request_payload(request, body, len(fds))
        except WireError as exc:
            close_fds(fds)
            raise WireError(f"{name}: {exc}") from None
        del self._buffer[:end]
        self._offset += end
        return Message(request, flags, payload, size, tuple(fds))

    def _take_fds(self, end: int) -> list[int]:
        """The fds of chunks whose last byte lies before ``end`` (the end of
        the message being read: earlier messages took theirs already)."""
        fds: list[int] = []
        while self._fd_chunks and self._fd_chunks[0].last_byte < end:
            fds.extend(self._fd_chunks.popleft().fds)
        return fds
