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

from collections.abc import Sequence
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
    ProtocolFeature,
    CONFIG_FLAG_FRONTEND,
    CONFIG_FLAG_MIGRATION,
)
from .errors import LocalProtocolError, ProtocolError, VhostUserError
from .rules import RULES, Handling, _Requirement
from .backend_channel import BackendAck, BackendChannel, encode_backend_request
from .events import (
    Event,
    FeaturesSet,
    StatusSet,
    MemoryTableSet,
    MemoryRegionAdded,
    MemoryRegionRemoved,
    VringNumSet,
    VringAddrSet,
    VringBaseSet,
    VringBaseGet,
    _VringFileSet,
    VringKickSet,
    VringCallSet,
    VringErrSet,
    VringEnableSet,
    ConfigGet,
    ConfigSet,
    BackendChannelSet,
    DeviceReset,
)

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
