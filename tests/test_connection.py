"""The sans-I/O back-end connection: QEMU's sequence, the state table, REPLY_ACK,
errors that poison, and fd ownership. No sockets: bytes and real fds in,
events and bytes out."""

from __future__ import annotations

import os
import struct

import pytest

from vhostballoon.vhost_user import connection as vu
from vhostballoon.vhost_user.codec import (
    ConfigSpace,
    Empty,
    MemoryRegion,
    MemoryTable,
    MessageDecoder,
    Raw,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringFd,
    VringState,
    encode,
)
from vhostballoon.vhost_user.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_RING_PACKED,
    BackendRequest,
    ProtocolFeature as PF,
    Request,
)
from vhostballoon.testing.fds import is_open, no_fd_leak
from vhostballoon.vhost_user.errors import LocalProtocolError, ProtocolError

VIRTIO_F_VERSION_1 = 1 << 32
BALLOON_FEATURES = VIRTIO_F_VERSION_1 | 0b100110  # STATS_VQ | DEFLATE_ON_OOM | FREE_PAGE_HINT-ish bits
BALLOON_PROTOCOL = (
    PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.RESET_DEVICE | PF.STATUS
)
QEMU_KNOWN_PROTOCOL = (1 << 20) - 1  # VHOST_USER_PROTOCOL_FEATURE_MASK, bits 0..19 in 10.2
NUM_QUEUES = 5
CONFIG_SIZE = 16
FEATURES_OK = 8


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def new_conn(protocol_features=BALLOON_PROTOCOL, **kw) -> vu.BackendConnection:
    args = dict(
        device_features=BALLOON_FEATURES,
        protocol_features=protocol_features,
        num_queues=NUM_QUEUES,
        config_size=CONFIG_SIZE,
    )
    args.update(kw)
    return vu.BackendConnection(**args)


class Device:
    """Plays the caller: completes every event, keeps the fds it is handed."""

    def __init__(self) -> None:
        self.events: list[vu.Event] = []
        self.fds: list[int] = []
        self.config = bytes(range(CONFIG_SIZE))
        self.last_avail = {}
        self.refuse: set[type] = set()

    def answer(self, event: vu.Event):
        if isinstance(event, vu.VringBaseGet):
            return self.last_avail.get(event.index, 0)
        if isinstance(event, vu.ConfigGet):
            return self.config[event.offset : event.offset + event.size]
        return None

    def drain(self, conn: vu.BackendConnection) -> list[vu.Event]:
        got = []
        while (event := conn.next_event()) is not vu.NEED_DATA:
            got.append(event)
            self.fds.extend(event.fds)
            if type(event) in self.refuse:
                conn.complete(event, ok=False)
            else:
                conn.complete(event, self.answer(event))
        self.events.extend(got)
        return got

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def send(conn, device, request, payload=None, *, fds=(), need_reply=False):
    """One request; returns (events, bytes the back-end sent)."""
    conn.receive_data(encode(request, payload, need_reply=need_reply), list(fds))
    events = device.drain(conn)
    return events, conn.data_to_send()


# Reply bytes built by hand (not with encode) to check the layout independently.
def u64_reply(request: int, value: int) -> bytes:
    return struct.pack("=IIIQ", request, 0x5, 8, value)


def state_reply(request: int, index: int, num: int) -> bytes:
    return struct.pack("=IIIII", request, 0x5, 8, index, num)


def config_reply(offset: int, data: bytes, flags: int = 0) -> bytes:
    return struct.pack("=IIIIII", Request.GET_CONFIG, 0x5, 12 + len(data), offset, len(data), flags) + data


def qemu_check(reply: bytes, request: Request, size: int) -> int | VringState | ConfigSpace:
    """What hw/virtio/vhost-user.c checks of a reply: flags exactly
    REPLY|VERSION (vhost_user_read_header), the request echoed, the size."""
    decoder = MessageDecoder.for_replies()
    decoder.feed(reply)
    message = decoder.next_message()
    assert message is not None and decoder.next_message() is None
    assert message.flags == 0x5
    assert message.request == request
    assert message.size == size
    payload = message.payload
    return payload.value if isinstance(payload, U64) else payload


# -- QEMU 10.2.2's sequence ---------------------------------------------------------


def run_qemu_sequence(conn: vu.BackendConnection, device: Device, *, mem_slots: bool) -> dict:
    """The messages QEMU 10.2.2 sends to a balloon back-end (e2e/QEMU.md, and
    hw/virtio/vhost-user.c for flags and sizes), each reply checked as QEMU
    checks it. Returns the fds the front-end made, to close."""
    made: list[int] = []

    def fd() -> int:
        made.append(eventfd())
        return made[-1]

    # vhost_user_backend_init
    ev, out = send(conn, device, Request.GET_FEATURES)
    assert ev == [] and out == u64_reply(1, BALLOON_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES)
    ev, out = send(conn, device, Request.GET_PROTOCOL_FEATURES)
    offered = qemu_check(out, Request.GET_PROTOCOL_FEATURES, 8)
    negotiated = offered & QEMU_KNOWN_PROTOCOL
    ev, out = send(conn, device, Request.SET_PROTOCOL_FEATURES, U64(negotiated))
    assert ev == [] and out == b""
    assert conn.acked_protocol_features == negotiated
    ev, out = send(conn, device, Request.GET_QUEUE_NUM)
    assert out == u64_reply(17, NUM_QUEUES)
    if mem_slots:
        ev, out = send(conn, device, Request.GET_MAX_MEM_SLOTS)
        assert out == u64_reply(36, 32)
    backend_fd = fd()
    ev, out = send(conn, device, Request.SET_BACKEND_REQ_FD, fds=[backend_fd], need_reply=True)
    assert [type(e) for e in ev] == [vu.BackendChannelSet] and ev[0].fd == backend_fd
    assert ev[0].need_reply and ev[0].request is Request.SET_BACKEND_REQ_FD
    assert out == u64_reply(21, 0)
    ev, out = send(conn, device, Request.SET_OWNER)
    assert ev == [] and out == b"" and conn.owner
    ev, out = send(conn, device, Request.GET_FEATURES)
    assert qemu_check(out, Request.GET_FEATURES, 8) == BALLOON_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES
    for q in range(NUM_QUEUES):  # vhost_virtqueue_init
        for request, kind in ((Request.SET_VRING_CALL, vu.VringCallSet), (Request.SET_VRING_ERR, vu.VringErrSet)):
            f = fd()
            ev, out = send(conn, device, request, VringFd(q), fds=[f])
            assert ev == [kind(q, f, request=request)] and out == b""

    # the guest driver probes: vhost_dev_start
    guest = VIRTIO_F_VERSION_1 | 0b10
    ev, out = send(conn, device, Request.SET_FEATURES, U64(guest | VHOST_USER_F_PROTOCOL_FEATURES))
    assert ev == [vu.FeaturesSet(guest | VHOST_USER_F_PROTOCOL_FEATURES, request=Request.SET_FEATURES)]
    assert out == b""
    ev, out = send(conn, device, Request.GET_STATUS)  # vhost_user_add_status
    status = qemu_check(out, Request.GET_STATUS, 8)
    assert status == 0
    ev, out = send(conn, device, Request.SET_STATUS, U64(status | FEATURES_OK))
    assert ev == [vu.StatusSet(FEATURES_OK, request=Request.SET_STATUS)] and out == b""
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    made.append(ram)
    region = MemoryRegion(gpa=0, size=1 << 30, uaddr=0x7F12_0000_0000, mmap_offset=0)
    if mem_slots:  # vhost_user_add_remove_regions
        ev, out = send(conn, device, Request.ADD_MEM_REG, SingleMemoryRegion(region), fds=[ram], need_reply=True)
        assert ev == [vu.MemoryRegionAdded(region, ram, request=Request.ADD_MEM_REG, need_reply=True)]
        assert out == u64_reply(37, 0)
    else:
        ev, out = send(conn, device, Request.SET_MEM_TABLE, MemoryTable([region]), fds=[ram], need_reply=True)
        assert ev == [vu.MemoryTableSet(((region, ram),), request=Request.SET_MEM_TABLE, need_reply=True)]
        assert out == u64_reply(5, 0)
    started = [0, 1, 2]
    for q in started:
        base = 0x10000 * (q + 1)
        for request, payload, kind_args in (
            (Request.SET_VRING_NUM, VringState(q, 128), (vu.VringNumSet, q, 128)),
            (Request.SET_VRING_BASE, VringState(q, 0), (vu.VringBaseSet, q, 0)),
        ):
            ev, out = send(conn, device, request, payload)
            kind, *args = kind_args
            assert ev == [kind(*args, request=request)] and out == b""
        addr = VringAddr(q, 0, base, base + 0x1000 + 0x104, base + 0x1000, 0)
        ev, out = send(conn, device, Request.SET_VRING_ADDR, addr)
        assert ev == [vu.VringAddrSet(q, 0, addr.desc, addr.used, addr.avail, 0, request=Request.SET_VRING_ADDR)]
        assert out == b""
        kick = fd()
        ev, out = send(conn, device, Request.SET_VRING_KICK, VringFd(q), fds=[kick])
        assert ev == [vu.VringKickSet(q, kick, request=Request.SET_VRING_KICK)] and out == b""
        call = fd()
        ev, out = send(conn, device, Request.SET_VRING_CALL, VringFd(q), fds=[call])
        assert ev == [vu.VringCallSet(q, call, request=Request.SET_VRING_CALL)] and out == b""
    for q in range(NUM_QUEUES):  # vhost_user_set_vring_enable: wait_for_reply
        ev, out = send(conn, device, Request.SET_VRING_ENABLE, VringState(q, 1), need_reply=True)
        assert ev == [vu.VringEnableSet(q, True, request=Request.SET_VRING_ENABLE, need_reply=True)]
        assert out == u64_reply(18, 0)
    for q in range(NUM_QUEUES):  # the irqfds replace the earlier call fds
        f = fd()
        ev, out = send(conn, device, Request.SET_VRING_CALL, VringFd(q), fds=[f])
        assert ev[0].fd == f and out == b""
    ev, out = send(conn, device, Request.GET_CONFIG, ConfigSpace(0, CONFIG_SIZE, 0, bytes(CONFIG_SIZE)))
    assert ev == [vu.ConfigGet(0, CONFIG_SIZE, 0, request=Request.GET_CONFIG)]
    assert out == config_reply(0, device.config)
    assert qemu_check(out, Request.GET_CONFIG, 12 + CONFIG_SIZE).data == device.config

    # a target change: the guest writes `actual` (vub_set_config: whole space, flags 0)
    written = bytes(4) + struct.pack("<I", 256) + bytes(8)
    ev, out = send(conn, device, Request.SET_CONFIG, ConfigSpace(0, 16, 0, written), need_reply=True)
    assert ev == [vu.ConfigSet(0, written, 0, request=Request.SET_CONFIG, need_reply=True)]
    assert out == u64_reply(25, 0)

    # shutdown: vhost_dev_stop
    for q in range(NUM_QUEUES):
        ev, out = send(conn, device, Request.SET_VRING_ENABLE, VringState(q, 0), need_reply=True)
        assert ev[0].enabled is False and out == u64_reply(18, 0)
    device.last_avail = {0: 517, 1: 3, 2: 65535}
    for q in started:
        ev, out = send(conn, device, Request.GET_VRING_BASE, VringState(q, 0))
        assert ev == [vu.VringBaseGet(q, request=Request.GET_VRING_BASE)]
        assert out == state_reply(11, q, device.last_avail[q])
        assert qemu_check(out, Request.GET_VRING_BASE, 8) == VringState(q, device.last_avail[q])
    return {"made": made}


@pytest.mark.parametrize("mem_slots", [False, True], ids=["recorded_set_mem_table", "configure_mem_slots"])
def test_qemu_10_2_2_sequence(mem_slots):
    with no_fd_leak():
        offered = BALLOON_PROTOCOL if mem_slots else BALLOON_PROTOCOL & ~PF.CONFIGURE_MEM_SLOTS
        conn = new_conn(protocol_features=offered)
        device = Device()
        made = run_qemu_sequence(conn, device, mem_slots=mem_slots)["made"]
        assert conn.status == FEATURES_OK
        assert conn.acked_features & VHOST_USER_F_PROTOCOL_FEATURES
        # fds reached the caller as themselves, still open, and no others
        assert sorted(device.fds) == sorted(made)
        assert all(is_open(fd) for fd in made)
        conn.close()
        device.close()


def test_qemu_sequence_whole_and_byte_by_byte_give_the_same_events():
    """QEMU's start-up requests fed in the largest chunks the kernel would
    return (each ends with an fd message) vs one byte at a time."""
    with no_fd_leak():
        def messages():
            fds = [eventfd() for _ in range(3)]
            return [
                (encode(Request.GET_FEATURES), []),
                (encode(Request.GET_PROTOCOL_FEATURES), []),
                (encode(Request.SET_PROTOCOL_FEATURES, U64(int(BALLOON_PROTOCOL))), []),
                (encode(Request.GET_QUEUE_NUM), []),
                (encode(Request.SET_BACKEND_REQ_FD, need_reply=True), [fds[0]]),
                (encode(Request.SET_OWNER), []),
                (encode(Request.SET_VRING_CALL, VringFd(0)), [fds[1]]),
                (encode(Request.SET_VRING_NUM, VringState(0, 256)), []),
                (encode(Request.GET_VRING_BASE, VringState(0, 0)), []),
                (encode(Request.SET_VRING_ERR, VringFd(4)), [fds[2]]),
            ]

        def run(byte_by_byte: bool):
            conn, device = new_conn(), Device()
            if byte_by_byte:
                for data, fds in messages():
                    for i in range(len(data)):
                        conn.receive_data(data[i : i + 1], fds if i == 0 else [])
                        device.drain(conn)
            else:  # as the kernel would return it to one big recvmsg each time
                pending = b""
                for data, fds in messages():
                    pending += data
                    if fds:
                        conn.receive_data(pending, fds)
                        device.drain(conn)
                        pending = b""
                conn.receive_data(pending)
                device.drain(conn)
            events = [(type(e), getattr(e, "index", None), len(e.fds)) for e in device.events]
            out = conn.data_to_send()
            device.close()
            return events, out

        assert run(False) == run(True)
        events, out = run(False)
        assert [e[0] for e in events] == [vu.BackendChannelSet, vu.VringCallSet, vu.VringNumSet, vu.VringBaseGet, vu.VringErrSet]
        assert len(out) == 3 * 20 + 20 + 20  # 3 u64 replies, 1 ack, 1 vring state


# -- REPLY_ACK --------------------------------------------------------------------------


def negotiated_conn(protocol=BALLOON_PROTOCOL, features=VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES):
    conn, device = new_conn(), Device()
    send(conn, device, Request.SET_PROTOCOL_FEATURES, U64(int(protocol)))
    send(conn, device, Request.SET_OWNER)
    if features is not None:
        send(conn, device, Request.SET_FEATURES, U64(features))
    return conn, device


def test_ack_on_success_and_failure():
    conn, device = negotiated_conn()
    device.refuse = {vu.VringNumSet}
    _, out = send(conn, device, Request.SET_VRING_NUM, VringState(0, 64), need_reply=True)
    assert out == u64_reply(8, 1)
    device.refuse = set()
    _, out = send(conn, device, Request.SET_VRING_NUM, VringState(0, 64), need_reply=True)
    assert out == u64_reply(8, 0)
    _, out = send(conn, device, Request.SET_VRING_NUM, VringState(0, 64))
    assert out == b""


def test_own_reply_gets_no_extra_ack():
    conn, device = negotiated_conn()
    for request in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                    Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS):
        _, out = send(conn, device, request, need_reply=True)
        assert len(out) == 20, request.name
    _, out = send(conn, device, Request.GET_VRING_BASE, VringState(1, 0), need_reply=True)
    assert out == state_reply(11, 1, 0)
    _, out = send(conn, device, Request.GET_CONFIG, ConfigSpace(4, 4, 0, bytes(4)), need_reply=True)
    assert out == config_reply(4, device.config[4:8])


def test_protocol_level_set_requests_ack_when_asked():
    conn, device = new_conn(), Device()
    _, out = send(conn, device, Request.SET_PROTOCOL_FEATURES, U64(int(PF.REPLY_ACK)), need_reply=True)
    assert out == u64_reply(16, 0)
    _, out = send(conn, device, Request.SET_OWNER, need_reply=True)
    assert out == u64_reply(3, 0)


def test_need_reply_without_reply_ack_is_still_answered():
    # libvhost-user acks whenever NEED_REPLY is set; a front-end that sets it waits.
    conn, device = negotiated_conn(protocol=PF.MQ)
    assert not conn.reply_ack
    _, out = send(conn, device, Request.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    assert out == u64_reply(18, 0)


def test_get_config_refused_replies_empty():
    conn, device = negotiated_conn()
    device.refuse = {vu.ConfigGet}
    _, out = send(conn, device, Request.GET_CONFIG, ConfigSpace(0, 16, 0, bytes(16)))
    assert out == struct.pack("=III", Request.GET_CONFIG, 0x5, 0)


# -- the state table: illegal now -> ProtocolError naming request and reason --------------


def assert_poisoned(conn: vu.BackendConnection) -> None:
    with pytest.raises(ProtocolError):
        conn.next_event()
    fd = eventfd()
    with pytest.raises(ProtocolError):
        conn.receive_data(encode(Request.SET_VRING_CALL, VringFd(0)), [fd])
    assert not is_open(fd)
    with pytest.raises(ProtocolError):
        conn.complete(vu.DeviceReset(request=Request.RESET_DEVICE))


ILLEGAL = [
    # (label, setup: protocol features to negotiate or None, features or None, request, payload, nfds, error)
    ("vring num not power of 2", BALLOON_PROTOCOL, 0, Request.SET_VRING_NUM, VringState(1, 100), 0,
     "SET_VRING_NUM: queue 1 size 100 is not a power of 2"),
    ("vring num 0", BALLOON_PROTOCOL, 0, Request.SET_VRING_NUM, VringState(1, 0), 0,
     "SET_VRING_NUM: queue 1 size 0 (must be 1..32768)"),
    ("vring num 65536", BALLOON_PROTOCOL, 0, Request.SET_VRING_NUM, VringState(1, 65536), 0,
     "SET_VRING_NUM: queue 1 size 65536 (must be 1..32768)"),
    ("queue out of range", BALLOON_PROTOCOL, 0, Request.SET_VRING_NUM, VringState(7, 64), 0,
     "SET_VRING_NUM: queue 7 out of range (device has 5 queues)"),
    ("kick queue out of range", BALLOON_PROTOCOL, 0, Request.SET_VRING_KICK, VringFd(5), 1,
     "SET_VRING_KICK: queue 5 out of range (device has 5 queues)"),
    ("get base out of range", BALLOON_PROTOCOL, 0, Request.GET_VRING_BASE, VringState(200, 0), 0,
     "GET_VRING_BASE: queue 200 out of range (device has 5 queues)"),
    ("features not offered", BALLOON_PROTOCOL, None, Request.SET_FEATURES, U64(VIRTIO_F_VERSION_1 | 1 << 3 | 1 << 35), 0,
     "SET_FEATURES: bits 0x800000008 (bit 3, 35) were not offered"),
    ("protocol features not offered", None, None, Request.SET_PROTOCOL_FEATURES, U64(int(PF.MQ | PF.LOG_SHMFD | PF.RARP)), 0,
     "SET_PROTOCOL_FEATURES: 0x6 (LOG_SHMFD|RARP) were not offered"),
    ("config before protocol features", None, None, Request.GET_CONFIG, ConfigSpace(0, 16, 0, bytes(16)), 0,
     "GET_CONFIG requires protocol feature CONFIG, but protocol features are not negotiated yet"),
    ("config not negotiated", PF.MQ | PF.REPLY_ACK, None, Request.SET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)), 0,
     "SET_CONFIG requires protocol feature CONFIG, which the front-end did not negotiate (negotiated 0x9 (MQ|REPLY_ACK))"),
    ("backend fd not negotiated", PF.MQ, None, Request.SET_BACKEND_REQ_FD, Empty(), 1,
     "SET_BACKEND_REQ_FD requires protocol feature BACKEND_REQ, which the front-end did not negotiate"),
    ("add mem reg not negotiated", PF.MQ, None, Request.ADD_MEM_REG,
     SingleMemoryRegion(MemoryRegion(0, 4096, 0x1000, 0)), 1,
     "ADD_MEM_REG requires protocol feature CONFIGURE_MEM_SLOTS, which the front-end did not negotiate"),
    ("enable without protocol features", None, None, Request.SET_VRING_ENABLE, VringState(0, 1), 0,
     "SET_VRING_ENABLE requires VHOST_USER_F_PROTOCOL_FEATURES (bit 30), which was not negotiated"),
    ("enable after features without bit 30", BALLOON_PROTOCOL, VIRTIO_F_VERSION_1, Request.SET_VRING_ENABLE,
     VringState(0, 1), 0, "SET_VRING_ENABLE requires VHOST_USER_F_PROTOCOL_FEATURES (bit 30), which was not negotiated"),
    ("enable 2", BALLOON_PROTOCOL, 0, Request.SET_VRING_ENABLE, VringState(0, 2), 0,
     "SET_VRING_ENABLE: queue 0 num 2 (must be 0 or 1)"),
    ("unsupported with fd", BALLOON_PROTOCOL, 0, Request.SET_LOG_BASE, Raw(bytes(16)), 1,
     "SET_LOG_BASE is not supported by this back-end (protocol feature LOG_SHMFD not offered)"),
    ("unsupported inflight", BALLOON_PROTOCOL, 0, Request.SET_INFLIGHT_FD, Raw(bytes(20)), 1,
     "SET_INFLIGHT_FD is not supported by this back-end (protocol feature INFLIGHT_SHMFD not offered)"),
    ("unsupported rarp", BALLOON_PROTOCOL, 0, Request.SEND_RARP, U64(0), 0,
     "SEND_RARP is not supported by this back-end (protocol feature RARP not offered)"),
    ("unsupported iotlb", BALLOON_PROTOCOL, 0, Request.IOTLB_MSG, Raw(bytes(24)), 0,
     "IOTLB_MSG is not supported by this back-end (feature VIRTIO_F_IOMMU_PLATFORM not offered)"),
    ("unsupported device state", BALLOON_PROTOCOL, 0, Request.CHECK_DEVICE_STATE, Empty(), 0,
     "CHECK_DEVICE_STATE is not supported by this back-end (protocol feature DEVICE_STATE not offered)"),
    ("config past the end", BALLOON_PROTOCOL, 0, Request.GET_CONFIG, ConfigSpace(12, 8, 0, bytes(8)), 0,
     "GET_CONFIG: offset 12 + size 8 passes the end of the 16-byte config space"),
    ("set config bad flags", BALLOON_PROTOCOL, 0, Request.SET_CONFIG, ConfigSpace(0, 4, 7, bytes(4)), 0,
     "SET_CONFIG: flags 0x7 (must be 0 front-end or 1 migration)"),
    ("dirty log ring", BALLOON_PROTOCOL, 0, Request.SET_VRING_ADDR, VringAddr(0, 1, 0x1000, 0x2000, 0x3000, 0x4000), 0,
     "SET_VRING_ADDR: queue 0 asks for dirty logging (flags 0x1)"),
    ("status too big", BALLOON_PROTOCOL, 0, Request.SET_STATUS, U64(0x100), 0,
     "SET_STATUS: status 0x100 does not fit the 8-bit device status"),
    ("split base reserved bits", BALLOON_PROTOCOL, 0, Request.SET_VRING_BASE, VringState(0, 0x10000), 0,
     "SET_VRING_BASE: queue 0 base 0x10000 has reserved bits 16-31 set"),
    ("region of size 0", BALLOON_PROTOCOL, 0, Request.SET_MEM_TABLE,
     MemoryTable([MemoryRegion(0, 0, 0x1000, 0)]), 1, "SET_MEM_TABLE: region 0 has size 0"),
    ("overlapping regions", BALLOON_PROTOCOL, 0, Request.SET_MEM_TABLE,
     MemoryTable([MemoryRegion(0x100000, 0x100000, 0x1000, 0), MemoryRegion(0, 0x100001, 0x900000, 0)]), 2,
     "SET_MEM_TABLE: region 1 (gpa 0x0 size 0x100001) overlaps region 0 (gpa 0x100000)"),
    ("region wraps", BALLOON_PROTOCOL, 0, Request.ADD_MEM_REG,
     SingleMemoryRegion(MemoryRegion(0xFFFF_FFFF_FFFF_F000, 0x2000, 0x1000, 0)), 1,
     "ADD_MEM_REG: region gpa 0xfffffffffffff000 + size 0x2000 passes the end of the 64-bit space"),
]


@pytest.mark.parametrize("label,protocol,features,request_,payload,nfds,error", ILLEGAL, ids=[i[0] for i in ILLEGAL])
def test_illegal_request(label, protocol, features, request_, payload, nfds, error):
    with no_fd_leak():
        conn, device = new_conn(), Device()
        if protocol is not None:
            send(conn, device, Request.SET_PROTOCOL_FEATURES, U64(int(protocol)))
        if features is not None:
            send(conn, device, Request.SET_FEATURES, U64(features | (VHOST_USER_F_PROTOCOL_FEATURES if features == 0 else 0)))
        fds = [eventfd() for _ in range(nfds)]
        conn.receive_data(encode(request_, payload), fds)
        with pytest.raises(ProtocolError) as info:
            conn.next_event()
        assert error in str(info.value)
        assert not any(is_open(fd) for fd in fds)
        assert conn.data_to_send() == b""  # no reply to a rejected request
        assert_poisoned(conn)
        conn.close()
        device.close()


def test_not_offered_protocol_feature_is_unsupported():
    conn, device = new_conn(protocol_features=PF.REPLY_ACK | PF.CONFIG), Device()
    send(conn, device, Request.SET_PROTOCOL_FEATURES, U64(int(PF.REPLY_ACK)))
    conn.receive_data(encode(Request.GET_QUEUE_NUM))
    with pytest.raises(ProtocolError, match=r"GET_QUEUE_NUM is not supported by this back-end \(protocol feature MQ not offered\)"):
        conn.next_event()


def test_poisoning_closes_fds_of_later_buffered_messages():
    with no_fd_leak():
        conn, device = negotiated_conn()
        fd = eventfd()
        bad = encode(Request.SET_VRING_NUM, VringState(0, 3))
        conn.receive_data(bad + encode(Request.SET_VRING_CALL, VringFd(0)), [fd])
        with pytest.raises(ProtocolError, match="size 3 is not a power of 2"):
            conn.next_event()
        assert not is_open(fd)


def test_wire_errors_poison_the_connection():
    with no_fd_leak():
        conn, device = negotiated_conn()
        fd = eventfd()
        conn.receive_data(encode(Request.SET_OWNER), [fd])
        with pytest.raises(ProtocolError, match="SET_OWNER carries 1 fd, takes none"):
            conn.next_event()
        assert not is_open(fd)
        assert_poisoned(conn)


def test_replies_earned_before_an_error_can_still_be_sent():
    conn, device = new_conn(), Device()
    conn.receive_data(encode(Request.GET_FEATURES) + struct.pack("=III", 99, 1, 0))
    with pytest.raises(ProtocolError, match="unknown request 99"):
        conn.next_event()
    assert conn.data_to_send() == u64_reply(1, BALLOON_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES)


# -- events in detail -----------------------------------------------------------------------


def test_vring_file_without_fd_is_none():
    conn, device = negotiated_conn()
    events, _ = send(conn, device, Request.SET_VRING_KICK, VringFd(3, invalid=True))
    assert events == [vu.VringKickSet(3, None, request=Request.SET_VRING_KICK)]
    assert events[0].fds == ()


def test_rem_mem_reg_closes_the_fd_it_may_carry():
    with no_fd_leak():
        conn, device = negotiated_conn()
        fd = eventfd()
        region = MemoryRegion(0, 1 << 20, 0x7000_0000, 0)
        events, out = send(conn, device, Request.REM_MEM_REG, SingleMemoryRegion(region), fds=[fd], need_reply=True)
        assert events == [vu.MemoryRegionRemoved(region, request=Request.REM_MEM_REG, need_reply=True)]
        assert not is_open(fd)
        assert out == u64_reply(38, 0)


def test_reset_device_resets_device_state():
    conn, device = negotiated_conn()
    send(conn, device, Request.SET_STATUS, U64(FEATURES_OK))
    events, out = send(conn, device, Request.RESET_DEVICE)
    assert events == [vu.DeviceReset(request=Request.RESET_DEVICE)] and out == b""
    assert conn.status == 0 and conn.acked_features == 0 and not conn.features_set
    assert conn.acked_protocol_features == BALLOON_PROTOCOL and conn.owner
    _, out = send(conn, device, Request.GET_STATUS)
    assert out == u64_reply(40, 0)


def test_reset_owner_is_a_device_reset_event():
    conn, device = negotiated_conn()
    events, _ = send(conn, device, Request.RESET_OWNER)
    assert events == [vu.DeviceReset(request=Request.RESET_OWNER)]


def test_packed_ring_allows_wide_base_and_any_size():
    device = Device()
    conn2 = new_conn(device_features=BALLOON_FEATURES | VIRTIO_F_RING_PACKED)
    send(conn2, device, Request.SET_FEATURES, U64(VIRTIO_F_RING_PACKED | VHOST_USER_F_PROTOCOL_FEATURES))
    events, _ = send(conn2, device, Request.SET_VRING_NUM, VringState(0, 100))
    assert events[0].num == 100
    events, _ = send(conn2, device, Request.SET_VRING_BASE, VringState(0, 0x8001_8002))
    assert events[0].base == 0x8001_8002


# -- our own misuse: LocalProtocolError ---------------------------------------------------


def test_next_event_before_complete():
    conn, device = negotiated_conn()
    conn.receive_data(encode(Request.SET_VRING_NUM, VringState(0, 64)))
    event = conn.next_event()
    with pytest.raises(LocalProtocolError, match="next_event\\(\\) before complete\\(\\) of the pending VringNumSet"):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.complete(event)  # poisoned by our own error


@pytest.mark.parametrize(
    "request_,payload,answer,ok,error",
    [
        (Request.SET_VRING_NUM, VringState(0, 64), b"x", True, "SET_VRING_NUM: complete() takes no payload"),
        (Request.GET_CONFIG, ConfigSpace(0, 16, 0, bytes(16)), bytes(8), True, "GET_CONFIG: complete with exactly 16 bytes"),
        (Request.GET_VRING_BASE, VringState(0, 0), 0x10000, True, "GET_VRING_BASE: complete with an int 0..0xffff"),
    ],
)
def test_complete_misuse(request_, payload, answer, ok, error):
    conn, device = negotiated_conn()
    conn.receive_data(encode(request_, payload))
    event = conn.next_event()
    with pytest.raises(LocalProtocolError, match=error.replace("(", r"\(").replace(")", r"\)")):
        conn.complete(event, answer, ok=ok)
    assert conn.data_to_send() == b""


def test_complete_of_another_event():
    conn, device = negotiated_conn()
    conn.receive_data(encode(Request.SET_VRING_NUM, VringState(0, 64)))
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="pending event is VringNumSet"):
        conn.complete(vu.VringNumSet(0, 64, request=Request.SET_VRING_NUM))  # equal, not the same


def test_constructor_refuses_what_it_cannot_serve():
    with pytest.raises(LocalProtocolError, match="LOG_SHMFD"):
        new_conn(protocol_features=BALLOON_PROTOCOL | PF.LOG_SHMFD)
    with pytest.raises(LocalProtocolError, match="VIRTIO_F_IOMMU_PLATFORM"):
        new_conn(device_features=BALLOON_FEATURES | 1 << 33)
    with pytest.raises(LocalProtocolError, match="config_size 300"):
        new_conn(config_size=300)


def test_close_closes_fds_still_held():
    with no_fd_leak():
        conn = new_conn()
        fds = [eventfd(), eventfd()]
        data = encode(Request.SET_MEM_TABLE, MemoryTable([MemoryRegion(0, 4096, 0x1000, 0), MemoryRegion(8192, 4096, 0x9000, 0)]))
        conn.receive_data(data[:30], fds)
        assert conn.next_event() is vu.NEED_DATA and conn.has_partial_message
        conn.close()
        assert not any(is_open(fd) for fd in fds)
        late = eventfd()
        with pytest.raises(LocalProtocolError, match="connection closed"):
            conn.receive_data(b"x", [late])
        assert not is_open(late)


# -- the back-end channel ---------------------------------------------------------------------


def test_config_change_message_bytes():
    assert vu.encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG) == struct.pack("=III", 2, 0x1, 0)
    assert vu.encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True) == struct.pack("=III", 2, 0x9, 0)


def test_backend_channel_reads_acks_in_pieces():
    channel = vu.BackendChannel()
    sent = channel.encode_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
    assert sent == struct.pack("=III", 2, 0x9, 0)
    ack = struct.pack("=IIIQ", 2, 0x5, 8, 0)  # QEMU backend_read: !!ret, REPLY|VERSION
    assert channel.receive_reply(ack[:7]) is None
    assert channel.receive_reply(ack[7:]) == 0
    channel.encode_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
    channel.feed(struct.pack("=IIIQ", 2, 0x5, 8, 1))
    assert channel.next_ack() == vu.BackendAck(BackendRequest.CONFIG_CHANGE_MSG, 1)
    assert not channel.next_ack() and channel.next_ack() is None


def test_backend_channel_rejects_mismatched_or_malformed_replies():
    channel = vu.BackendChannel()
    channel.encode_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
    with pytest.raises(ProtocolError, match="reply to back-end IOTLB_MSG, but CONFIG_CHANGE_MSG awaits one"):
        channel.receive_reply(struct.pack("=IIIQ", 1, 0x5, 8, 0))
    with pytest.raises(ProtocolError, match="REPLY flag missing"):
        vu.BackendChannel().receive_reply(struct.pack("=IIIQ", 2, 0x1, 8, 0))


def test_refused_get_vring_base_ends_the_connection():
    with no_fd_leak():
        conn, device = negotiated_conn()
        conn.receive_data(encode(Request.GET_VRING_BASE, VringState(0, 0)))
        event = conn.next_event()
        conn.complete(event, ok=False)
        assert conn.data_to_send() == b""  # a vring state cannot say "failed"
        with pytest.raises(LocalProtocolError, match="close the connection"):
            conn.next_event()
        fd = eventfd()
        with pytest.raises(LocalProtocolError):
            conn.receive_data(b"x", [fd])
        assert not is_open(fd)
