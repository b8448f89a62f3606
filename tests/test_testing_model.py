"""Tests of vhostballoon.testing: the guest model and the QEMU-like front-end.

The device side here is written from the virtio spec and vhost-user.rst,
independently of the code under test: ``RingReader`` walks the split ring
with its own offsets, ``FakeDevice`` plays the device for the driver, and
``FakeBackend`` answers the front-end over a real unix socket.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import struct
from array import array
from functools import partial

import pytest
import trio

from vhostballoon.testing.fds import fd_count as open_fd_count
from vhostballoon.testing import (
    BackendRejected,
    BalloonDriver,
    Channel,
    DeviceBugError,
    DeviceTimeout,
    DriverError,
    DriverVirtqueue,
    Frontend,
    GuestRAM,
    ProtocolViolation,
    allocation_order,
    model_guest,
    vring_need_event,
)

PAGE = 4096
F_MUST_TELL_HOST = 1 << 0
F_STATS_VQ = 1 << 1
F_REPORTING = 1 << 5
F_INDIRECT = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_PROTOCOL_FEATURES = 1 << 30

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def punch(fd: int, pfn: int, count: int = 1) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pfn * PAGE, count * PAGE) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


# -- an independent device-side ring reader (virtio 1.2, 2.7) ------------------------


class RingLoop(Exception):
    pass


class RingReader:
    """Reads a split ring the way a device does. Offsets from the spec:
    avail = {u16 flags, u16 idx, u16 ring[num], u16 used_event};
    used = {u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event}."""

    def __init__(self, mem, desc: int, avail: int, used: int, num: int) -> None:
        self.mem, self.desc, self.avail, self.used, self.num = mem, desc, avail, used, num
        self.last_avail = 0

    def avail_idx(self) -> int:
        return struct.unpack_from("<H", self.mem, self.avail + 2)[0]

    def used_event(self) -> int:
        return struct.unpack_from("<H", self.mem, self.avail + 4 + 2 * self.num)[0]

    def set_avail_event(self, value: int) -> None:
        struct.pack_into("<H", self.mem, self.used + 4 + 8 * self.num, value)

    def pop_heads(self) -> list[int]:
        heads = []
        while self.last_avail != self.avail_idx():
            slot = self.last_avail % self.num
            heads.append(struct.unpack_from("<H", self.mem, self.avail + 4 + 2 * slot)[0])
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return heads

    def chain(self, head: int) -> tuple[list[tuple[int, int, bool]], bool]:
        """[(addr, len, device_writable)], and whether it came through an indirect table."""
        if head >= self.num:
            raise IndexError(f"head {head} out of range")
        addr, length, flags, nxt = struct.unpack_from("<QIHH", self.mem, self.desc + 16 * head)
        if flags & 4:
            table, entries, i, indirect = addr, length // 16, 0, True
        else:
            table, entries, i, indirect = self.desc, self.num, head, False
        segments = []
        for _ in range(entries + 1):
            addr, length, flags, nxt = struct.unpack_from("<QIHH", self.mem, table + 16 * i)
            segments.append((addr, length, bool(flags & 2)))
            if not flags & 1:
                return segments, indirect
            i = nxt
        raise RingLoop(f"chain from head {head} does not end")

    def push_used(self, head: int, written: int) -> None:
        idx = struct.unpack_from("<H", self.mem, self.used + 2)[0]
        struct.pack_into("<II", self.mem, self.used + 4 + 8 * (idx % self.num), head, written)
        struct.pack_into("<H", self.mem, self.used + 2, (idx + 1) & 0xFFFF)


def reader_for(vq: DriverVirtqueue) -> RingReader:
    return RingReader(vq.mem, vq.desc_gpa, vq.avail_gpa, vq.used_gpa, vq.num)


@pytest.fixture
def ram():
    with GuestRAM(64 << 20, reserved=1 << 20) as guest_ram:
        yield guest_ram


# -- split ring ----------------------------------------------------------------------


def test_ring_layout_and_direct_chain(ram):
    vq = DriverVirtqueue(ram, 0, 8)
    assert vq.avail_gpa == vq.desc_gpa + 16 * 8
    assert vq.used_gpa >= vq.avail_gpa + 6 + 2 * 8 and vq.used_gpa % 64 == 0
    assert vq.used_gpa + 6 + 8 * 8 <= ram.reserved_bytes
    head = vq.add_buffer([(0x10000, 100), (0x20000, 50)], [(0x30000, 4096)])
    reader = reader_for(vq)
    assert reader.pop_heads() == [head]
    assert reader.chain(head) == ([(0x10000, 100, False), (0x20000, 50, False), (0x30000, 4096, True)], False)
    assert vq.num_free == 5
    reader.push_used(head, 7)
    assert vq.get_used() == [(head, 7)]
    assert vq.num_free == 8 and vq.get_used() == []


def test_indirect_only_for_multi_segment_buffers(ram):
    vq = DriverVirtqueue(ram, 0, 8, indirect=True)
    reader = reader_for(vq)
    multi = vq.add_buffer((), [(0x200000, 2 << 20), (0x600000, 2 << 20), (0xA00000, 2 << 20)])
    single = vq.add_buffer([(0x5000, 1024)])
    assert reader.pop_heads() == [multi, single]
    segments, indirect = reader.chain(multi)
    assert indirect and segments == [(0x200000, 2 << 20, True), (0x600000, 2 << 20, True), (0xA00000, 2 << 20, True)]
    table_addr = struct.unpack_from("<Q", ram.mem, vq.desc_gpa + 16 * multi)[0]
    assert table_addr < ram.reserved_bytes  # indirect tables live in the reserved area
    assert reader.chain(single) == ([(0x5000, 1024, False)], False)
    assert vq.num_free == 6  # one descriptor per buffer


def test_kick_and_interrupt_suppression_with_event_idx(ram):
    vq = DriverVirtqueue(ram, 0, 8, event_idx=True)
    reader = reader_for(vq)
    vq.add_buffer([(0x5000, 8)])
    assert vq.kick_needed()  # avail_event 0: the device wants a kick for entry 0
    reader.set_avail_event(5)
    vq.add_buffer([(0x5000, 8)])
    assert not vq.kick_needed()  # idx moved 1 -> 2, device asked only at 5
    for head in reader.pop_heads():
        reader.push_used(head, 0)
    assert len(vq.get_used()) == 2
    assert reader.used_event() == vq.last_used_idx == 2  # re-armed for the next used entry
    assert vring_need_event(2, 3, 2) and not vring_need_event(2, 2, 1)


def test_kick_suppressed_by_no_notify_without_event_idx(ram):
    vq = DriverVirtqueue(ram, 0, 8)
    vq.add_buffer([(0x5000, 8)])
    assert vq.kick_needed()
    struct.pack_into("<H", ram.mem, vq.used_gpa, 1)  # VRING_USED_F_NO_NOTIFY
    vq.add_buffer([(0x5000, 8)])
    assert not vq.kick_needed()


def test_used_ring_checks_catch_device_bugs(ram):
    vq = DriverVirtqueue(ram, 0, 8)
    reader = reader_for(vq)
    head = vq.add_buffer([(0x5000, 8)])
    reader.pop_heads()
    reader.push_used(head + 3, 0)  # an id that is not in flight
    with pytest.raises(DeviceBugError, match="not in flight"):
        vq.get_used()
    vq2 = DriverVirtqueue(ram, 1, 8)
    vq2.add_buffer([(0x5000, 8)])
    struct.pack_into("<H", ram.mem, vq2.used_gpa + 2, 4)  # used idx jumps by 4 with 1 in flight
    with pytest.raises(DeviceBugError, match="only 1 buffers are in flight"):
        vq2.get_used()


def test_broken_ring_hooks(ram):
    vq = DriverVirtqueue(ram, 0, 8)
    reader = reader_for(vq)
    vq.publish_head(8 + 3)
    loop_head = vq.publish_looping_chain(3)
    heads = reader.pop_heads()
    assert heads == [11, loop_head]
    with pytest.raises(IndexError):
        reader.chain(11)
    with pytest.raises(RingLoop):
        reader.chain(loop_head)
    vq.set_avail_idx(reader.last_avail + 8 + 1)  # more buffers than the ring holds
    assert (reader.avail_idx() - reader.last_avail) & 0xFFFF == 9
    bogus = vq.publish_descriptor(ram.size + PAGE, 4096)  # a buffer outside guest RAM
    assert struct.unpack_from("<Q", ram.mem, vq.desc_gpa + 16 * bogus)[0] == ram.size + PAGE


# -- PFN orders ------------------------------------------------------------------------


def descending_runs(pfns) -> list[list[int]]:
    runs: list[list[int]] = []
    for pfn in pfns:
        if runs and runs[-1][-1] - 1 == pfn:
            runs[-1].append(pfn)
        else:
            runs.append([pfn])
    return runs


def test_linux_order_is_interleaved_descending_runs():
    pfns = range(256, 0x4000)
    order = allocation_order(pfns, "linux")
    assert sorted(order) == list(pfns)
    assert order[0] == 0x3FFF  # from the top of memory down
    runs = descending_runs(order)
    assert all(len(run) == 16 for run in runs[:63])  # within the first pair of blocks
    assert max(map(len, runs[:-1])) <= 32  # a pair's last run may continue into the next; a lone last block is one run
    # consecutive runs come from two different 2 MiB blocks, alternately
    blocks = [run[0] // 512 for run in runs[:64]]
    assert blocks[0] != blocks[1] and blocks[0::2] == [blocks[0]] * 32 and blocks[1::2] == [blocks[1]] * 32
    assert runs[2][0] == runs[0][-1] - 1  # block A resumes where it stopped


def test_random_order_has_no_repeats_and_avoids_reserved(ram):
    order = allocation_order(ram.guest_pfns(), "random", seed=7)
    assert len(set(order)) == len(order) == ram.num_pages - ram.reserved_pages
    assert min(order) == ram.reserved_pages
    assert list(order) != sorted(order)
    assert order == allocation_order(ram.guest_pfns(), "random", seed=7)
    assert order != allocation_order(ram.guest_pfns(), "random", seed=8)
    assert list(allocation_order(ram.guest_pfns(), "sequential")) == list(ram.guest_pfns())


# -- guest RAM ---------------------------------------------------------------------------


def test_canary_and_allocation_seen_by_the_host(ram):
    assert ram.allocated_bytes() == 0
    ram.touch()
    guest_bytes = (ram.num_pages - ram.reserved_pages) * PAGE
    assert ram.allocated_bytes() == guest_bytes
    assert ram.check_canary() == []
    victims = [1000, 1001, 9000]
    punch(ram.fd, 1000, 2)
    punch(ram.fd, 9000)
    assert ram.allocated_bytes() == guest_bytes - 3 * PAGE
    assert ram.check_canary() == victims
    assert ram.check_canary([9000, 5000, 1001]) == [9000, 1001]
    assert ram.allocated_bytes() == guest_bytes - 3 * PAGE  # checking did not fill the holes
    struct.pack_into("<Q", ram.mem, 7000 * PAGE, 0xDEAD)  # a page that is there but wrong
    assert ram.check_canary() == [1000, 1001, 7000, 9000]
    ram.touch(victims)
    ram.touch([7000])
    assert ram.check_canary() == [] and ram.allocated_bytes() == guest_bytes


# -- the driver against a fake device ------------------------------------------------------


class FakeDevice:
    """A balloon device for the driver (implements its Transport): real
    eventfds, real fallocate on inflate, config kept here."""

    def __init__(self, features: int, *, num_vqs: int = 5, vq_size: int = 128, hold_stats: bool = True,
                 hold_all: bool = False) -> None:
        self.hold_all = hold_all
        self.device_features = features
        self.num_vqs = num_vqs
        self.vq_size = vq_size
        self.on_config_change = None
        self.config = bytearray(16)
        self.config_reads = 0
        self.config_writes: list[bytes] = []
        self.buffers: dict[int, list[bytes]] = {}  # queue -> out-buffer contents, in order
        self.in_segments: dict[int, list[list[tuple[int, int]]]] = {}
        self.held_stats: list[int] = []
        self.hold_stats = hold_stats
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.readers: dict[int, RingReader] = {}

    async def start_guest(self, features, ram, queues):
        self.features, self.ram = features, ram
        for vq in queues:
            self.kick_fds[vq.index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.call_fds[vq.index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.readers[vq.index] = reader_for(vq)
        self.started.set()

    async def read_config(self):
        self.config_reads += 1
        await trio.lowlevel.checkpoint()
        return bytes(self.config)

    async def write_config(self, offset, data):
        self.config[offset : offset + len(data)] = data
        self.config_writes.append(bytes(self.config))
        await trio.lowlevel.checkpoint()

    def kick(self, index):
        os.eventfd_write(self.kick_fds[index], 1)

    async def wait_call(self, index):
        await trio.lowlevel.wait_readable(self.call_fds[index])
        os.eventfd_read(self.call_fds[index])

    def set_target(self, num_pages: int) -> None:
        struct.pack_into("<I", self.config, 0, num_pages)
        self.on_config_change()

    def written_actuals(self) -> list[int]:
        return [struct.unpack_from("<I", c, 4)[0] for c in self.config_writes]

    def pfns(self, queue: int) -> list[list[int]]:
        return [list(array("I", data)) for data in self.buffers.get(queue, [])]

    def return_stats(self, stats_queue: int) -> None:
        head = self.held_stats.pop(0)
        self.readers[stats_queue].push_used(head, 0)
        os.eventfd_write(self.call_fds[stats_queue], 1)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        self.started = trio.Event()
        task_status.started()
        await self.started.wait()
        async with trio.open_nursery() as nursery:
            for index in self.readers:
                nursery.start_soon(self._serve_queue, index)

    async def _serve_queue(self, index):
        reader = self.readers[index]
        while True:  # first pass without a kick: buffers added before the queue started
            heads = reader.pop_heads()
            if self.features & F_EVENT_IDX:
                reader.set_avail_event(reader.last_avail)  # kick me for the next one
            for head in heads:
                segments, _ = reader.chain(head)
                outs = [(a, n) for a, n, w in segments if not w]
                ins = [(a, n) for a, n, w in segments if w]
                self.buffers.setdefault(index, []).append(b"".join(self.ram.read(a, n) for a, n in outs))
                self.in_segments.setdefault(index, []).append(ins)
                if index == 0:  # inflate: really free the pages
                    for pfn in array("I", self.buffers[index][-1]):
                        if self.ram.reserved_pages <= pfn < self.ram.num_pages:
                            punch(self.ram.fd, pfn)
                for addr, length in ins:  # reporting: free the reported ranges
                    punch(self.ram.fd, addr // PAGE, length // PAGE)
                if index == 2 and self.features & F_STATS_VQ and self.hold_stats:
                    self.held_stats.append(head)
                    continue
                if self.hold_all:
                    continue
                reader.push_used(head, 0)
                os.eventfd_write(self.call_fds[index], 1)
            await trio.lowlevel.wait_readable(self.kick_fds[index])
            os.eventfd_read(self.kick_fds[index])

    def close(self):
        for fd in [*self.kick_fds.values(), *self.call_fds.values()]:
            os.close(fd)


async def start_driver(nursery, ram, device, **options) -> BalloonDriver:
    ram.touch()
    ram.write(0, bytes(ram.reserved_bytes))  # allocate the ring area now, so later counts are guest pages only
    driver = BalloonDriver(ram, device, **options)
    await nursery.start(device.serve)
    await driver.probe()
    await nursery.start(driver.run)
    return driver


async def test_driver_inflates_and_deflates_like_linux(ram):
    device = FakeDevice(F_VERSION_1 | F_MUST_TELL_HOST | F_INDIRECT | F_EVENT_IDX)
    async with trio.open_nursery() as nursery:
        driver = await start_driver(nursery, ram, device, order="random", seed=3)
        assert driver.roles[0].value == "inflate" and len(driver.queues) == 2
        held = ram.allocated_bytes()
        reads_at_probe = device.config_reads
        assert reads_at_probe == 1  # probe's towards_target

        device.set_target(1000)
        assert await driver.wait_for_target(1000, timeout=10) == 1000
        inflated = device.pfns(0)
        assert [len(b) for b in inflated] == [256, 256, 256, 232]
        flat = [pfn for buf in inflated for pfn in buf]
        assert len(set(flat)) == 1000 and min(flat) >= ram.reserved_pages
        assert device.written_actuals() == [256, 512, 768, 1000]  # actual after each buffer
        assert device.config_reads - reads_at_probe == 4  # one num_pages read per buffer
        assert all(len(c) == 16 for c in device.config_writes)
        assert held - ram.allocated_bytes() == 1000 * PAGE  # the fake device punched them
        assert sorted(driver.balloon_pfns) == sorted(flat)
        assert ram.check_canary(driver.guest_owned_pfns()) == []
        assert len(driver.inflate_rtt_ns) == 4 and min(driver.inflate_rtt_ns) > 0

        device.set_target(300)
        assert await driver.wait_for_target(300, timeout=10) == 300
        deflated = device.pfns(1)
        assert [len(b) for b in deflated] == [256, 256, 188]
        assert deflated[0] == flat[::-1][:256]  # newest first (the balloon list is LIFO)
        assert list(driver.balloon_pfns) == flat[:300]
        back = [pfn for buf in deflated for pfn in buf]
        assert ram.check_canary(back) == []  # the guest uses them again: canary rewritten
        assert held - ram.allocated_bytes() == 300 * PAGE
        assert device.written_actuals()[-3:] == [744, 488, 300]
        nursery.cancel_scope.cancel()
    device.close()


async def test_linux_order_reaches_the_device(ram):
    device = FakeDevice(F_VERSION_1)
    async with trio.open_nursery() as nursery:
        driver = await start_driver(nursery, ram, device, order="linux")
        device.set_target(64)
        await driver.wait_for_target(64, timeout=10)
        (buf,) = device.pfns(0)
        assert buf[:16] == list(range(ram.num_pages - 1, ram.num_pages - 17, -1))
        assert buf[16] == ram.num_pages - 512 - 1  # the second run comes from the next block down
        nursery.cancel_scope.cancel()
    device.close()


async def test_stats_queue_is_primed_and_refilled(ram):
    device = FakeDevice(F_VERSION_1 | F_STATS_VQ | F_REPORTING | F_INDIRECT)
    async with trio.open_nursery() as nursery:
        driver = await start_driver(nursery, ram, device)
        assert [r.value for r in driver.roles] == ["inflate", "deflate", "stats", "reporting"]
        with trio.fail_after(5):
            while not device.held_stats:
                await trio.sleep(0.001)
        (stats,) = device.buffers[2]
        entries = [struct.unpack_from("<HQ", stats, i * 10) for i in range(len(stats) // 10)]
        assert [tag for tag, _ in entries] == list(range(10))
        assert dict(entries)[5] == ram.size  # MEMTOT
        device.return_stats(2)
        with trio.fail_after(5):
            while len(device.buffers[2]) < 2:
                await trio.sleep(0.001)
        assert driver.stats_buffers == 1 and len(device.held_stats) == 1

        held = ram.allocated_bytes()
        first = ram.reserved_pages + 512 - ram.reserved_pages % 512
        await driver.report_free_pages([(first, 512), (first + 1024, 512)])
        assert device.in_segments[3][-1] == [(first * PAGE, 2 << 20), (first * PAGE + (4 << 20), 2 << 20)]
        assert held - ram.allocated_bytes() == 1024 * PAGE
        device.set_target(10)
        await driver.wait_for_target(10, timeout=10)
        with pytest.raises(DriverError, match="overlaps the balloon"):
            await driver.report_free_pages([(driver.balloon_pfns[0], 1)])
        nursery.cancel_scope.cancel()
    device.close()


async def test_send_pfns_hook_leaves_accounting_alone(ram):
    device = FakeDevice(F_VERSION_1)
    async with trio.open_nursery() as nursery:
        driver = await start_driver(nursery, ram, device)
        bogus = [ram.num_pages + 5, 3, 3, 0xFFFFFFFF]  # outside RAM, reserved, duplicate
        await driver.send_pfns("inflate", bogus)
        await driver.send_raw_buffer("deflate", b"\x01\x02\x03")
        assert device.pfns(0) == [bogus]
        assert device.buffers[1] == [b"\x01\x02\x03"]
        assert driver.actual_pages == 0 and driver.inflate_buffers == 0
        nursery.cancel_scope.cancel()
    device.close()


# -- the front-end against a fake back-end built on the codec ----------------------------

from vhostballoon.vhost_user.codec import (  # noqa: E402
    ConfigSpace,
    MemoryTable,
    MessageDecoder,
    SingleMemoryRegion,
    U64,
    VringState,
    encode,
)
from vhostballoon.vhost_user.constants import BackendRequest, ProtocolFeature, Request  # noqa: E402

R = Request
PF = ProtocolFeature
BACKEND_FEATURES = F_VERSION_1 | F_MUST_TELL_HOST | F_INDIRECT | F_EVENT_IDX | F_PROTOCOL_FEATURES
QEMU_LIKE_PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.STATUS | PF.RESET_DEVICE
_GETS = {R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS, R.GET_STATUS,
         R.GET_CONFIG, R.GET_VRING_BASE}


class FakeBackend:
    """Decodes requests with the codec, answers like a correct back-end, and
    serves the rings: every buffer comes back, inflated pages are punched."""

    def __init__(self, sock, *, features=BACKEND_FEATURES, protocol=QEMU_LIKE_PROTOCOL, queue_num=5,
                 raw_replies=None):
        self.sock = sock
        self.features, self.protocol, self.queue_num = features, int(protocol), queue_num
        self.raw_replies = raw_replies or {}  # request -> bytes sent instead of the right reply
        self.decoder = MessageDecoder.for_requests()
        self.received = []
        self.config = bytearray(16)
        self.status = 0
        self.mem_fd = None
        self.mem = None
        self.region = None
        self.vrings = {}
        self.backend_sock = None
        self.inflated: list[int] = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            while True:
                msg = await self._receive()
                if msg is None:
                    nursery.cancel_scope.cancel()
                    return
                self.received.append(msg)
                await self._handle(msg)

    async def _receive(self):
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            data, anc, _, _ = await self.sock.recvmsg(65536, socket.CMSG_SPACE(32))
            fds = [fd for lvl, typ, blob in anc if typ == socket.SCM_RIGHTS for fd in array("i", blob)]
            if not data:
                return None
            self.decoder.feed(data, fds)

    async def _reply(self, msg, payload):
        data = self.raw_replies.get(msg.request) or encode(msg.request, payload, reply=True)
        await self.sock.send(data)

    async def _handle(self, msg):
        req, p = msg.request, msg.payload
        fds = list(msg.fds)
        answer = {
            R.GET_FEATURES: lambda: U64(self.features),
            R.GET_PROTOCOL_FEATURES: lambda: U64(self.protocol),
            R.GET_QUEUE_NUM: lambda: U64(self.queue_num),
            R.GET_MAX_MEM_SLOTS: lambda: U64(32),
            R.GET_STATUS: lambda: U64(self.status),
            R.GET_CONFIG: lambda: ConfigSpace(0, 16, 0, bytes(self.config)),
        }
        if req in answer:
            await self._reply(msg, answer[req]())
            return
        if req == R.SET_STATUS:
            self.status = p.value
        elif req == R.SET_CONFIG:  # take actual and poison_val, never num_pages
            self.config[4:8] = p.data[4:8]
            self.config[12:16] = p.data[12:16]
        elif req in (R.SET_MEM_TABLE, R.ADD_MEM_REG):
            self.region = p.regions[0] if isinstance(p, MemoryTable) else p.region
            self.mem_fd = fds.pop()
            self.mem = mmap.mmap(self.mem_fd, self.region.size)
        elif req == R.SET_BACKEND_REQ_FD:
            self.backend_sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fds.pop()))
        elif req in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK, R.SET_VRING_CALL):
            ring = self.vrings.setdefault(p.index, {})
            if req in (R.SET_VRING_KICK, R.SET_VRING_CALL):
                key = "kick" if req == R.SET_VRING_KICK else "call"
                if key in ring:
                    os.close(ring[key])
                ring[key] = fds.pop()
            else:
                ring[req.name] = p
        elif req == R.SET_VRING_ENABLE:
            ring = self.vrings.setdefault(p.index, {})
            if p.num and "kick" in ring and R.SET_VRING_ADDR.name in ring:
                self.nursery.start_soon(self._serve_ring, p.index)
        elif req == R.GET_VRING_BASE:
            reader = self.vrings[p.index].get("reader")
            await self._reply(msg, VringState(p.index, reader.last_avail if reader else 0))
        for fd in fds:  # SET_VRING_ERR and anything not kept
            os.close(fd)
        if msg.need_reply:
            await self._reply(msg, U64(0))

    def _offset(self, uaddr):
        return uaddr - self.region.uaddr + self.region.mmap_offset

    async def _serve_ring(self, index):
        ring = self.vrings[index]
        addr, num = ring[R.SET_VRING_ADDR.name], ring[R.SET_VRING_NUM.name].num
        reader = ring["reader"] = RingReader(self.mem, self._offset(addr.desc), self._offset(addr.avail),
                                             self._offset(addr.used), num)
        while True:  # first pass on enable, without a kick (the stats buffer is already there)
            heads = reader.pop_heads()
            reader.set_avail_event(reader.last_avail)
            for head in heads:
                segments, _ = reader.chain(head)
                if index == 0:
                    for addr_, length, _w in segments:
                        start = addr_ - self.region.gpa + self.region.mmap_offset
                        pfns = array("I", self.mem[start : start + length])
                        for pfn in pfns:
                            punch(self.mem_fd, pfn)
                        self.inflated.extend(pfns)
                if index == 2 and self.features & F_STATS_VQ:
                    continue  # hold the stats buffer
                reader.push_used(head, 0)
                os.eventfd_write(self.vrings[index]["call"], 1)
            await trio.lowlevel.wait_readable(ring["kick"])
            os.eventfd_read(ring["kick"])

    async def set_target(self, num_pages):
        """What a back-end does on QMP balloon: new num_pages, then CONFIG_CHANGE_MSG."""
        struct.pack_into("<I", self.config, 0, num_pages)
        await self.backend_sock.send(encode(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True))
        replies = MessageDecoder.for_backend_replies()
        while (ack := replies.next_message()) is None:
            replies.feed(await self.backend_sock.recv(64))
        return ack

    def names(self):
        return [m.request.name for m in self.received]

    async def wait_received(self, count):
        """Requests without a reply may still be in the socket: wait for them."""
        with trio.fail_after(5):
            while len(self.received) < count:
                await trio.sleep(0.001)

    def close(self):
        self.sock.close()
        self.decoder.close()
        if self.backend_sock is not None:
            self.backend_sock.close()
        for ring in self.vrings.values():
            for key in ("kick", "call"):
                if key in ring:
                    os.close(ring[key])
        if self.mem is not None:
            self.mem.close()
            os.close(self.mem_fd)


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


async def _listen(tmp_path) -> tuple[str, trio.socket.SocketType]:
    """A unix socket listening at tmp_path/vb.sock: (its path, the socket)."""
    path = str(tmp_path / "vb.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    return path, listener


async def _serve_one(listener, backends: list, *, task_status=trio.TASK_STATUS_IGNORED, **options) -> None:
    """Accepts one front-end on ``listener`` and serves it with a
    FakeBackend(**options), which goes into ``backends``."""
    task_status.started()
    conn, _ = await listener.accept()
    backends.append(FakeBackend(conn, **options))
    await backends[0].serve()


QEMU_START = ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
              "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES"] + ["SET_VRING_CALL", "SET_VRING_ERR"] * 5
QEMU_PROBE = (["SET_FEATURES", "GET_STATUS", "SET_STATUS", "SET_MEM_TABLE"]
              + ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL"] * 2
              + ["SET_VRING_ENABLE"] * 5 + ["SET_VRING_CALL"] * 5 + ["GET_CONFIG"])


async def test_frontend_sends_what_qemu_sends():
    baseline = open_fd_count()
    with GuestRAM(32 << 20, reserved=1 << 20) as ram:
        ram.touch()
        ours, theirs = _pair()
        backend = FakeBackend(theirs)
        frontend = Frontend(ours)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.serve)
            await frontend.initialize()
            await backend.wait_received(len(QEMU_START))
            assert backend.names() == QEMU_START
            async with trio.open_nursery() as guest_tasks:
                guest_tasks.start_soon(frontend.serve_backend_channel)
                driver = BalloonDriver(ram, frontend)  # accepts all Linux features
                await driver.probe()
                await guest_tasks.start(driver.run)
                await backend.wait_received(len(QEMU_START + QEMU_PROBE))
                assert backend.names() == QEMU_START + QEMU_PROBE
                check_start_messages(backend, frontend, ram, driver)

                # a new target: CONFIG_CHANGE_MSG, then Linux's config traffic per buffer
                before = len(backend.received)
                ack = await backend.set_target(600)
                assert ack.payload.value == 0 and ack.is_reply
                await driver.wait_for_target(600, timeout=10)
                tail = backend.received[before:]
                assert [m.request.name for m in tail] == ["GET_CONFIG", "SET_CONFIG"] * 3
                sets = [m.payload for m in tail if m.request == R.SET_CONFIG]
                assert [(s.offset, s.size, s.flags) for s in sets] == [(0, 16, 0)] * 3
                assert [struct.unpack_from("<I", s.data, 4)[0] for s in sets] == [256, 512, 600]
                assert all(m.need_reply for m in tail if m.request == R.SET_CONFIG)
                assert sorted(backend.inflated) == sorted(driver.balloon_pfns)
                assert ram.check_canary(driver.guest_owned_pfns()) == []
                guest_tasks.cancel_scope.cancel()
            before = len(backend.received)
            bases = await frontend.stop()
            assert bases == {0: 3, 1: 0}
            stop_names = [m.request.name for m in backend.received[before:]]
            assert stop_names == ["SET_VRING_ENABLE"] * 5 + ["GET_VRING_BASE"] * 2
            nursery.cancel_scope.cancel()
        await frontend.aclose()
        backend.close()
    assert open_fd_count() == baseline


def check_start_messages(backend, frontend, ram, driver):
    by_name = {}
    for m in backend.received:
        by_name.setdefault(m.request.name, []).append(m)
    need_reply = {m.request.name for m in backend.received if m.need_reply}
    # As recorded from QEMU 10.2.2 (protocol/transcripts/qemu-10.2.2-balloon.json).
    assert need_reply == {
        "SET_BACKEND_REQ_FD", "SET_MEM_TABLE", "SET_VRING_ENABLE",
        "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR",
    }
    assert by_name["SET_PROTOCOL_FEATURES"][0].payload.value == int(QEMU_LIKE_PROTOCOL)
    # all accepted but INDIRECT_DESC (the real Linux 6.1 guest never acks it), bit 30 kept
    assert by_name["SET_FEATURES"][0].payload.value == BACKEND_FEATURES & ~F_INDIRECT
    assert by_name["SET_STATUS"][0].payload.value == 8
    (table,) = by_name["SET_MEM_TABLE"]
    region = table.payload.regions[0]
    assert (region.gpa, region.size, region.uaddr, region.mmap_offset) == (0, ram.size, ram.uaddr, 0)
    assert len(table.fds) == 1
    addr = by_name["SET_VRING_ADDR"][1].payload
    vq = driver.deflate_vq
    assert (addr.index, addr.flags, addr.log) == (1, 0, 0)
    assert (addr.desc, addr.avail, addr.used) == (ram.uaddr + vq.desc_gpa, ram.uaddr + vq.avail_gpa,
                                                 ram.uaddr + vq.used_gpa)
    assert [m.payload.num for m in by_name["SET_VRING_ENABLE"]] == [1] * 5
    assert [m.payload.index for m in by_name["SET_VRING_CALL"]] == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4]
    assert all(len(m.fds) == 1 for m in backend.received
               if m.request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_BACKEND_REQ_FD))
    sent = [(e.request, e.flags, e.nfds) for e in frontend.transcript if e.sent and e.channel is Channel.FRONT]
    assert sent == [(m.request, m.flags, len(m.fds)) for m in backend.received]


async def test_frontend_without_reply_ack_with_mem_slots():
    with GuestRAM(16 << 20, reserved=1 << 20) as ram:
        ours, theirs = _pair()
        backend = FakeBackend(theirs, protocol=PF.MQ | PF.BACKEND_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS)
        frontend = Frontend(ours, num_vqs=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.serve)
            await frontend.initialize()
            await BalloonDriver(ram, frontend, accept_features=F_VERSION_1).probe()
            with trio.fail_after(5):  # the last messages need no reply: wait for the 2+2+2 SET_VRING_CALLs
                while backend.names().count("SET_VRING_CALL") < 6:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        names = backend.names()
        assert names[:7] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
                             "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER"]
        assert not any(m.need_reply for m in backend.received)
        assert "GET_STATUS" not in names and "SET_MEM_TABLE" not in names
        (add,) = [m for m in backend.received if m.request == R.ADD_MEM_REG]
        assert isinstance(add.payload, SingleMemoryRegion) and len(add.fds) == 1
        enable = names.index("SET_VRING_ENABLE")
        assert names[enable : enable + 4] == ["SET_VRING_ENABLE", "GET_FEATURES"] * 2  # QEMU's barrier
        assert backend.received[names.index("SET_FEATURES")].payload.value == F_VERSION_1 | F_PROTOCOL_FEATURES
        await frontend.aclose()
        backend.close()


def _reply_bytes(request, payload, flags=0x5):
    body = payload.to_bytes()
    return struct.pack("=III", int(request), flags, len(body)) + body


@pytest.mark.parametrize(
    "raw, error, match",
    [
        ({R.GET_QUEUE_NUM: _reply_bytes(R.GET_FEATURES, U64(5))}, ProtocolViolation, "reply to request"),
        ({R.GET_QUEUE_NUM: _reply_bytes(R.GET_QUEUE_NUM, U64(5), flags=0x6)}, ProtocolViolation, "version 2"),
        ({R.GET_QUEUE_NUM: _reply_bytes(R.GET_QUEUE_NUM, U64(2))}, Exception, "maximum number of queues"),
        ({R.SET_BACKEND_REQ_FD: _reply_bytes(R.SET_BACKEND_REQ_FD, U64(1))}, BackendRejected, "replied failure"),
        ({R.GET_FEATURES: struct.pack("=III", R.GET_FEATURES, 0x5, 10) + bytes(10)}, ProtocolViolation, "expected 8"),
    ],
)
async def test_frontend_checks_every_reply(raw, error, match):
    baseline = open_fd_count()
    ours, theirs = _pair()
    backend = FakeBackend(theirs, raw_replies=raw)
    frontend = Frontend(ours)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        with pytest.raises(error, match=match):
            await frontend.initialize()
        nursery.cancel_scope.cancel()
    await frontend.aclose()
    backend.close()
    assert open_fd_count() == baseline


async def test_raw_hooks_and_transcript():
    ours, theirs = _pair()
    backend = FakeBackend(theirs)
    frontend = Frontend(ours)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        await frontend.send_raw(encode(R.GET_QUEUE_NUM))
        reply = await frontend.recv_reply()
        assert (reply.request, reply.payload.value) == (R.GET_QUEUE_NUM, 5)
        reply = await frontend.request(R.SET_OWNER, need_reply=True)
        assert reply.payload.value == 0
        assert await frontend.request(R.SET_OWNER) is None
        await backend.wait_received(3)
        nursery.cancel_scope.cancel()
    assert [(e.name, e.sent, e.flags) for e in frontend.transcript] == [
        ("GET_QUEUE_NUM", True, 0x1), ("GET_QUEUE_NUM", False, 0x5),
        ("SET_OWNER", True, 0x9), ("SET_OWNER", False, 0x5), ("SET_OWNER", True, 0x1),
    ]
    await frontend.aclose()
    backend.close()


async def test_model_guest_over_a_unix_socket(tmp_path):
    path, listener = await _listen(tmp_path)
    baseline = open_fd_count()
    backends = []
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(_serve_one, listener, backends, features=BACKEND_FEATURES | F_STATS_VQ))
        async with model_guest(path, ram_size=32 << 20, reserved=1 << 20, order="sequential") as guest:
            held = guest.ram.allocated_bytes()
            assert held >= guest.ram.size - guest.ram.reserved_bytes  # model_guest touched every guest page
            await backends[0].set_target(2000)
            assert await guest.wait_for_target(timeout=10) == 2000
            assert guest.driver.roles[2].value == "stats" and guest.frontend.config_change_msgs == 1
            holes = guest.ram.hole_bitmap()
            assert sum(holes[guest.ram.reserved_pages :]) == 2000  # exactly the ballooned pages are gone
            assert held - guest.ram.allocated_bytes() >= (2000 - 8) * PAGE  # minus first-written ring pages
            assert list(guest.driver.balloon_pfns) == list(range(guest.ram.reserved_pages,
                                                                guest.ram.reserved_pages + 2000))
        assert guest.final_vring_bases == {0: 8, 1: 0, 2: 1}
        nursery.cancel_scope.cancel()
    backends[0].close()
    listener.close()
    assert open_fd_count() == baseline - 1


async def test_poison_val_is_written_before_the_device_starts():
    with GuestRAM(16 << 20, reserved=1 << 20) as ram:
        ours, theirs = _pair()
        backend = FakeBackend(theirs, features=BACKEND_FEATURES | (1 << 4))  # PAGE_POISON
        frontend = Frontend(ours)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.serve)
            await frontend.initialize()
            await BalloonDriver(ram, frontend, poison_val=0xAAAAAAAA).probe()
            nursery.cancel_scope.cancel()
        names = backend.names()
        first_set = names.index("SET_CONFIG")
        assert names[first_set + 1] == "SET_FEATURES"  # the guest wrote it before DRIVER_OK
        config = backend.received[first_set].payload
        assert (config.offset, config.size) == (0, 16) and config.data == bytes(12) + b"\xaa" * 4
        assert backend.config[12:16] == b"\xaa" * 4
        await frontend.aclose()
        backend.close()


async def test_a_device_that_keeps_the_buffer_times_out(ram):
    device = FakeDevice(F_VERSION_1, hold_all=True)
    async with trio.open_nursery() as nursery:
        ram.touch()
        driver = BalloonDriver(ram, device, buffer_timeout=0.2)
        await nursery.start(device.serve)
        await driver.probe()
        with pytest.raises(DeviceTimeout, match=r"inflate buffer of 10 PFNs \(head 0\) not returned"):
            await driver.fill_balloon(10)
        assert device.pfns(0) == [list(driver.balloon_pfns)]  # the device did get it
        nursery.cancel_scope.cancel()
    device.close()


async def test_model_guest_lets_the_body_error_through_and_closes_everything(tmp_path):
    path, listener = await _listen(tmp_path)
    baseline = open_fd_count()
    backends = []
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_one, listener, backends)
        with pytest.raises(KeyError, match="from the body"):
            async with model_guest(path, ram_size=16 << 20, reserved=1 << 20, touch=False):
                raise KeyError("from the body")
        await backends[0].wait_received(len(QEMU_START + QEMU_PROBE))
        assert "GET_VRING_BASE" not in backends[0].names()  # no clean stop after an error
        nursery.cancel_scope.cancel()
    backends[0].close()
    assert open_fd_count() == baseline
    listener.close()


# -- the kit's own vhost-user messages (wire.py), against the spec's layouts ------------------

from vhostballoon.testing import wire  # noqa: E402


def test_wire_encodes_the_layouts_of_vhost_user_rst():
    addr = wire.VringAddr(index=1, flags=0, desc=0x7F00_0000_1000, used=0x7F00_0000_1940, avail=0x7F00_0000_1800, log=0)
    assert wire.encode(wire.Request.SET_VRING_ADDR, addr) == struct.pack(
        "=IIIIIQQQQ", 9, 0x1, 40, 1, 0, 0x7F00_0000_1000, 0x7F00_0000_1940, 0x7F00_0000_1800, 0
    )
    region = wire.MemoryRegion(gpa=0, size=1 << 30, uaddr=0x7F00_0000_0000, mmap_offset=0)
    assert wire.encode(wire.Request.ADD_MEM_REG, wire.SingleMemoryRegion(region), need_reply=True) == struct.pack(
        "=IIIQQQQQ", 37, 0x9, 40, 0, 0, 1 << 30, 0x7F00_0000_0000, 0
    )
    assert wire.encode(wire.Request.SET_MEM_TABLE, wire.MemoryTable([region])) == struct.pack(
        "=IIIIIQQQQ", 5, 0x1, 40, 1, 0, 0, 1 << 30, 0x7F00_0000_0000, 0
    )
    assert wire.encode(wire.Request.SET_VRING_CALL, wire.VringFd(3, invalid=True)) == struct.pack("=IIIQ", 13, 1, 8, 0x103)
    config = wire.ConfigSpace(offset=0, size=16, flags=0, data=bytes(range(16)))
    assert wire.encode(wire.Request.SET_CONFIG, config) == struct.pack("=IIIIII", 25, 1, 28, 0, 16, 0) + bytes(range(16))
    assert wire.encode(wire.BackendRequest.CONFIG_CHANGE_MSG, wire.U64(0), reply=True) == struct.pack("=IIIQ", 2, 5, 8, 0)


REPLIES = (
    struct.pack("=IIIQ", 1, 0x5, 8, 1 << 32)  # GET_FEATURES
    + struct.pack("=IIIIII", 24, 0x5, 28, 0, 16, 0) + bytes(range(16))  # GET_CONFIG
    + struct.pack("=IIIII", 11, 0x5, 8, 2, 517)  # GET_VRING_BASE
    + struct.pack("=III", 24, 0x5, 0)  # GET_CONFIG failed: empty
)


@pytest.mark.parametrize("step", [len(REPLIES), 1, 5], ids=["whole", "byte-by-byte", "five-bytes"])
def test_wire_reads_replies_however_they_are_cut(step):
    reader = wire.MessageReader.for_replies()
    messages = []
    for at in range(0, len(REPLIES), step):
        reader.feed(REPLIES[at : at + step])
        while (message := reader.next_message()) is not None:
            messages.append(message)
    assert [(m.name, m.flags, m.size, m.payload) for m in messages] == [
        ("GET_FEATURES", 0x5, 8, wire.U64(1 << 32)),
        ("GET_CONFIG", 0x5, 28, wire.ConfigSpace(0, 16, 0, bytes(range(16)))),
        ("GET_VRING_BASE", 0x5, 8, wire.VringState(2, 517)),
        ("GET_CONFIG", 0x5, 0, wire.Empty()),
    ]


def test_wire_gives_fds_to_the_message_they_came_with_and_closes_them_on_error():
    baseline = open_fd_count()
    reader = wire.MessageReader.for_backend_requests()
    change = struct.pack("=III", 2, 0x9, 0)  # CONFIG_CHANGE_MSG, NEED_REPLY
    notifier = struct.pack("=III", 3, 0x1, 24) + bytes(24)  # VRING_HOST_NOTIFIER_MSG: vring area, one fd
    r, w = os.pipe()
    reader.feed(change + notifier[:7])
    reader.feed(notifier[7:], [r])  # the chunk ends in the notifier: its fd
    first, second = reader.next_message(), reader.next_message()
    assert (first.name, first.need_reply, first.fds) == ("CONFIG_CHANGE_MSG", True, ())
    assert (second.name, second.fds) == ("VRING_HOST_NOTIFIER_MSG", (r,))
    os.close(r)
    reader.feed(change, [w])  # CONFIG_CHANGE_MSG takes no fd
    with pytest.raises(wire.WireError, match="back-end CONFIG_CHANGE_MSG: carries 1 fd, takes none"):
        reader.next_message()
    with pytest.raises(wire.WireError):  # poisoned
        reader.next_message()
    assert open_fd_count() == baseline  # w was closed with the bad message


@pytest.mark.parametrize(
    "data, match",
    [
        (struct.pack("=IIIQ", 1, 0x1, 8, 0), r"reply to GET_FEATURES: flags 0x1 \(version 1\), expected 0x5"),
        (struct.pack("=IIIQ", 1, 0xD, 8, 0), r"reply to GET_FEATURES: flags 0xd"),
        (struct.pack("=III", 5, 0x5, 4) + bytes(4), "reply to SET_MEM_TABLE: body is 4 bytes, expected 8"),
        (struct.pack("=IIIIII", 24, 0x5, 29, 0, 16, 0) + bytes(17), "reply to GET_CONFIG: body is 29 bytes, expected 28"),
        (struct.pack("=III", 1, 0x5, 1 << 20), "reply to GET_FEATURES: body is 1048576 bytes"),
    ],
)
def test_wire_refuses_replies_qemu_refuses(data, match):
    reader = wire.MessageReader.for_replies()
    reader.feed(data)
    with pytest.raises(wire.WireError, match=match):
        reader.next_message()
