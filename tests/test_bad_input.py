"""Bad input from the front-end and from the guest, against the real back-end.

Every case checks four things: the log names the offending values; a
protocol error closes the connection (the front-end reads EOF); the
process's open fds are the same once the session is over (every fd that came
with a bad message was closed); and the back-end then serves a fresh front-end
whose guest balloons normally.

Ring faults from the guest (loops, heads out of range, ...) do not close the
connection: the queue is reported broken and does nothing more, no guest page
outside those the guest handed over is freed (checked with the canary of
every guest-owned page and the memfd's holes), and GET_CONFIG still answers.
"""

from __future__ import annotations

import os
import struct
from contextlib import asynccontextmanager

import pytest
import trio

from backend_support import MiB, PAGE, fd_count, log_text, wait_no_session, wait_pending_freed, wait_until
from vhostballoon.testing import RANGE_FEATURES, Frontend, FrontendError, GuestRAM, model_guest
from vhostballoon.vhost_user.codec import (
    MemoryRegion,
    MemoryTable,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringFd,
    VringState,
    encode,
)
from vhostballoon.vhost_user.constants import VERSION, Request

GUEST = 64 * MiB  # small guests: these tests are about correctness, not volume
NUM_QUEUES = 7  # vhostballoon.device.queues.device_queue_count(DEFAULT_FEATURES): the range queues are offered


def header(request: int, flags: int, size: int) -> bytes:
    return struct.pack("=III", request, flags, size)  # vhost-user header: native order


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def error_entries(logs: list[dict]) -> str:
    return log_text([e for e in logs if e.get("log_level") == "error"])


async def read_until_closed(frontend: Frontend, timeout: float = 5.0) -> list[tuple[str, int | None]]:
    """Every reply the back-end still sends, until it closes the connection.
    Returns (request name, u64 value) of each reply."""
    replies = []
    with trio.fail_after(timeout):
        while True:
            try:
                message = await frontend.recv_reply()
            except ConnectionResetError:  # it closed with our bytes unread: a close all the same
                return replies
            except FrontendError as exc:
                assert "closed the connection" in str(exc), exc
                return replies
            replies.append((message.name, getattr(message.payload, "value", None)))


async def balloon_a_little(socket_path: str, service) -> None:
    """A fresh front-end and guest are served: 4 MiB ballooned and freed, and back."""
    async with model_guest(socket_path, ram_size=GUEST) as guest:
        before = guest.ram.allocated_bytes()
        service.set_target(GUEST - 4 * MiB)
        await guest.wait_for_target(4 * MiB // PAGE)
        assert before - guest.ram.allocated_bytes() >= 4 * MiB - PAGE
        assert guest.ram.check_canary(guest.driver.guest_owned_pfns()) == []
        service.set_target(GUEST)
        await guest.wait_for_target(0)
        assert guest.ram.check_canary() == []


@asynccontextmanager
async def then_next_frontend_is_served(backend, logs: list[dict]):
    """After the body: the session is over (handled, not crashed), no fd
    leaked, and a new guest is served."""
    fds_before = fd_count()
    served = backend.service.sessions_served
    yield
    await wait_no_session(backend.service)
    assert backend.service.sessions_served == served + 1
    assert fd_count() == fds_before, "fds leaked by the session that got bad input"
    assert "session failed" not in log_text(logs)  # the daemon's catch-all for session bugs
    await balloon_a_little(backend.socket_path, backend.service)


# -- protocol errors: the connection is closed ------------------------------------------------


async def initialized(frontend: Frontend, ram: GuestRAM) -> None:
    await frontend.initialize()


async def with_memory(frontend: Frontend, ram: GuestRAM) -> None:
    """Initialized, and all of ``ram`` added as the one region (ADD_MEM_REG, acked 0)."""
    await frontend.initialize()
    await frontend.set_memory(ram)


async def with_ring_size(frontend: Frontend, ram: GuestRAM) -> None:
    await with_memory(frontend, ram)
    await frontend.request(Request.SET_VRING_NUM, VringState(index=0, num=128))


async def fresh(frontend: Frontend, ram: GuestRAM) -> None:
    pass


RAM = 16 * MiB
UADDR = 0x7F00_0000_0000  # GuestRAM's default uaddr


def region(gpa: int, size: int, *, mmap_offset: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa=gpa, size=size, uaddr=UADDR + gpa, mmap_offset=mmap_offset)


# setup (what the front-end does first), the bad message, the fds sent with it
# ("ram": the RAM memfd, "eventfd": a fresh one), what the error log must say,
# and the (request, u64) replies the back-end sends before it closes.
PROTOCOL_CASES = [
    pytest.param(
        initialized, header(Request.SET_FEATURES, VERSION, 4) + b"\0" * 4, (),
        ["SET_FEATURES: body is 4 bytes, expected 8"], [], id="wrong-body-size",
    ),
    pytest.param(
        fresh, header(Request.GET_CONFIG, VERSION, 12 + 16 + 1) + struct.pack("<III", 0, 16, 0) + bytes(17), (),
        ["GET_CONFIG: body is 29 bytes, expected 28"], [], id="wrong-config-body-size",
    ),
    pytest.param(
        fresh, header(Request.GET_FEATURES, 0x2, 0), (), ["version 2 in flags 0x2 (expected 1)"], [],
        id="unknown-version",
    ),
    pytest.param(
        fresh, header(Request.GET_FEATURES, VERSION | 0x40, 0), (), ["unknown flag bits 0x40"], [],
        id="unknown-flags",
    ),
    pytest.param(fresh, header(999, VERSION, 0), (), ["unknown request 999"], [], id="unknown-request"),
    pytest.param(
        fresh, encode(Request.GET_FEATURES), ("eventfd",), ["GET_FEATURES carries 1 fd, takes none"], [],
        id="fd-on-request-taking-none",
    ),
    pytest.param(
        fresh, encode(Request.GET_FEATURES), ("eventfd",) * 9,
        ["more fds than a vhost-user message may carry (8)"], [], id="more-than-8-fds",
    ),
    pytest.param(
        initialized, encode(Request.SET_VRING_CALL, VringFd(index=0)), ("eventfd", "eventfd"),
        ["SET_VRING_CALL carries 2 fds, takes exactly 1"], [], id="two-fds-for-one",
    ),
    pytest.param(
        initialized, encode(Request.SET_VRING_KICK, VringFd(index=0)), (),
        ["SET_VRING_KICK carries 0 fds, takes exactly 1"], [], id="missing-kick-fd",
    ),
    pytest.param(
        initialized, encode(Request.SET_MEM_TABLE, MemoryTable(regions=[region(0, RAM)])), (),
        ["SET_MEM_TABLE: 1 region but 0 fds"], [], id="missing-memory-fd",
    ),
    pytest.param(
        initialized, encode(Request.SET_VRING_NUM, VringState(index=7, num=128)), (),
        ["SET_VRING_NUM: queue 7 out of range (device has 7 queues)"], [], id="queue-index-out-of-range",
    ),
    pytest.param(
        initialized, encode(Request.SET_VRING_CALL, VringFd(index=9)), ("eventfd",),
        ["SET_VRING_CALL: queue 9 out of range (device has 7 queues)"], [], id="queue-index-with-fd",
    ),
    pytest.param(
        initialized, encode(Request.SET_VRING_NUM, VringState(index=0, num=100)), (),
        ["SET_VRING_NUM: queue 0 size 100 is not a power of 2"], [], id="vring-size-not-power-of-two",
    ),
    pytest.param(
        initialized, encode(Request.SET_VRING_NUM, VringState(index=1, num=65536)), (),
        ["SET_VRING_NUM: queue 1 size 65536 (must be 1..32768)"], [], id="vring-size-too-large",
    ),
    pytest.param(
        with_ring_size,
        encode(
            Request.SET_VRING_ADDR,
            VringAddr(index=0, flags=0, desc=UADDR + RAM, used=UADDR + 0x2000, avail=UADDR + 0x1000, log=0),
            need_reply=True,
        ),
        (), ["descriptor ring at uaddr 0x7f0001000000 size 0x800", "outside guest memory"], [("SET_VRING_ADDR", 1)],
        id="ring-outside-guest-memory",
    ),
    pytest.param(
        with_ring_size,
        encode(
            Request.SET_VRING_ADDR,
            VringAddr(index=0, flags=0, desc=UADDR, used=UADDR + RAM - 64, avail=UADDR + 0x1000, log=0),
            need_reply=True,
        ),
        (), ["used ring at uaddr 0x7f0000ffffc0", "outside guest memory"], [("SET_VRING_ADDR", 1)],
        id="used-ring-across-the-end",
    ),
    pytest.param(
        initialized,
        encode(Request.SET_MEM_TABLE, MemoryTable(regions=[region(0, 2 * MiB), region(1 * MiB, 2 * MiB)])),
        ("ram", "ram"), ["SET_MEM_TABLE: region 0 (gpa 0x0 size 0x200000) overlaps region 1 (gpa 0x100000)"], [],
        id="regions-overlap",
    ),
    pytest.param(
        with_memory,
        encode(Request.ADD_MEM_REG, SingleMemoryRegion(region(2 * MiB, 2 * MiB)), need_reply=True),
        ("ram",), ["region gpa 0x200000 size 0x200000 overlaps region 0 (gpa 0x0 size 0x1000000)"],
        [("ADD_MEM_REG", 1)], id="added-region-overlaps",
    ),
    pytest.param(
        initialized,
        encode(
            Request.ADD_MEM_REG,
            SingleMemoryRegion(region(1 << 32, 2 * PAGE, mmap_offset=(1 << 64) - PAGE)),
            need_reply=True,
        ),
        ("ram",), ["mmap_offset 0xfffffffffffff000 + size 0x2000 passes the end of the 64-bit space"], [],
        id="region-offset-overflows",
    ),
    pytest.param(
        initialized,
        encode(Request.ADD_MEM_REG, SingleMemoryRegion(region(0, 2 * RAM)), need_reply=True),
        ("ram",), ["size 0x2000000", "extends past the end of fd", "file size 0x1000000"], [("ADD_MEM_REG", 1)],
        id="region-larger-than-memfd",
    ),
    pytest.param(
        initialized,
        encode(Request.SET_FEATURES, U64(1 << 45)), (), ["SET_FEATURES: bits 0x200000000000 (bit 45) were not offered"],
        [], id="features-not-offered",
    ),
]


@pytest.mark.parametrize("setup, message, attach, fragments, replies", PROTOCOL_CASES)
async def test_protocol_error_closes_the_connection(backend, logs, setup, message, attach, fragments, replies):
    async with then_next_frontend_is_served(backend, logs):
        with GuestRAM(RAM, reserved=1 * MiB) as ram:
            async with await Frontend.connect(backend.socket_path) as frontend:
                await setup(frontend, ram)
                fds = [ram.fd if kind == "ram" else eventfd() for kind in attach]
                try:
                    await frontend.send_raw(message, fds)
                finally:
                    for kind, fd in zip(attach, fds):
                        if kind == "eventfd":
                            os.close(fd)
                assert await read_until_closed(frontend) == replies
    errors = error_entries(logs)
    for fragment in fragments:
        assert fragment in errors
    assert "closing the connection" in errors


# -- ring faults from the guest: the queue breaks, nothing else happens ------------------------

DESC = struct.Struct("<QIHH")  # virtio 1.2, 2.7.5: addr, len, flags, next


DECOY_PFNS = 64


def decoy_buffer(guest, count: int = DECOY_PFNS) -> tuple[int, list[int]]:
    """A PFN list of guest-owned pages in the reserved area: what a walker that
    skipped a guard would find and free. Returns (gpa, pfns)."""
    pfns = list(guest.driver.guest_owned_pfns()[:count])  # pages the driver gives away last
    gpa = guest.ram.alloc_reserved(4 * count)
    guest.ram.write(gpa, struct.pack(f"<{count}I", *pfns))
    return gpa, pfns


def break_loop(guest, length: int) -> str:
    vq = guest.driver.queue("inflate")
    head = vq.publish_looping_chain(length)
    # Point every descriptor of the loop at guest-owned pages.
    gpa, _ = decoy_buffer(guest)
    i = head
    for _ in range(length):
        _, _, flags, nxt = DESC.unpack_from(guest.ram.mem, vq.desc_gpa + DESC.size * i)
        DESC.pack_into(guest.ram.mem, vq.desc_gpa + DESC.size * i, gpa, 4 * DECOY_PFNS, flags, nxt)
        i = nxt
    guest.driver.kick("inflate")
    return f"head {head}: chain has more than {vq.num} descriptors"


def break_head(guest) -> str:
    vq = guest.driver.queue("inflate")
    vq.publish_head(vq.num)
    guest.driver.kick("inflate")
    return f"head {vq.num} out of range (ring size {vq.num})"


def break_avail_idx(guest) -> str:
    vq = guest.driver.queue("inflate")
    gpa, _ = decoy_buffer(guest)
    for i in range(vq.num):  # whatever slot the back-end reads, it finds guest-owned pages
        DESC.pack_into(guest.ram.mem, vq.desc_gpa + DESC.size * i, gpa, 4 * DECOY_PFNS, 0, 0)
    old = vq.avail_idx
    vq.set_avail_idx(old + vq.num + 1)
    guest.driver.kick("inflate")
    return f"avail idx {(old + vq.num + 1) & 0xFFFF} is {vq.num + 1} ahead of last_avail_idx {old}"


async def break_length(guest) -> str:
    await guest.driver.send_raw_buffer("inflate", b"\x01\x02\x03", wait=False)
    return "len 3 is not a multiple of 4 (le32 PFNs)"


def break_address(guest) -> str:
    vq = guest.driver.queue("inflate")
    bad = guest.ram.size + 16 * PAGE
    head = vq.publish_descriptor(bad, 64)
    guest.driver.kick("inflate")
    return f"head {head}: descriptor {head}: addr {bad:#x} len 64 outside guest memory"


RING_FAULTS = [
    pytest.param(lambda g: break_loop(g, 2), id="descriptor-loop"),
    # A loop through all but one descriptor (one stays free for the buffer sent after).
    pytest.param(lambda g: break_loop(g, g.driver.queue("inflate").num - 1), id="chain-longer-than-ring"),
    pytest.param(break_head, id="head-out-of-range"),
    pytest.param(break_avail_idx, id="avail-idx-jumps-past-ring-size"),
    pytest.param(break_length, id="length-not-multiple-of-4"),
    pytest.param(break_address, id="buffer-outside-guest-memory"),
]


@pytest.mark.parametrize("fault", RING_FAULTS)
async def test_ring_fault_breaks_the_queue_and_frees_nothing_else(backend, logs, fault):
    service = backend.service
    async with then_next_frontend_is_served(backend, logs):
        async with model_guest(backend.socket_path, ram_size=GUEST) as guest:
            ram, driver = guest.ram, guest.driver
            # The queue worked before the fault: 2 MiB are in the balloon.
            service.set_target(GUEST - 2 * MiB)
            await guest.wait_for_target(2 * MiB // PAGE)
            allocated = ram.allocated_bytes()

            fragment = fault(guest)
            if not isinstance(fragment, str):
                fragment = await fragment
            broken = await wait_until(lambda: service.query().get("broken-queues"), what="the queue to be reported broken")
            assert list(broken) == [0]
            assert fragment in broken[0]
            assert fragment in error_entries(logs)
            assert "malformed ring from the guest" in error_entries(logs)

            # Nothing the guest kept was freed: every guest-owned page holds its
            # canary, and the memfd's holes are the balloon's pages, no more.
            assert ram.check_canary(driver.guest_owned_pfns()) == []
            assert ram.host_holes() == set(driver.balloon_pfns)
            assert ram.allocated_bytes() >= allocated
            assert service.query()["ballooned-bytes"] == 2 * MiB

            # A broken queue stays broken: a good buffer later is not even read.
            await driver.send_pfns("inflate", driver.guest_owned_pfns()[:16], wait=False)
            await trio.sleep(0.1)
            assert ram.host_holes() == set(driver.balloon_pfns)

            # The rest of the session still answers.
            config = await guest.frontend.get_config()
            assert struct.unpack_from("<I", config, 0)[0] == 2 * MiB // PAGE
            assert service.query()["connected"] is True


# -- odd PFNs: ignored or counted, never double counted, nothing breaks -------------------------


async def test_pfns_outside_guest_memory_are_ignored_and_counted(backend, logs):
    service = backend.service
    async with then_next_frontend_is_served(backend, logs):
        async with model_guest(backend.socket_path, ram_size=GUEST) as guest:
            ram, driver = guest.ram, guest.driver
            good = list(driver.guest_owned_pfns()[:2])
            outside = [ram.num_pages, ram.num_pages + 12345, 0xFFFFFFFF]
            written = await driver.send_pfns("inflate", [outside[0], good[0], outside[1], good[1], outside[2]])
            assert written == 0  # returned, not written to
            info = service.query()
            assert info["invalid-pfns"] == 3
            assert info["ballooned-bytes"] == 2 * PAGE
            assert info["broken-queues"] == {}
            await wait_pending_freed(service)
            assert ram.host_holes() == set(good)  # the two good ones freed, nothing else
            assert ram.check_canary(sorted(set(driver.guest_owned_pfns()) - set(good))) == []
            warnings = log_text([e for e in logs if e.get("log_level") == "warning"])
            assert "pfns outside guest memory ignored" in warnings
            assert f"first_pfn={ram.num_pages:#x}" in warnings and "count=3" in warnings
            await balloon_in_same_session(service, guest, extra_ballooned=2 * PAGE)


async def test_duplicate_pfns_and_pfns_inflated_twice_are_not_double_counted(backend, logs):
    service = backend.service
    async with then_next_frontend_is_served(backend, logs):
        async with model_guest(backend.socket_path, ram_size=GUEST) as guest:
            ram, driver = guest.ram, guest.driver
            p, q = driver.guest_owned_pfns()[:2]
            await driver.send_pfns("inflate", [p, p, q])
            await driver.send_pfns("inflate", [p])
            info = service.query()
            assert info["ballooned-bytes"] == 2 * PAGE
            assert info["pages-inflated"] == 2
            assert info["repeated-pfns"] == 2
            assert info["invalid-pfns"] == 0
            await wait_pending_freed(service)
            assert ram.host_holes() == {p, q}
            text = log_text(logs)
            # One line per look at the C thread's counters: the two batches
            # may be reported in one line or two, the counts add up to 2.
            repeated = [e for e in logs if e["event"] == "pfns already in that state"]
            assert repeated and sum(e["count"] for e in repeated) == 2, repeated
            assert repeated[0]["first_pfn"] == hex(p)
            await balloon_in_same_session(service, guest, extra_ballooned=2 * PAGE)


async def test_deflating_a_pfn_never_inflated_is_counted_and_harmless(backend, logs):
    service = backend.service
    async with then_next_frontend_is_served(backend, logs):
        async with model_guest(backend.socket_path, ram_size=GUEST) as guest:
            ram, driver = guest.ram, guest.driver
            r = driver.guest_owned_pfns()[0]
            written = await driver.send_pfns("deflate", [r])
            assert written == 0
            info = service.query()
            assert info["repeated-pfns"] == 1
            assert info["pages-deflated"] == 0
            assert info["ballooned-bytes"] == 0
            assert info["broken-queues"] == {}
            assert ram.host_holes() == set()
            assert ram.check_canary([r]) == []
            text = log_text(logs)
            assert "pfns deflated that were not ballooned" in text and f"first_pfn={r:#x}" in text
            await balloon_in_same_session(service, guest, extra_ballooned=0)


async def balloon_in_same_session(service, guest, *, extra_ballooned: int) -> None:
    """The session goes on normally: 1 MiB ballooned, freed, counted exactly."""
    ram, driver = guest.ram, guest.driver
    extra_holes = ram.host_holes()
    service.set_target(GUEST - 1 * MiB)
    await guest.wait_for_target(1 * MiB // PAGE)
    assert service.query()["ballooned-bytes"] == 1 * MiB + extra_ballooned
    assert ram.host_holes() == set(driver.balloon_pfns) | extra_holes
    assert ram.check_canary(sorted(set(driver.guest_owned_pfns()) - extra_holes)) == []


# -- range queues (protocol/range-balloon.md): every bad range refused, named, never freed ---------

BLOCK_BYTES = 2 * MiB


def bad_ranges(case: str, ram, good: int) -> tuple[list[tuple[int, int]], str, int]:
    """(the buffer's ranges, the reason the log names, how many are refused)
    for one kind of bad range; ``good`` is the gpa of a free 2 MiB block."""
    end = ram.num_pages * PAGE
    return {
        "unaligned-address": ([(good + 512, PAGE)], "not 4 KiB aligned", 1),
        "unaligned-length": ([(good, PAGE + 1)], "not 4 KiB aligned", 1),
        "empty": ([(good, 0)], "empty", 1),
        "past-guest-memory": ([(end, PAGE), (end - PAGE, 2 * PAGE)], "not inside one region of guest memory", 2),
        "wrapping": ([(2**64 - PAGE, 2 * PAGE)], "wraps around", 1),
        "overlapping": ([(good, 4 * PAGE), (good + 2 * PAGE, 4 * PAGE)], "overlaps another range of the buffer", 1),
    }[case]


@pytest.mark.parametrize(
    "case", ["unaligned-address", "unaligned-length", "empty", "past-guest-memory", "wrapping", "overlapping"]
)
async def test_bad_inflate_ranges_are_refused_named_and_never_freed(backend, logs, case):
    service = backend.service
    async with then_next_frontend_is_served(backend, logs):
        async with model_guest(backend.socket_path, ram_size=GUEST, features=RANGE_FEATURES, num_vqs=7) as guest:
            ram, driver = guest.ram, guest.driver
            good = driver.free_blocks(512)[0][0] * PAGE
            ranges, reason, refused = bad_ranges(case, ram, good)
            holes = ram.host_holes()
            written = await driver.send_ranges("range-inflate", ranges)
            assert written == 0  # the buffer always comes back, used len 0
            info = service.query()
            assert info["ranges-refused"] == refused
            assert info["broken-queues"] == {}
            await wait_pending_freed(service)
            # Only a valid range of the buffer (the first of "overlapping") is ballooned and freed.
            valid = {r for r in ranges if r[0] == good and r[1] == 4 * PAGE} if case == "overlapping" else set()
            expected = set().union(*(set(range(a // PAGE, (a + n) // PAGE)) for a, n in valid))
            assert info["ballooned-bytes"] == len(expected) * PAGE
            assert ram.host_holes() == holes | expected
            assert ram.check_canary(sorted(set(driver.guest_owned_pfns()) - expected)) == []
            warnings = log_text([e for e in logs if e.get("log_level") == "warning"])
            assert "ranges refused" in warnings and (f"reason='{reason}'" in warnings or f"reason={reason}" in warnings)
            bad = next(r for r in ranges if (r[0], r[1]) not in valid)
            assert f"addr={bad[0]:#x}" in warnings and f"len={bad[1]}" in warnings
            await balloon_in_same_session(service, guest, extra_ballooned=len(expected) * PAGE)


async def test_a_range_already_in_the_balloon_is_refused_whole(backend, logs):
    service = backend.service
    async with then_next_frontend_is_served(backend, logs):
        async with model_guest(backend.socket_path, ram_size=GUEST, features=RANGE_FEATURES, num_vqs=7) as guest:
            ram, driver = guest.ram, guest.driver
            first = driver.free_blocks(512)[0][0]
            await driver.send_pfns("inflate", [first + 5])  # one page of the block, given by PFN
            await wait_pending_freed(service)
            written = await driver.send_ranges("range-inflate", [(first * PAGE, BLOCK_BYTES)])
            assert written == 0
            info = service.query()
            assert info["ranges-refused"] == 1 and info["ballooned-bytes"] == PAGE
            await wait_pending_freed(service)
            assert ram.host_holes() == {first + 5}  # nothing of the refused range freed
            assert ram.check_canary(sorted(set(driver.guest_owned_pfns()) - {first + 5})) == []
            assert "already in the balloon" in log_text(logs)
            await balloon_in_same_session(service, guest, extra_ballooned=PAGE)


async def test_a_range_deflate_of_pages_never_given_frees_nothing(backend, logs):
    service = backend.service
    async with then_next_frontend_is_served(backend, logs):
        async with model_guest(backend.socket_path, ram_size=GUEST, features=RANGE_FEATURES, num_vqs=7) as guest:
            ram, driver = guest.ram, guest.driver
            first = driver.free_blocks(512)[0][0]
            holes = ram.host_holes()
            assert await driver.send_ranges("range-deflate", [(first * PAGE, BLOCK_BYTES)]) == 0
            info = service.query()
            assert info["ballooned-bytes"] == 0 and info["pages-deflated"] == 0 and info["repeated-pfns"] == 512
            await wait_pending_freed(service)
            assert ram.host_holes() == holes
            assert ram.check_canary(sorted(driver.guest_owned_pfns())) == []
            await balloon_in_same_session(service, guest, extra_ballooned=0)
