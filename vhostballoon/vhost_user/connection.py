"""The back-end side of a vhost-user connection, sans-I/O (in the manner of h11).

Bytes and fds in (``receive_data``), events out (``next_event``), bytes out
(``data_to_send``); no socket anywhere::

    conn = BackendConnection(device_features=..., protocol_features=...,
                             num_queues=5, config_size=16)
    conn.receive_data(data, fds)
    while (event := conn.next_event()) is not NEED_DATA:
        payload = handle(event)             # the device's business
        conn.complete(event, payload)       # or ok=False to refuse it
    sock.sendall(conn.data_to_send())

Protocol-level requests (feature and protocol-feature negotiation, owner,
queue count, memory slots, status) are answered by the connection itself.
Device-level requests come out as events; each must be completed with
``complete`` before ``next_event`` is called again, and its reply (its own,
or the REPLY_ACK u64) is queued then. Every rule of what is legal when lives
in one table, ``RULES``: a request that is illegal now fails that lookup
with a ProtocolError that names the request and the reason.

Fds: the connection owns every fd handed to ``receive_data`` until
``next_event`` returns it inside an event; from then on the caller owns it.
Fds of a rejected message are closed before the error is raised; ``close()``
closes the rest.

After any error the connection is poisoned: ``receive_data``,
``next_event`` and ``complete`` raise again (ProtocolError after a peer's
fault, LocalProtocolError after ours). ``data_to_send`` still returns the
replies already earned, and ``close`` always works.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .codec import (
    ConfigSpace,
    Empty,
    Message,
    MessageDecoder,
    MemoryRegion,
    Payload,
    U64,
    VringState,
    close_fds,
    encode,
)
from .constants import (
    MAX_CONFIG_SIZE,
    MAX_MEM_SLOTS,
    MAX_VRING_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_RING_PACKED,
    VRING_ADDR_F_LOG,
    VRING_FD_INDEX_MASK,
    BackendRequest,
    ProtocolFeature,
    Request,
    CONFIG_FLAG_FRONTEND,
    CONFIG_FLAG_MIGRATION,
)
from .errors import LocalProtocolError, ProtocolError, VhostUserError

__all__ = [
    "NEED_DATA",
    "SUPPORTED_PROTOCOL_FEATURES",
    "RULES",
    "BackendAck",
    "BackendChannel",
    "BackendChannelSet",
    "BackendConnection",
    "ConfigGet",
    "ConfigSet",
    "DeviceReset",
    "Event",
    "FeaturesSet",
    "MemoryRegionAdded",
    "MemoryRegionRemoved",
    "MemoryTableSet",
    "StatusSet",
    "VringAddrSet",
    "VringBaseGet",
    "VringBaseSet",
    "VringCallSet",
    "VringEnableSet",
    "VringErrSet",
    "VringKickSet",
    "VringNumSet",
    "encode",
    "encode_backend_request",
]


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: ``next_event`` returns this when it needs more bytes.
NEED_DATA = _NeedData()

# The protocol features this layer implements; the caller offers a subset.
SUPPORTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
)

# virtio feature bits this layer cannot serve: VHOST_F_LOG_ALL (26, dirty
# logging) and VIRTIO_F_IOMMU_PLATFORM (33, needs IOTLB_MSG).
_UNSERVABLE_DEVICE_FEATURES = {1 << 26: "VHOST_F_LOG_ALL", 1 << 33: "VIRTIO_F_IOMMU_PLATFORM"}


# -- events -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Event:
    """A device-level request. ``request`` and ``need_reply`` are the original
    message's, for logging; the connection sends the reply itself."""

    request: Request
    need_reply: bool = False

    @property
    def fds(self) -> tuple[int, ...]:
        """The fds this event hands to the caller (who now owns them)."""
        return ()


@dataclass(frozen=True)
class FeaturesSet(Event):
    """SET_FEATURES (already stored as ``acked_features``). Without
    VHOST_USER_F_PROTOCOL_FEATURES in ``features`` every ring starts enabled
    (spec "Ring states")."""

    features: int


@dataclass(frozen=True)
class StatusSet(Event):
    """SET_STATUS (already stored as ``status``)."""

    status: int


@dataclass(frozen=True)
class MemoryTableSet(Event):
    """SET_MEM_TABLE: the whole table, each region with its fd."""

    regions: tuple[tuple[MemoryRegion, int], ...]

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(fd for _, fd in self.regions)


@dataclass(frozen=True)
class MemoryRegionAdded(Event):
    region: MemoryRegion
    fd: int

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True)
class MemoryRegionRemoved(Event):
    """REM_MEM_REG; the region is identified by gpa, uaddr and size (its
    mmap_offset is to be ignored, spec REM_MEM_REG)."""

    region: MemoryRegion


@dataclass(frozen=True)
class VringNumSet(Event):
    index: int
    num: int


@dataclass(frozen=True)
class VringAddrSet(Event):
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class VringBaseSet(Event):
    index: int
    base: int


@dataclass(frozen=True)
class VringBaseGet(Event):
    """GET_VRING_BASE: stop the ring; complete with its last avail index."""

    index: int


@dataclass(frozen=True)
class _VringFileSet(Event):
    index: int
    fd: int | None  # None: the no-fd bit was set

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)


@dataclass(frozen=True)
class VringKickSet(_VringFileSet):
    """SET_VRING_KICK; ``fd`` None means "poll" (spec)."""


@dataclass(frozen=True)
class VringCallSet(_VringFileSet):
    pass


@dataclass(frozen=True)
class VringErrSet(_VringFileSet):
    pass


@dataclass(frozen=True)
class VringEnableSet(Event):
    index: int
    enabled: bool


@dataclass(frozen=True)
class ConfigGet(Event):
    """GET_CONFIG; complete with exactly ``size`` bytes (or ok=False)."""

    offset: int
    size: int
    flags: int


@dataclass(frozen=True)
class ConfigSet(Event):
    """SET_CONFIG; ``flags`` 0 is a front-end (guest) write, 1 migration."""

    offset: int
    data: bytes
    flags: int


@dataclass(frozen=True)
class BackendChannelSet(Event):
    """SET_BACKEND_REQ_FD: the socket for back-end requests."""

    fd: int

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True)
class DeviceReset(Event):
    """RESET_DEVICE, or the deprecated RESET_OWNER (see ``request``)."""


# -- the state table -----------------------------------------------------------------


class Handling(enum.Enum):
    CONNECTION = "answered by the connection"
    EVENT = "handed to the caller as an event"
    UNSUPPORTED = "refused: not implemented by this back-end"


class _Requirement(enum.Enum):
    # spec SET_VRING_ENABLE: only when VHOST_USER_F_PROTOCOL_FEATURES "has been
    # negotiated". Before SET_FEATURES, SET_PROTOCOL_FEATURES shows that the
    # front-end uses it; after SET_FEATURES, bit 30 must have been acked.
    F_PROTOCOL_FEATURES = "VHOST_USER_F_PROTOCOL_FEATURES (bit 30)"


@dataclass(frozen=True)
class Rule:
    """What the connection does with one request.

    ``requires``: a protocol feature (or bit 30) that must be negotiated first.
    ``reply``: the payload type of the request's own reply; None means it has
    none, and gets a u64 ack only when NEED_REPLY asks for one.
    ``handler``: the BackendConnection method that validates the message and
    returns either the reply payload (CONNECTION) or an Event (EVENT).
    ``refusal``: why an UNSUPPORTED request is refused.
    """

    handling: Handling
    handler: str = ""
    requires: ProtocolFeature | _Requirement | None = None
    reply: type | None = None
    refusal: str = ""


def _answer(handler: str, reply: type | None = None, requires=None) -> Rule:
    return Rule(Handling.CONNECTION, handler, requires, reply)


def _event(handler: str, reply: type | None = None, requires=None) -> Rule:
    return Rule(Handling.EVENT, handler, requires, reply)


def _refuse(reason: str) -> Rule:
    return Rule(Handling.UNSUPPORTED, refusal=reason)


def _not_offered(feature: ProtocolFeature) -> Rule:
    return _refuse(f"protocol feature {feature.name} not offered")


_PF = ProtocolFeature
R = Request

#: The one table of what is legal when, for every front-end request.
RULES: dict[Request, Rule] = {
    R.GET_FEATURES: _answer("_get_features", U64),
    R.SET_FEATURES: _event("_set_features"),  # stored here, and told to the device
    R.SET_OWNER: _answer("_set_owner"),
    R.RESET_OWNER: _event("_reset_owner"),
    R.SET_MEM_TABLE: _event("_set_mem_table"),
    R.SET_LOG_BASE: _not_offered(_PF.LOG_SHMFD),
    R.SET_LOG_FD: _refuse("dirty logging: feature VHOST_F_LOG_ALL not offered"),
    R.SET_VRING_NUM: _event("_set_vring_num"),
    R.SET_VRING_ADDR: _event("_set_vring_addr"),
    R.SET_VRING_BASE: _event("_set_vring_base"),
    R.GET_VRING_BASE: _event("_get_vring_base", VringState),
    R.SET_VRING_KICK: _event("_set_vring_kick"),
    R.SET_VRING_CALL: _event("_set_vring_call"),
    R.SET_VRING_ERR: _event("_set_vring_err"),
    R.GET_PROTOCOL_FEATURES: _answer("_get_protocol_features", U64),
    R.SET_PROTOCOL_FEATURES: _answer("_set_protocol_features"),
    R.GET_QUEUE_NUM: _answer("_get_queue_num", U64, _PF.MQ),
    R.SET_VRING_ENABLE: _event("_set_vring_enable", requires=_Requirement.F_PROTOCOL_FEATURES),
    R.SEND_RARP: _not_offered(_PF.RARP),
    R.NET_SET_MTU: _not_offered(_PF.NET_MTU),
    R.SET_BACKEND_REQ_FD: _event("_set_backend_req_fd", requires=_PF.BACKEND_REQ),
    R.IOTLB_MSG: _refuse("feature VIRTIO_F_IOMMU_PLATFORM not offered"),
    R.SET_VRING_ENDIAN: _not_offered(_PF.CROSS_ENDIAN),
    R.GET_CONFIG: _event("_get_config", ConfigSpace, _PF.CONFIG),
    R.SET_CONFIG: _event("_set_config", requires=_PF.CONFIG),
    R.CREATE_CRYPTO_SESSION: _not_offered(_PF.CRYPTO_SESSION),
    R.CLOSE_CRYPTO_SESSION: _not_offered(_PF.CRYPTO_SESSION),
    R.POSTCOPY_ADVISE: _not_offered(_PF.PAGEFAULT),
    R.POSTCOPY_LISTEN: _not_offered(_PF.PAGEFAULT),
    R.POSTCOPY_END: _not_offered(_PF.PAGEFAULT),
    R.GET_INFLIGHT_FD: _not_offered(_PF.INFLIGHT_SHMFD),
    R.SET_INFLIGHT_FD: _not_offered(_PF.INFLIGHT_SHMFD),
    R.GPU_SET_SOCKET: _refuse("only vhost-user-gpu back-ends take it"),
    R.RESET_DEVICE: _event("_reset_device", requires=_PF.RESET_DEVICE),
    R.VRING_KICK: _not_offered(_PF.INBAND_NOTIFICATIONS),
    R.GET_MAX_MEM_SLOTS: _answer("_get_max_mem_slots", U64, _PF.CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: _event("_add_mem_reg", requires=_PF.CONFIGURE_MEM_SLOTS),
    R.REM_MEM_REG: _event("_rem_mem_reg", requires=_PF.CONFIGURE_MEM_SLOTS),
    R.SET_STATUS: _event("_set_status", requires=_PF.STATUS),  # stored here, and told
    R.GET_STATUS: _answer("_get_status", U64, _PF.STATUS),
    R.GET_SHARED_OBJECT: _not_offered(_PF.SHARED_OBJECT),
    R.SET_DEVICE_STATE_FD: _not_offered(_PF.DEVICE_STATE),
    R.CHECK_DEVICE_STATE: _not_offered(_PF.DEVICE_STATE),
    R.GET_SHMEM_CONFIG: _not_offered(_PF.SHMEM),
}
del R

_missing = [r.name for r in Request if r not in RULES]
if _missing:  # pragma: no cover - a table edit gone wrong
    raise RuntimeError(f"RULES lacks {_missing}")


def _bits(value: int) -> str:
    return ", ".join(str(b) for b in range(value.bit_length()) if value >> b & 1)


def _describe_protocol_features(value: int) -> str:
    names = [f.name for f in ProtocolFeature if value & f]
    known = 0
    for f in ProtocolFeature:
        known |= f
    if value & ~known:
        names.append(f"bits {_bits(value & ~known)}")
    return f"{value:#x} ({'|'.join(names) or 'none'})"


# -- the connection ---------------------------------------------------------------------


class BackendConnection:
    """One front-end connection, seen from the back-end. See the module doc."""

    def __init__(
        self,
        *,
        device_features: int,
        protocol_features: int,
        num_queues: int,
        config_size: int,
        max_mem_slots: int = MAX_MEM_SLOTS,
    ) -> None:
        unsupported = protocol_features & ~SUPPORTED_PROTOCOL_FEATURES
        if unsupported:
            raise LocalProtocolError(
                f"protocol features {_describe_protocol_features(unsupported)} cannot be "
                "offered: this layer does not implement them"
            )
        for bit, name in _UNSERVABLE_DEVICE_FEATURES.items():
            if device_features & bit:
                raise LocalProtocolError(f"device feature {name} cannot be offered: not implemented here")
        if not 1 <= num_queues <= VRING_FD_INDEX_MASK + 1:
            raise LocalProtocolError(f"num_queues {num_queues}: must be 1..{VRING_FD_INDEX_MASK + 1}")
        if not 0 <= config_size <= MAX_CONFIG_SIZE:
            raise LocalProtocolError(f"config_size {config_size}: must be 0..{MAX_CONFIG_SIZE}")
        if max_mem_slots < 1:
            raise LocalProtocolError(f"max_mem_slots {max_mem_slots}: must be at least 1")

        #: What GET_FEATURES offers: the device's bits plus bit 30.
        self.device_features = device_features | VHOST_USER_F_PROTOCOL_FEATURES
        #: What GET_PROTOCOL_FEATURES offers.
        self.protocol_features = ProtocolFeature(protocol_features)
        self.num_queues = num_queues
        self.config_size = config_size
        self.max_mem_slots = max_mem_slots

        # State the connection answers from (and exposes).
        self.acked_features = 0
        self.features_set = False  # a SET_FEATURES arrived
        self.acked_protocol_features = ProtocolFeature(0)
        self.protocol_features_set = False  # a SET_PROTOCOL_FEATURES arrived
        self.owner = False
        self.status = 0

        self._decoder = MessageDecoder.for_requests()
        self._outgoing = bytearray()
        self._pending: Event | None = None
        self._pending_message: Message | None = None
        self._error: VhostUserError | None = None
        self._closed = False

    # -- public API --

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK negotiated: NEED_REPLY may be set on back-end requests too."""
        return bool(self.acked_protocol_features & ProtocolFeature.REPLY_ACK)

    @property
    def has_partial_message(self) -> bool:
        """Bytes of an unfinished message are buffered (EOF now cuts it short)."""
        return self._decoder.has_partial_message

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """One chunk from the socket and the fds that came with it (now ours)."""
        if self._closed or self._error is not None:
            close_fds(fds)
            self._raise_unusable()
        try:
            self._decoder.feed(data, fds)
        except ProtocolError as exc:
            self._poison(exc)

    def next_event(self) -> Event | _NeedData:
        """Answer what the connection can answer; return the next device-level
        event, or NEED_DATA."""
        self._raise_unusable()
        if self._pending is not None:
            self._poison(
                LocalProtocolError(
                    f"next_event() before complete() of the pending {type(self._pending).__name__}"
                )
            )
        while True:
            try:
                message = self._decoder.next_message()
            except ProtocolError as exc:
                self._poison(exc)
            if message is None:
                return NEED_DATA
            try:
                outcome = self._dispatch(message)
            except ProtocolError as exc:
                close_fds(message.fds)
                self._poison(exc)
            if isinstance(outcome, Event):
                self._pending, self._pending_message = outcome, message
                return outcome
            self._reply(message, outcome)

    def complete(self, event: Event, payload: Any = None, ok: bool = True) -> None:
        """Answer the pending event. GET_VRING_BASE takes the last avail index
        (int); GET_CONFIG takes ``size`` bytes; all others take no payload.
        ``ok=False`` refuses the request: a failure ack (u64 1) if the
        front-end asked for an ack, an empty GET_CONFIG reply (spec: "zero
        length of payload to indicate an error"). GET_VRING_BASE's reply
        cannot say "failed": refusing it sends nothing and ends the
        connection (later calls raise LocalProtocolError; close the socket)."""
        self._raise_unusable()
        if self._pending is None:
            self._poison(LocalProtocolError(f"complete({type(event).__name__}) with no event pending"))
        if event is not self._pending:
            self._poison(
                LocalProtocolError(
                    f"complete({type(event).__name__}) but the pending event is "
                    f"{type(self._pending).__name__}"
                )
            )
        message = self._pending_message
        assert message is not None
        if isinstance(event, VringBaseGet) and not ok:
            # Its reply is a vring state: there is no way to say "failed".
            self._pending = self._pending_message = None
            self._error = LocalProtocolError(
                "GET_VRING_BASE was refused and its reply cannot carry a failure: close the connection"
            )
            self._decoder.close()
            return
        reply = self._reply_payload(event, payload, ok)
        self._pending = self._pending_message = None
        self._reply(message, reply, ok)

    def data_to_send(self) -> bytes:
        """The replies queued so far (and forget them)."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def close(self) -> None:
        """Close every fd the connection still owns. Idempotent."""
        self._closed = True
        self._decoder.close()

    # -- errors --

    def _poison(self, exc: VhostUserError):
        if self._error is None:
            self._error = exc
        self._decoder.close()  # nothing will consume the buffered fds now
        raise exc

    def _raise_unusable(self) -> None:
        if self._error is not None:
            kind = type(self._error)
            raise kind(f"connection unusable after an earlier error: {self._error}")
        if self._closed:
            raise LocalProtocolError("connection closed")

    # -- replies --

    def _reply(self, message: Message, payload: Payload | None, ok: bool = True) -> None:
        """Queue the request's own reply, or the REPLY_ACK ack if asked for.

        The ack is sent whenever NEED_REPLY is set, as libvhost-user does: a
        front-end that sets it (QEMU does only with REPLY_ACK negotiated) waits
        for it.
        """
        rule = RULES[message.request]
        if rule.reply is not None:
            assert payload is not None
            self._outgoing += encode(message.request, payload, reply=True)
        elif message.need_reply:
            self._outgoing += encode(message.request, U64(0 if ok else 1), reply=True)

    def _reply_payload(self, event: Event, payload: Any, ok: bool) -> Payload | None:
        if isinstance(event, VringBaseGet):
            limit = 0xFFFFFFFF if self._packed else 0xFFFF
            if not isinstance(payload, int) or not 0 <= payload <= limit:
                self._poison(
                    LocalProtocolError(f"GET_VRING_BASE: complete with an int 0..{limit:#x}, got {payload!r}")
                )
            return VringState(event.index, payload)
        if isinstance(event, ConfigGet):
            if not ok:
                return Empty()
            if not isinstance(payload, (bytes, bytearray, memoryview)) or len(payload) != event.size:
                self._poison(
                    LocalProtocolError(f"GET_CONFIG: complete with exactly {event.size} bytes, got {payload!r}")
                )
            return ConfigSpace(event.offset, event.size, event.flags, bytes(payload))
        if payload is not None:
            self._poison(LocalProtocolError(f"{event.request.name}: complete() takes no payload, got {payload!r}"))
        return None

    # -- dispatch through RULES --

    def _dispatch(self, message: Message) -> Event | Payload | None:
        name = message.request.name
        rule = RULES[message.request]
        if rule.handling is Handling.UNSUPPORTED:
            raise ProtocolError(f"{name} is not supported by this back-end ({rule.refusal})")
        self._check_requirement(name, rule.requires)
        return getattr(self, rule.handler)(message)

    def _check_requirement(self, name: str, requires: ProtocolFeature | _Requirement | None) -> None:
        if requires is None:
            return
        if requires is _Requirement.F_PROTOCOL_FEATURES:
            if self.features_set:
                negotiated = bool(self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES)
            else:
                negotiated = self.protocol_features_set
            if not negotiated:
                raise ProtocolError(f"{name} requires {requires.value}, which was not negotiated")
            return
        if not self.protocol_features & requires:
            raise ProtocolError(
                f"{name} is not supported by this back-end (protocol feature {requires.name} not offered)"
            )
        if not self.protocol_features_set:
            raise ProtocolError(
                f"{name} requires protocol feature {requires.name}, but protocol features "
                "are not negotiated yet (no SET_PROTOCOL_FEATURES)"
            )
        if not self.acked_protocol_features & requires:
            raise ProtocolError(
                f"{name} requires protocol feature {requires.name}, which the front-end did not "
                f"negotiate (negotiated {_describe_protocol_features(self.acked_protocol_features)})"
            )

    @property
    def _packed(self) -> bool:
        return bool(self.acked_features & VIRTIO_F_RING_PACKED)

    def _queue(self, message: Message, index: int) -> int:
        if index >= self.num_queues:
            raise ProtocolError(
                f"{message.request.name}: queue {index} out of range (device has {self.num_queues} queues)"
            )
        return index

    def _meta(self, message: Message) -> dict[str, Any]:
        return {"request": message.request, "need_reply": message.need_reply}

    def _check_region(self, name: str, label: str, r: MemoryRegion) -> None:
        if r.size == 0:
            raise ProtocolError(f"{name}: {label} has size 0")
        for field in ("gpa", "uaddr", "mmap_offset"):
            start = getattr(r, field)
            if start + r.size > 1 << 64:
                raise ProtocolError(
                    f"{name}: {label} {field} {start:#x} + size {r.size:#x} passes the end of the 64-bit space"
                )

    # -- handlers (named in RULES); each validates, then answers or returns an Event --

    def _get_features(self, message: Message) -> U64:
        return U64(self.device_features)

    def _set_features(self, message: Message) -> FeaturesSet:
        features = message.payload.value
        extra = features & ~self.device_features
        if extra:
            raise ProtocolError(
                f"SET_FEATURES: bits {extra:#x} (bit {_bits(extra)}) were not offered "
                f"(offered {self.device_features:#x})"
            )
        self.acked_features = features
        self.features_set = True
        return FeaturesSet(features, **self._meta(message))

    def _get_protocol_features(self, message: Message) -> U64:
        return U64(int(self.protocol_features))

    def _set_protocol_features(self, message: Message) -> None:
        value = message.payload.value
        extra = value & ~int(self.protocol_features)
        if extra:
            raise ProtocolError(
                f"SET_PROTOCOL_FEATURES: {_describe_protocol_features(extra)} were not offered "
                f"(offered {_describe_protocol_features(int(self.protocol_features))})"
            )
        self.acked_protocol_features = ProtocolFeature(value)
        self.protocol_features_set = True
        return None

    def _set_owner(self, message: Message) -> None:
        self.owner = True
        return None

    def _reset_owner(self, message: Message) -> DeviceReset:
        return DeviceReset(**self._meta(message))

    def _reset_device(self, message: Message) -> DeviceReset:
        # spec RESET_DEVICE: device state back to the initial state; the
        # connection (ownership, protocol features) stays.
        self.acked_features = 0
        self.features_set = False
        self.status = 0
        return DeviceReset(**self._meta(message))

    def _get_queue_num(self, message: Message) -> U64:
        return U64(self.num_queues)

    def _get_max_mem_slots(self, message: Message) -> U64:
        return U64(self.max_mem_slots)

    def _set_status(self, message: Message) -> StatusSet:
        status = message.payload.value
        if status > 0xFF:
            raise ProtocolError(f"SET_STATUS: status {status:#x} does not fit the 8-bit device status")
        self.status = status
        return StatusSet(status, **self._meta(message))

    def _get_status(self, message: Message) -> U64:
        return U64(self.status)

    def _set_mem_table(self, message: Message) -> MemoryTableSet:
        regions = message.payload.regions
        for i, r in enumerate(regions):
            self._check_region("SET_MEM_TABLE", f"region {i}", r)
        ordered = sorted(range(len(regions)), key=lambda i: regions[i].gpa)
        for a, b in zip(ordered, ordered[1:]):
            if regions[a].gpa + regions[a].size > regions[b].gpa:
                raise ProtocolError(
                    f"SET_MEM_TABLE: region {a} (gpa {regions[a].gpa:#x} size {regions[a].size:#x}) "
                    f"overlaps region {b} (gpa {regions[b].gpa:#x})"
                )
        return MemoryTableSet(tuple(zip(regions, message.fds)), **self._meta(message))

    def _add_mem_reg(self, message: Message) -> MemoryRegionAdded:
        region = message.payload.region
        self._check_region("ADD_MEM_REG", "region", region)
        return MemoryRegionAdded(region, message.fds[0], **self._meta(message))

    def _rem_mem_reg(self, message: Message) -> MemoryRegionRemoved:
        region = message.payload.region
        self._check_region("REM_MEM_REG", "region", region)
        close_fds(message.fds)  # spec: MAY come; MUST be closed unused
        return MemoryRegionRemoved(region, **self._meta(message))

    def _set_vring_num(self, message: Message) -> VringNumSet:
        state = message.payload
        index = self._queue(message, state.index)
        num = state.num
        if not 1 <= num <= MAX_VRING_SIZE:
            raise ProtocolError(f"SET_VRING_NUM: queue {index} size {num} (must be 1..{MAX_VRING_SIZE})")
        if num & (num - 1) and not self._packed:
            raise ProtocolError(f"SET_VRING_NUM: queue {index} size {num} is not a power of 2")
        return VringNumSet(index, num, **self._meta(message))

    def _set_vring_addr(self, message: Message) -> VringAddrSet:
        a = message.payload
        index = self._queue(message, a.index)
        if a.flags & VRING_ADDR_F_LOG:
            raise ProtocolError(
                f"SET_VRING_ADDR: queue {index} asks for dirty logging (flags {a.flags:#x}), "
                "which this back-end does not support"
            )
        if a.flags:
            raise ProtocolError(f"SET_VRING_ADDR: queue {index} has unknown flags {a.flags:#x}")
        return VringAddrSet(index, a.flags, a.desc, a.used, a.avail, a.log, **self._meta(message))

    def _set_vring_base(self, message: Message) -> VringBaseSet:
        state = message.payload
        index = self._queue(message, state.index)
        # spec "A vring descriptor index for split virtqueues": bits 16-31 reserved.
        if state.num > 0xFFFF and not self._packed:
            raise ProtocolError(
                f"SET_VRING_BASE: queue {index} base {state.num:#x} has reserved bits 16-31 set"
            )
        return VringBaseSet(index, state.num, **self._meta(message))

    def _get_vring_base(self, message: Message) -> VringBaseGet:
        return VringBaseGet(self._queue(message, message.payload.index), **self._meta(message))

    def _vring_file(self, message: Message, kind: type[_VringFileSet]) -> _VringFileSet:
        vring_fd = message.payload
        index = self._queue(message, vring_fd.index)
        fd = None if vring_fd.invalid else message.fds[0]
        return kind(index, fd, **self._meta(message))

    def _set_vring_kick(self, message: Message) -> VringKickSet:
        return self._vring_file(message, VringKickSet)

    def _set_vring_call(self, message: Message) -> VringCallSet:
        return self._vring_file(message, VringCallSet)

    def _set_vring_err(self, message: Message) -> VringErrSet:
        return self._vring_file(message, VringErrSet)

    def _set_vring_enable(self, message: Message) -> VringEnableSet:
        state = message.payload
        index = self._queue(message, state.index)
        if state.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: queue {index} num {state.num} (must be 0 or 1)")
        return VringEnableSet(index, bool(state.num), **self._meta(message))

    def _check_config_range(self, name: str, offset: int, size: int) -> None:
        if offset + size > self.config_size:
            raise ProtocolError(
                f"{name}: offset {offset} + size {size} passes the end of the "
                f"{self.config_size}-byte config space"
            )

    def _get_config(self, message: Message) -> ConfigGet:
        cfg = message.payload
        self._check_config_range("GET_CONFIG", cfg.offset, cfg.size)
        return ConfigGet(cfg.offset, cfg.size, cfg.flags, **self._meta(message))

    def _set_config(self, message: Message) -> ConfigSet:
        cfg = message.payload
        self._check_config_range("SET_CONFIG", cfg.offset, cfg.size)
        if cfg.flags not in (CONFIG_FLAG_FRONTEND, CONFIG_FLAG_MIGRATION):
            raise ProtocolError(f"SET_CONFIG: flags {cfg.flags:#x} (must be 0 front-end or 1 migration)")
        return ConfigSet(cfg.offset, cfg.data, cfg.flags, **self._meta(message))

    def _set_backend_req_fd(self, message: Message) -> BackendChannelSet:
        return BackendChannelSet(message.fds[0], **self._meta(message))


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
