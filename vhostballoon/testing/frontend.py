"""A vhost-user front-end that sends what QEMU 10.2.2 sends to a balloon back-end.

QEMU's ``vhost-user-test-device-pci`` (virtio-id 5) drives a balloon back-end
through ``hw/virtio/vhost-user.c``; ``/work/shared/e2e/QEMU.md`` records the
sequence. This class replays it over a real unix socket with real fds:

``initialize()`` (QEMU start, before the guest runs)::

    GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (offered & known),
    GET_QUEUE_NUM (with MQ; must be >= num_vqs), GET_MAX_MEM_SLOTS (with
    CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD (with BACKEND_REQ; NEED_REPLY with
    REPLY_ACK), SET_OWNER, GET_FEATURES, then SET_VRING_CALL + SET_VRING_ERR
    for every queue.

``start_guest()`` (the guest driver sets DRIVER_OK)::

    SET_FEATURES (guest features | PROTOCOL_FEATURES bit), with STATUS:
    GET_STATUS + SET_STATUS(FEATURES_OK); ADD_MEM_REG (with
    CONFIGURE_MEM_SLOTS) or SET_MEM_TABLE, NEED_REPLY with REPLY_ACK; per
    queue the guest set up: SET_VRING_NUM, SET_VRING_BASE 0, SET_VRING_ADDR,
    SET_VRING_KICK, SET_VRING_CALL; SET_VRING_ENABLE 1 for every queue
    (NEED_REPLY with REPLY_ACK, else a GET_FEATURES as a barrier:
    ``vhost_user_write_sync``); SET_VRING_CALL again for every queue with
    fresh eventfds (the irqfds).

Config: every guest read is a GET_CONFIG of the whole space; every guest
write is applied to the front-end's copy and sent as ONE SET_CONFIG of the
whole space at offset 0, flags 0 (``vub_set_config``), NEED_REPLY with
REPLY_ACK. ``stop()``: SET_VRING_ENABLE 0 for all, GET_VRING_BASE for the
started queues. Every reply is checked as QEMU checks it (same request,
flags exactly REPLY|version 1, exact size, ack value 0).

``serve_backend_channel()`` answers the back-end's requests:
CONFIG_CHANGE_MSG notifies the driver (``on_config_change``); anything else
is an error; with NEED_REPLY the reply is u64 0/1 (``backend_read``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .channel import (
    BackendRejected,
    Channel,
    FrontendError,
    ProtocolViolation,
    TranscriptEntry,
    _eventfd,
    _MessageChannel,
)
from .fds import close_fds
from .fdsocket import connect_unix
from .guest_ram import GuestRAM
from .virtqueue import DriverVirtqueue
from .wire import (
    CONFIG_FLAG_FRONTEND,
    CONFIG_HEADER_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    ConfigSpace,
    Empty,
    MemoryRegion,
    MemoryTable,
    Message,
    MessageReader,
    Payload,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringFd,
    VringState,
    encode,
    header_of,
)

VIRTIO_CONFIG_S_FEATURES_OK = 8  # virtio 1.2, 2.1 "Device Status Field"
PROTOCOL_FEATURES_BIT = VHOST_USER_F_PROTOCOL_FEATURES  # a mask: 1 << 30

# QEMU keeps every protocol feature it knows (VHOST_USER_PROTOCOL_FEATURE_MASK,
# vhost_user_backend_init): bits 0..19 in 10.2 (MQ .. DEVICE_STATE).
QEMU_PROTOCOL_FEATURES = (1 << 20) - 1


class Frontend:
    """QEMU 10.2.2's vhost-user front-end for a balloon back-end.

    ``num_vqs``, ``vq_size`` and ``config_size`` are the properties of
    ``-device vhost-user-test-device-pci``. ``protocol_features`` is what this
    front-end knows; it negotiates ``offered & protocol_features``.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        num_vqs: int = 5,
        vq_size: int = 128,
        config_size: int = 16,
        protocol_features: int = QEMU_PROTOCOL_FEATURES,
        reply_timeout: float = 10.0,
    ) -> None:
        self._front = _MessageChannel(sock, MessageReader.for_replies(), Channel.FRONT)
        self._backend: _MessageChannel | None = None
        self.num_vqs = num_vqs
        self.vq_size = vq_size
        self.config_size = config_size
        self.known_protocol_features = protocol_features
        self.reply_timeout = reply_timeout
        self.transcript: list[TranscriptEntry] = []
        self.on_config_change: Callable[[], None] | None = None
        self.backend_features = 0
        self.protocol_features = 0  # negotiated
        self.max_queues: int | None = None
        self.max_mem_slots: int | None = None
        self.acked_features = 0
        self.config_cache = bytearray(config_size)  # QEMU's vdev->config
        self.started_queues: list[int] = []
        self.config_change_msgs = 0
        self.backend_channel_error: Exception | None = None
        # Config reads and writes go on when the back-end is gone (see
        # get_config): for a guest that outlives its back-end (reconnect).
        self.survive_backend_loss = False
        self._lock = trio.Lock()  # one request/reply exchange at a time (QEMU holds the BQL)
        self._kick_fds: dict[int, int] = {}
        self._call_fds: dict[int, int] = {}
        self._owned_fds: list[int] = []  # every eventfd made here; closed by aclose()
        self._closed = False
        self._dead = False  # send_raw(last=True): a killed QEMU sends nothing more

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], **options: Any) -> "Frontend":
        """Connect to a listening back-end (``-chardev socket,path=...``)."""
        return cls(await connect_unix(path), **options)

    # -- what the guest sees -------------------------------------------------

    @property
    def device_features(self) -> int:
        """The virtio features the guest is offered (the back-end's, minus the
        vhost-user-only PROTOCOL_FEATURES bit)."""
        return self.backend_features & ~PROTOCOL_FEATURES_BIT

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    # -- QEMU start ----------------------------------------------------------

    async def initialize(self) -> None:
        """The messages QEMU sends at start, before the guest runs."""
        self.backend_features = await self._get_u64(Request.GET_FEATURES)
        if self.backend_features & PROTOCOL_FEATURES_BIT:
            offered = await self._get_u64(Request.GET_PROTOCOL_FEATURES)
            negotiated = offered & self.known_protocol_features
            if self.config_size and not negotiated & ProtocolFeature.CONFIG:
                raise FrontendError(
                    "vhost-user device expecting VHOST_USER_PROTOCOL_F_CONFIG but the vhost-user back-end "
                    f"does not support it (offered protocol features {offered:#x})"
                )
            self.protocol_features = negotiated
            await self.request(Request.SET_PROTOCOL_FEATURES, U64(negotiated))
            if self.has_protocol_feature(ProtocolFeature.MQ):
                self.max_queues = await self._get_u64(Request.GET_QUEUE_NUM)
                if self.max_queues < self.num_vqs:
                    raise FrontendError(
                        f"The maximum number of queues supported by the back-end is {self.max_queues}, "
                        f"the device has num_vqs={self.num_vqs}"
                    )
            if self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                self.max_mem_slots = await self._get_u64(Request.GET_MAX_MEM_SLOTS)
            if self.has_protocol_feature(ProtocolFeature.BACKEND_REQ):
                await self._setup_backend_channel()
        elif self.config_size:
            raise FrontendError("the back-end does not offer PROTOCOL_FEATURES, so it cannot serve config space")
        await self.request(Request.SET_OWNER)
        self.backend_features = await self._get_u64(Request.GET_FEATURES)
        for index in range(self.num_vqs):  # vhost_virtqueue_init: masked notifier, error notifier
            await self._set_vring_fd(Request.SET_VRING_CALL, index, self._new_eventfd())
            await self._set_vring_fd(Request.SET_VRING_ERR, index, self._new_eventfd())

    async def _setup_backend_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._backend = _MessageChannel(
            trio.socket.from_stdlib_socket(ours), MessageReader.for_backend_requests(), Channel.BACKEND
        )
        try:
            await self.request(
                Request.SET_BACKEND_REQ_FD,
                fds=[theirs.fileno()],
                need_reply=self.has_protocol_feature(ProtocolFeature.REPLY_ACK),
            )
        finally:
            theirs.close()  # QEMU closes sv[1] once sent

    # -- the guest driver starts the device ----------------------------------

    async def start_guest(self, features: int, ram: GuestRAM, queues: Sequence[DriverVirtqueue]) -> None:
        """The messages QEMU sends when the guest sets DRIVER_OK."""
        if len(queues) > self.num_vqs:
            raise FrontendError(f"the guest set up {len(queues)} queues, the device has num_vqs={self.num_vqs}")
        self.acked_features = features
        backend_only = self.backend_features & PROTOCOL_FEATURES_BIT
        await self.request(Request.SET_FEATURES, U64(features | backend_only))
        if self.has_protocol_feature(ProtocolFeature.STATUS):  # vhost_user_add_status
            status = await self._get_u64(Request.GET_STATUS)
            if not status & VIRTIO_CONFIG_S_FEATURES_OK:
                await self.request(Request.SET_STATUS, U64(status | VIRTIO_CONFIG_S_FEATURES_OK))
        await self.set_memory(ram)
        for vq in queues:
            index, num = vq.index, vq.num
            await self.request(Request.SET_VRING_NUM, VringState(index=index, num=num))
            await self.request(Request.SET_VRING_BASE, VringState(index=index, num=0))
            await self.request(
                Request.SET_VRING_ADDR,
                VringAddr(
                    index=index,
                    flags=0,
                    desc=ram.gpa_to_uaddr(vq.desc_gpa),
                    used=ram.gpa_to_uaddr(vq.used_gpa),
                    avail=ram.gpa_to_uaddr(vq.avail_gpa),
                    log=0,
                ),
            )
            kick = self._new_eventfd()
            self._kick_fds[index] = kick
            await self._set_vring_fd(Request.SET_VRING_KICK, index, kick)
            await self._set_vring_fd(Request.SET_VRING_CALL, index, self._new_eventfd())
            self.started_queues.append(index)
        await self.set_vring_enable(True)
        for index in range(self.num_vqs):  # the irqfds replace the earlier call fds
            call = self._new_eventfd()
            self._call_fds[index] = call
            await self._set_vring_fd(Request.SET_VRING_CALL, index, call)

    # -- the back-end restarted: reconnect under the running guest ------------

    async def reconnect(self, path: str | os.PathLike[str], ram: GuestRAM, queues: Sequence[DriverVirtqueue]) -> None:
        """A new back-end listens on ``path`` (the old one died): connect
        and start it under the running guest, as QEMU's vhost-user
        reconnect does (``-chardev ...,reconnect-ms=N``; QEMU 10.2's
        generic device aborts there, so this is how it is meant to go).

        ``initialize()`` again, then the start-up sequence with what the
        guest has now: its acked features, its memory, its rings where
        they are.  Each ring's base is its used index (QEMU's
        ``virtio_queue_restore_last_avail_idx`` after a lost back-end): a
        buffer the dead back-end popped but never returned is served
        again.  The kick and call eventfds stay the same (they are KVM's
        ioeventfd and irqfd), so a driver waiting for a buffer just goes on.
        Serve the new backend channel afterwards (``serve_backend_channel``)."""
        sock = await connect_unix(path)
        async with self._lock:
            self._front.close()
            if self._backend is not None:
                self._backend.close()
                self._backend = None
            self._front = _MessageChannel(sock, MessageReader.for_replies(), Channel.FRONT)
        self.protocol_features = 0
        self.started_queues = []
        await self.initialize()
        backend_only = self.backend_features & PROTOCOL_FEATURES_BIT
        await self.request(Request.SET_FEATURES, U64(self.acked_features | backend_only))
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            status = await self._get_u64(Request.GET_STATUS)
            if not status & VIRTIO_CONFIG_S_FEATURES_OK:
                await self.request(Request.SET_STATUS, U64(status | VIRTIO_CONFIG_S_FEATURES_OK))
        await self.set_memory(ram)
        for vq in queues:
            index = vq.index
            await self.request(Request.SET_VRING_NUM, VringState(index=index, num=vq.num))
            await self.request(Request.SET_VRING_BASE, VringState(index=index, num=vq.used_idx()))
            await self.request(
                Request.SET_VRING_ADDR,
                VringAddr(index=index, flags=0, desc=ram.gpa_to_uaddr(vq.desc_gpa),
                          used=ram.gpa_to_uaddr(vq.used_gpa), avail=ram.gpa_to_uaddr(vq.avail_gpa), log=0),
            )
            await self._set_vring_fd(Request.SET_VRING_KICK, index, self._kick_fds[index])
            await self._set_vring_fd(Request.SET_VRING_CALL, index, self._call_fds[index])
            self.started_queues.append(index)
        await self.set_vring_enable(True)
        for index, call in sorted(self._call_fds.items()):
            await self._set_vring_fd(Request.SET_VRING_CALL, index, call)

    async def set_memory(self, ram: GuestRAM) -> None:
        """One region: gpa 0, all of RAM, mmap offset 0, the RAM's fake uaddr."""
        region = MemoryRegion(gpa=ram.gpa, size=ram.size, uaddr=ram.uaddr, mmap_offset=0)
        need_reply = self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
        if self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            request, payload = Request.ADD_MEM_REG, SingleMemoryRegion(region=region)
        else:
            request, payload = Request.SET_MEM_TABLE, MemoryTable(regions=[region])
        await self.request(request, payload, fds=[ram.fd], need_reply=need_reply)

    async def set_vring_enable(self, enable: bool) -> None:
        """SET_VRING_ENABLE for every queue, waiting for each (QEMU passes
        wait_for_reply=true: NEED_REPLY with REPLY_ACK, else GET_FEATURES)."""
        if not self.backend_features & PROTOCOL_FEATURES_BIT:
            return  # QEMU: -EINVAL, nothing sent
        reply_ack = self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
        for index in range(self.num_vqs):
            await self.request(Request.SET_VRING_ENABLE, VringState(index=index, num=int(enable)), need_reply=reply_ack)
            if not reply_ack:
                await self._get_u64(Request.GET_FEATURES)

    # -- config space ----------------------------------------------------------

    async def get_config(self) -> bytes:
        """GET_CONFIG of the whole space (a guest config read).  With
        ``survive_backend_loss`` a dead back-end leaves the last config, as
        QEMU does (``vub_get_config`` reports the error, vdev->config stays)."""
        if self.survive_backend_loss:
            try:
                return await self._get_config()
            except FrontendError:
                return bytes(self.config_cache)
        return await self._get_config()

    async def _get_config(self) -> bytes:
        reply = await self.request(
            Request.GET_CONFIG,
            ConfigSpace(offset=0, size=self.config_size, flags=0, data=bytes(self.config_size)),
        )
        assert reply is not None and isinstance(reply.payload, ConfigSpace)
        data = reply.payload.data
        self.config_cache[:] = data
        return data

    async def set_config(self, data: bytes, offset: int = 0) -> None:
        """One SET_CONFIG exactly as given (flags 0 = FRONTEND); with
        ``survive_backend_loss`` a dead back-end only loses the write."""
        try:
            await self._set_config(data, offset)
        except FrontendError:
            if not self.survive_backend_loss:
                raise

    async def _set_config(self, data: bytes, offset: int) -> None:
        await self.request(
            Request.SET_CONFIG,
            ConfigSpace(offset=offset, size=len(data), flags=CONFIG_FLAG_FRONTEND, data=bytes(data)),
            need_reply=self.has_protocol_feature(ProtocolFeature.REPLY_ACK),
        )

    async def read_config(self) -> bytes:
        return await self.get_config()

    async def write_config(self, offset: int, data: bytes) -> None:
        """A guest write: patch the cached config, send all of it at offset 0."""
        if offset < 0 or offset + len(data) > self.config_size:
            raise FrontendError(f"config write {offset}+{len(data)} outside the {self.config_size}-byte space")
        self.config_cache[offset : offset + len(data)] = data
        await self.set_config(bytes(self.config_cache), 0)

    # -- notifications -----------------------------------------------------------

    def kick(self, queue_index: int) -> None:
        """The guest's queue notify: signal the queue's kick eventfd."""
        os.eventfd_write(self._kick_fds[queue_index], 1)

    async def wait_call(self, queue_index: int) -> None:
        """Wait for the back-end to signal the queue's call eventfd, and consume it."""
        fd = self._call_fds[queue_index]
        while True:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
                return

    def call_fd(self, queue_index: int) -> int:
        return self._call_fds[queue_index]

    def kick_fd(self, queue_index: int) -> int:
        return self._kick_fds[queue_index]

    # -- the backend channel -------------------------------------------------------

    async def serve_backend_channel(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer the back-end's requests until it closes the channel.

        CONFIG_CHANGE_MSG calls ``on_config_change`` and is acked 0; any other
        known request is acked 1 (QEMU: ``payload.u64 = !!ret``). A message
        the codec rejects ends the channel, as QEMU's ``backend_read`` closes
        it on a read error; the error is kept in ``backend_channel_error``.
        """
        channel = self._backend
        task_status.started()
        if channel is None:
            return
        while True:
            try:
                message = await channel.receive_message()
            except (trio.ClosedResourceError, OSError):
                return
            except ProtocolViolation as exc:
                self.backend_channel_error = exc
                channel.close()
                return
            if message is None:
                return
            close_fds(message.fds)
            self._record_message(Channel.BACKEND, message)
            ok = message.request == BackendRequest.CONFIG_CHANGE_MSG
            if ok:
                self.config_change_msgs += 1
                if self.on_config_change is not None:
                    self.on_config_change()
            if message.need_reply:
                ack = U64(0 if ok else 1)
                data = encode(message.request, ack, reply=True)
                self._record_wire(Channel.BACKEND, True, data, ack, 0)
                try:
                    await channel.send(data)
                except (trio.ClosedResourceError, OSError):
                    return

    # -- shutdown ----------------------------------------------------------------------

    async def stop(self) -> dict[int, int]:
        """QEMU's vhost_dev_stop: disable all queues, then GET_VRING_BASE for
        each started queue. Returns {queue index: last avail index}."""
        await self.set_vring_enable(False)
        bases = {}
        for index in self.started_queues:
            reply = await self.request(Request.GET_VRING_BASE, VringState(index=index, num=0))
            assert reply is not None
            bases[index] = _vring_state_num(reply.payload, index)
        self.started_queues = []
        return bases

    async def aclose(self) -> None:
        """Close the sockets and every eventfd this front-end made."""
        if self._closed:
            return
        self._closed = True
        self._front.close()
        if self._backend is not None:
            self._backend.close()
        for fd in self._owned_fds:
            trio.lowlevel.notify_closing(fd)
        close_fds(self._owned_fds)
        self._owned_fds.clear()
        self._kick_fds.clear()
        self._call_fds.clear()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> "Frontend":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- low level: for conformance and bad-input tests ---------------------------------

    async def send_raw(self, data: bytes, fds: Sequence[int] = (), *, last: bool = False) -> None:
        """Write bytes (and fds) to the back-end as they are.  ``last``: the
        front-end dies right after (e.g. half a message, then QEMU is
        killed): nothing more is sent; later requests wait until cancelled."""
        async with self._lock:
            await self._front.send(data, fds)
            self._dead = self._dead or last
        self._record_wire(Channel.FRONT, True, data, None, len(fds))

    async def recv_reply(self) -> Message:
        """Read the next message the back-end sends on the front-end socket."""
        async with self._lock:
            return await self._receive_reply("recv_reply")

    async def request(
        self,
        request: Request | int,
        payload: Payload | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> Message | None:
        """Send one request; return its reply if the protocol or NEED_REPLY
        calls for one (checked as QEMU checks it), else None."""
        request = Request(request)
        payload = Empty() if payload is None else payload
        data = encode(request, payload, need_reply=need_reply)
        expects = request in _REPLYING or need_reply
        async with self._lock:
            if self._dead:
                await trio.sleep_forever()
            # Once sent, the exchange runs to its reply (or the reply
            # timeout) whatever cancels the caller: QEMU, holding its lock,
            # cannot abandon a request either, and an abandoned one would
            # leave its reply to be read as the reply of the next request.
            try:
                with trio.CancelScope(shield=True):
                    try:
                        await self._front.send(data, fds)
                    except OSError as exc:
                        raise FrontendError(f"{request.name}: cannot send to the back-end: {exc}") from exc
                    self._record_wire(Channel.FRONT, True, data, payload, len(fds))
                    if not expects:
                        return None
                    reply = await self._receive_reply(request.name)
                self._check_reply(request, reply, need_reply)
            except FrontendError:
                # The caller was cancelled meanwhile (the guest is being torn
                # down, e.g. a killed QEMU): that is the outcome, not the
                # connection failing under a request nobody waits for.
                await trio.lowlevel.checkpoint_if_cancelled()
                raise
        return reply

    # -- internals -------------------------------------------------------------------

    async def _receive_reply(self, what: str) -> Message:
        with trio.move_on_after(self.reply_timeout) as scope:
            try:
                message = await self._front.receive_message()
            except OSError as exc:  # e.g. ECONNRESET: the back-end died with our request unread
                raise FrontendError(f"{what}: the back-end connection failed: {exc}") from exc
        if scope.cancelled_caught:
            raise FrontendError(f"{what}: no reply from the back-end within {self.reply_timeout} s")
        if message is None:
            raise FrontendError(f"{what}: the back-end closed the connection instead of replying")
        self._record_message(Channel.FRONT, message)
        if message.fds:
            close_fds(message.fds)
            raise ProtocolViolation(f"{what}: the reply carries {len(message.fds)} fds; none were expected")
        return message

    def _check_reply(self, request: Request, reply: Message, need_reply: bool) -> None:
        name = request.name
        # The reader took only flags exactly REPLY | version 1, and a body of
        # the shape the request it names replies with.
        if reply.request != request:
            raise ProtocolViolation(f"{name}: received a reply to request {reply.request} instead")
        if request == Request.GET_CONFIG and isinstance(reply.payload, Empty):
            raise BackendRejected("GET_CONFIG: the back-end replied with an empty payload (its way to fail)")
        if request in _REPLYING:
            expected = CONFIG_HEADER_SIZE + self.config_size if request == Request.GET_CONFIG else 8
        else:
            expected = 8  # the REPLY_ACK u64
        if reply.size != expected:
            raise ProtocolViolation(f"{name}: reply payload is {reply.size} bytes, expected {expected}")
        if need_reply and request not in _REPLYING:
            value = _u64(reply.payload)
            if value != 0:
                raise BackendRejected(f"{name}: the back-end replied failure ({value:#x})")

    async def _get_u64(self, request: Request) -> int:
        reply = await self.request(request)
        assert reply is not None
        return _u64(reply.payload)

    async def _set_vring_fd(self, request: Request, index: int, fd: int) -> None:
        # Recorded from QEMU 10.2.2 (protocol/transcripts): SET_VRING_KICK/CALL/ERR
        # carry NEED_REPLY when REPLY_ACK is negotiated, and QEMU waits for the ack.
        need_reply = self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
        await self.request(request, VringFd(index=index), fds=[fd], need_reply=need_reply)

    def _new_eventfd(self) -> int:
        fd = _eventfd()
        self._owned_fds.append(fd)
        return fd

    def _record_message(self, channel: Channel, message: Message) -> None:
        entry = TranscriptEntry(
            channel, False, int(message.request), message.flags, message.size, message.payload, len(message.fds)
        )
        self.transcript.append(entry)

    def _record_wire(self, channel: Channel, sent: bool, data: bytes, payload: Any, nfds: int) -> None:
        request, flags, size = header_of(data) or (-1, 0, len(data))
        self.transcript.append(TranscriptEntry(channel, sent, request, flags, size, payload, nfds))


# Requests whose reply QEMU always reads (not a REPLY_ACK).
_REPLYING = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
    }
)


def _u64(payload: Any) -> int:
    if not isinstance(payload, U64):
        raise ProtocolViolation(f"reply payload {payload!r} is not a u64")
    return payload.value


def _vring_state_num(payload: VringState, index: int) -> int:
    if payload.index != index:
        raise ProtocolViolation(f"GET_VRING_BASE: reply is for queue {payload.index}, asked for {index}")
    return payload.num
