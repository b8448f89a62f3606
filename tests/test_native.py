"""Tests of the native core through vhostballoon.native, on real memfds.

A memfd plays guest RAM.  The test maps it itself and writes split rings
into it the way a driver would (DriverRing below); the backend maps the same
memfd through GuestMemory and must read what the driver wrote.  Freeing is
measured by the kernel's own numbers: st_blocks of the memfd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import random
import re
import struct
from array import array
from pathlib import Path

import pytest

from vhostballoon.native import (
    PAGE_SIZE,
    DiscardStats,
    GuestMemory,
    MemoryTableError,
    PfnArray,
    RangeList,
    RingError,
    Virtqueue,
)

REPO_CSRC = Path(__file__).resolve().parent.parent / "csrc"
MiB = 1 << 20
GUEST_SIZE = 64 * MiB
UADDR = 0x7F0000000000  # the front-end's (fake) address of guest RAM

# Descriptor and avail flags, virtio 1.x 2.7.5 / 2.7.6.
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1

# linux/include/uapi/linux/fcntl.h; Python 3.11's fcntl lacks it.
F_SEAL_FUTURE_WRITE = 0x0010


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _pop(vq: Virtqueue, mem: GuestMemory) -> tuple[list[int], PfnArray]:
    """vq.pop_pfn32, its ranges as the PFNs they cover (in order)."""
    got = vq.pop_pfn32(mem)
    return got.heads, PfnArray.from_list(got.ranges.pfns())


def _discard_pfns(mem: GuestMemory, pfns: PfnArray):
    """Free the pages of a PFN list the way the core frees what it hands
    out: as ranges, sorted and merged (each inside one region)."""
    ranges = mem.merge(RangeList.from_pfns(pfns, mem))
    return mem.discard_ranges(ranges), ranges


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def new_memfd(size: int, name: str = "guest", flags: int = 0) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | flags)
    os.ftruncate(fd, size)
    return fd


class Guest:
    """A memfd "guest" with the driver's own view of its RAM."""

    def __init__(self, size: int = GUEST_SIZE) -> None:
        self.size = size
        self.fd = new_memfd(size)
        self.view = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Keep the test's own view on 4 KiB pages even where shmem THP is on,
        # so page-exact st_blocks numbers hold.
        self.view.madvise(mmap.MADV_NOHUGEPAGE)
        self.mem = GuestMemory()
        self.mem.add_region(os.dup(self.fd), 0, size, UADDR, 0)
        self.next_data = 16 * MiB  # bump allocator for buffers and tables

    def alloc(self, nbytes: int, align: int = 16) -> int:
        gpa = (self.next_data + align - 1) & ~(align - 1)
        self.next_data = gpa + nbytes
        assert self.next_data <= self.size
        return gpa

    def close(self) -> None:
        self.mem.close()
        self.view.close()
        os.close(self.fd)


class DriverRing:
    """The driver side of a split virtqueue laid out in Guest RAM."""

    def __init__(self, guest: Guest, num: int, base_gpa: int = 0x10000) -> None:
        self.g = guest
        self.num = num
        self.desc = base_gpa
        self.avail = self.desc + 16 * num
        self.used = (self.avail + 6 + 2 * num + 4095) & ~4095
        self.avail_idx = 0
        self.next_free = 0  # descriptors are handed out in order, wrapping

    # -- layout --------------------------------------------------------------
    def setup(self, vq: Virtqueue, base: int = 0, event_idx: bool = False, indirect: bool = True) -> None:
        self.avail_idx = base
        self.set_avail_idx(base)
        vq.setup(self.g.mem, self.num, UADDR + self.desc, UADDR + self.avail, UADDR + self.used,
                 base, event_idx, indirect)

    def write_desc(self, table_gpa: int, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.g.view, table_gpa + 16 * i, addr, length, flags, nxt)

    def set_avail_idx(self, idx: int) -> None:
        struct.pack_into("<H", self.g.view, self.avail + 2, idx & 0xFFFF)

    def set_avail_flags(self, flags: int) -> None:
        struct.pack_into("<H", self.g.view, self.avail, flags)

    def set_used_event(self, value: int) -> None:
        struct.pack_into("<H", self.g.view, self.avail + 4 + 2 * self.num, value & 0xFFFF)

    def avail_event(self) -> int:
        return struct.unpack_from("<H", self.g.view, self.used + 4 + 8 * self.num)[0]

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.g.view, self.used + 2)[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.g.view, self.used + 4 + 8 * (slot % self.num))

    # -- buffers -------------------------------------------------------------
    def put_pfns(self, pfns) -> int:
        gpa = self.g.alloc(4 * len(pfns), 4)
        struct.pack_into(f"<{len(pfns)}I", self.g.view, gpa, *pfns)
        return gpa

    def take_desc(self) -> int:
        i = self.next_free
        self.next_free = (self.next_free + 1) % self.num
        return i

    def publish(self, head: int, publish_idx: bool = True) -> None:
        struct.pack_into("<H", self.g.view, self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish_idx:
            self.set_avail_idx(self.avail_idx)

    def add_buffer(self, pfns, pieces: int = 1, indirect: bool = False) -> int:
        """One inflate-style buffer: pfns split over `pieces` descriptors."""
        chunks = [list(c) for c in _split(pfns, pieces)]
        if indirect:
            table = self.g.alloc(16 * len(chunks))
            for k, chunk in enumerate(chunks):
                last = k == len(chunks) - 1
                self.write_desc(table, k, self.put_pfns(chunk), 4 * len(chunk),
                                0 if last else F_NEXT, 0 if last else k + 1)
            head = self.take_desc()
            self.write_desc(self.desc, head, table, 16 * len(chunks), F_INDIRECT)
        else:
            ids = [self.take_desc() for _ in chunks]
            for k, chunk in enumerate(chunks):
                last = k == len(chunks) - 1
                self.write_desc(self.desc, ids[k], self.put_pfns(chunk), 4 * len(chunk),
                                0 if last else F_NEXT, 0 if last else ids[k + 1])
            head = ids[0]
        self.publish(head)
        return head


def _split(seq, pieces):
    n = len(seq)
    bounds = [n * k // pieces for k in range(pieces + 1)]
    return [seq[bounds[k]:bounds[k + 1]] for k in range(pieces)]


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def memfd_1g():
    fd = new_memfd(1 << 30)
    yield fd
    os.close(fd)


# ---- memory table ----------------------------------------------------------


def test_region_info_and_translate(guest):
    mem = guest.mem
    [r] = mem.regions
    assert (r.index, r.gpa, r.size, r.uaddr, r.mmap_offset) == (0, 0, GUEST_SIZE, UADDR, 0)
    assert r.discard_method == "untried" and r.discard_errno == 0 and r.ballooned_pages == 0
    assert mem.total_bytes == GUEST_SIZE

    host = mem.translate(0x1234, 8)
    guest.view[0x1234:0x123C] = b"driver!!"
    assert ctypes.string_at(host, 8) == b"driver!!"  # same memory, seen through our mapping
    assert mem.translate(GUEST_SIZE - 8, 8) == mem.translate(0, 1) + GUEST_SIZE - 8
    assert mem.translate(GUEST_SIZE - 8, 9) is None  # straddles the region end
    assert mem.translate(GUEST_SIZE, 1) is None
    assert mem.translate(0, GUEST_SIZE + 1) is None
    assert mem.translate((1 << 64) - 1, 1) is None


@pytest.mark.parametrize(
    "gpa, size, uaddr, off, message",
    [
        (0, 0, 0, 0, "region gpa 0x0 has size 0"),
        (0x800, 0x1000, 0, 0, "gpa 0x800 size 0x1000 mmap_offset 0x0 is not 4 KiB aligned"),
        (0, 0x1800, 0, 0, "gpa 0x0 size 0x1800 mmap_offset 0x0 is not 4 KiB aligned"),
        (0, 0x1000, 0, 0x10, "mmap_offset 0x10 is not 4 KiB aligned"),
        ((1 << 64) - 0x1000, 0x2000, 0, 0, "gpa 0xfffffffffffff000 size 0x2000 uaddr 0x0"),
        (0, 0x2000, (1 << 64) - 0x1000, 0, "uaddr 0xfffffffffffff000 mmap_offset 0x0 overflows 64 bits"),
        (0, 0x2000, 0, (1 << 64) - 0x1000, "mmap_offset 0xfffffffffffff000 overflows 64 bits"),
        (0, 2 << 30, 0, 0, "extends past the end of fd"),
        (0, 0x1000, 0, 1 << 30, "at mmap_offset 0x40000000 extends past the end of fd"),
    ],
)
def test_add_region_rejects_bad_values_and_leaves_fd_open(memfd_1g, gpa, size, uaddr, off, message):
    with GuestMemory() as mem:
        before = fd_count()
        with pytest.raises(MemoryTableError) as exc:
            mem.add_region(memfd_1g, gpa, size, uaddr, off)
        assert message in str(exc.value)
        assert isinstance(exc.value, ValueError)
        assert fd_count() == before
        os.fstat(memfd_1g)  # still ours, still open
        assert mem.regions == []


def test_overlaps_and_full_table_name_the_values(memfd_1g):
    with GuestMemory() as mem:
        mem.add_region(os.dup(memfd_1g), 0, 1 << 30, 0x10000000000, 0)
        fd = os.dup(memfd_1g)
        before = fd_count()
        with pytest.raises(MemoryTableError) as exc:
            mem.add_region(fd, 0x40000000 - 0x1000, 0x1000, 0x20000000000, 0)
        assert str(exc.value) == (
            "region gpa 0x3ffff000 size 0x1000 overlaps region 0 (gpa 0x0 size 0x40000000)"
        )
        with pytest.raises(MemoryTableError) as exc:
            mem.add_region(fd, 0x80000000, 0x2000, 0x10000000000 + 0x3FFFF000, 0)
        assert str(exc.value) == (
            "region uaddr 0x1003ffff000 size 0x2000 overlaps region 0 "
            "(uaddr 0x10000000000 size 0x40000000)"
        )
        assert fd_count() == before
        # Adjacent is not overlapping.
        mem.add_region(fd, 0x40000000, 0x1000, 0x10000000000 + (1 << 30), 0)
        for i in range(2, 32):
            mem.add_region(os.dup(memfd_1g), 0x40000000 + i * 0x1000, 0x1000, 0x30000000000 + i * 0x1000, i * 0x1000)
        assert len(mem.regions) == 32
        fd = os.dup(memfd_1g)
        before = fd_count()
        with pytest.raises(MemoryTableError, match=r"memory table full \(32 regions\)"):
            mem.add_region(fd, 0x80000000, 0x1000, 0x40000000000, 0)
        assert fd_count() == before
        os.close(fd)


def test_mmap_failure_reports_errno_and_leaves_fd_open(memfd_1g):
    ro = os.open(f"/proc/self/fd/{memfd_1g}", os.O_RDONLY)  # MAP_SHARED+PROT_WRITE needs O_RDWR
    try:
        with GuestMemory() as mem:
            with pytest.raises(MemoryTableError, match=rf"mmap of fd {ro} at offset 0x0 failed: Permission denied"):
                mem.add_region(ro, 0, 0x1000, 0, 0)
            os.fstat(ro)
    finally:
        os.close(ro)


def test_table_owns_and_closes_fds(memfd_1g):
    baseline = fd_count()
    mem = GuestMemory()
    for i in range(4):
        mem.add_region(os.dup(memfd_1g), i * MiB, MiB, UADDR + i * MiB, i * MiB)
    assert fd_count() == baseline + 4
    mem.remove_region(1 * MiB, MiB)
    assert fd_count() == baseline + 3
    assert [r.gpa for r in mem.regions] == [0, 2 * MiB, 3 * MiB]
    with pytest.raises(MemoryTableError, match=r"no region with gpa 0x200000 size 0x1000 \(table has 3 regions\)"):
        mem.remove_region(2 * MiB, 0x1000)
    mem.clear()
    assert fd_count() == baseline and mem.regions == []
    mem.add_region(os.dup(memfd_1g), 0, MiB, UADDR, 0)
    mem.close()
    mem.close()  # idempotent
    assert fd_count() == baseline


def test_regions_are_kept_sorted_by_gpa(memfd_1g):
    with GuestMemory() as mem:
        for gpa in (5 * MiB, 1 * MiB, 3 * MiB):
            mem.add_region(os.dup(memfd_1g), gpa, MiB, UADDR + gpa, gpa)
        assert [(r.index, r.gpa) for r in mem.regions] == [(0, MiB), (1, 3 * MiB), (2, 5 * MiB)]
        assert mem.translate(3 * MiB + 8, 8) == mem.translate(3 * MiB, 1) + 8
        assert mem.translate(2 * MiB, 1) is None  # the hole between regions


def test_allocated_bytes_counts_each_file_once(memfd_1g):
    with GuestMemory() as mem:
        mem.add_region(os.dup(memfd_1g), 0, MiB, UADDR, 0)
        mem.add_region(os.dup(memfd_1g), MiB, MiB, UADDR + MiB, MiB)
        assert mem.translate(0, 2 * MiB) is None  # two mappings, even if adjacent
        for gpa in (0, MiB):
            ctypes.memset(mem.translate(gpa, MiB), 1, MiB)
        assert mem.allocated_bytes() == 2 * MiB == allocated(memfd_1g)


# ---- virtqueue setup -------------------------------------------------------


@pytest.mark.parametrize("num", [0, 3, 100, 65536, 1 << 32 - 1])
def test_setup_rejects_ring_sizes(guest, num):
    vq = Virtqueue(0)
    with pytest.raises(RingError, match=rf"queue 0: ring size {num} is not a power of two in 1..32768"):
        vq.setup(guest.mem, num, UADDR, UADDR + 0x8000, UADDR + 0x9000, 0, False, False)
    assert not vq.ready


def test_setup_accepts_largest_ring(guest):
    ring = DriverRing(guest, 32768)
    vq = Virtqueue(2)
    ring.setup(vq, base=7)
    assert (vq.ready, vq.num, vq.last_avail_idx, vq.used_idx) == (True, 32768, 7, 7)


@pytest.mark.parametrize(
    "desc, avail, used, message",
    [
        (UADDR - 0x1000, UADDR + 0x8000, UADDR + 0x9000, "descriptor ring at uaddr 0x7efffffff000 size 0x1000 is outside"),
        (UADDR + GUEST_SIZE - 0x800, UADDR + 0x8000, UADDR + 0x9000, "size 0x1000 is outside guest memory"),
        (UADDR, UADDR + GUEST_SIZE - 0x200, UADDR + 0x9000, "available ring at uaddr 0x7f0003fffe00 size 0x206"),
        (UADDR, UADDR + 0x8000, UADDR + GUEST_SIZE, "used ring at uaddr 0x7f0004000000 size 0x806"),
        (UADDR + 8, UADDR + 0x8000, UADDR + 0x9000, "descriptor ring at uaddr 0x7f0000000008 is not 16-byte aligned"),
        (UADDR, UADDR + 0x8001, UADDR + 0x9000, "not 2-byte aligned"),
        (UADDR, UADDR + 0x8000, UADDR + 0x9002, "used ring at uaddr 0x7f0000009002 is not 4-byte aligned"),
    ],
)
def test_setup_rejects_rings_outside_memory_or_misaligned(guest, desc, avail, used, message):
    vq = Virtqueue(5)
    with pytest.raises(RingError) as exc:
        vq.setup(guest.mem, 256, desc, avail, used, 0, False, False)
    assert str(exc.value).startswith("queue 5: ") and message in str(exc.value)
    assert not vq.ready


def test_queue_refuses_rings_whose_memory_was_unmapped(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(0)
    ring.setup(vq)
    ring.add_buffer([1, 2])
    guest.mem.remove_region(0, GUEST_SIZE)
    with pytest.raises(RingError, match="queue 0: guest memory was unmapped since setup"):
        vq.pop_pfn32(guest.mem)
    with pytest.raises(RingError, match="unmapped"):
        vq.push_used([0])


# ---- popping ---------------------------------------------------------------


def test_pop_direct_chained_and_indirect_buffers(guest):
    ring = DriverRing(guest, 64)
    vq = Virtqueue(0)
    ring.setup(vq, indirect=True)
    a = list(range(1000, 1256))                   # a Linux-sized 256-PFN buffer
    b = [7, 8, 9, 10, 11, 12, 13]                 # chained over 3 descriptors
    c = list(range(50000, 50100))                 # indirect, 4 entries
    d = [0xFFFFFFFF]                              # any u32 is carried as is
    heads = [ring.add_buffer(a), ring.add_buffer(b, pieces=3),
             ring.add_buffer(c, pieces=4, indirect=True), ring.add_buffer(d, indirect=True)]
    assert vq.pending() == 4
    got = vq.pop_pfn32(guest.mem)
    got_heads, pfns = got.heads, got.ranges.pfns()
    assert got_heads == heads == [0, 1, 4, 5]
    assert pfns == a + b + c + d and got.items == len(a + b + c + d)
    assert vq.last_avail_idx == 4 and vq.pending() == 0
    again = vq.pop_pfn32(guest.mem)
    assert (again.heads, again.ranges) == ([], got.ranges) and len(again.ranges) == 0


def test_pop_reads_from_a_wrapped_avail_index(guest):
    ring = DriverRing(guest, 8)
    vq = Virtqueue(0)
    ring.setup(vq, base=65534)
    ring.add_buffer([1])
    ring.add_buffer([2])
    ring.add_buffer([3])
    heads, pfns = _pop(vq, guest.mem)
    assert heads == [0, 1, 2] and pfns.tolist() == [1, 2, 3]
    assert vq.last_avail_idx == 1


def _bad_avail_idx(ring):
    ring.set_avail_idx(300)
    return "avail idx 300 is 300 ahead of last_avail_idx 0 (ring size 128)"


def _bad_head(ring):
    ring.publish(4096)
    return "head 4096 out of range (ring size 128) at avail slot 1"


def _loop(ring):
    ring.write_desc(ring.desc, 10, ring.put_pfns([1]), 4, F_NEXT, 11)
    ring.write_desc(ring.desc, 11, ring.put_pfns([2]), 4, F_NEXT, 10)
    ring.publish(10)
    return "head 10: chain has more than 128 descriptors (ring table of 128), a loop?"


def _next_out_of_range(ring):
    ring.write_desc(ring.desc, 10, ring.put_pfns([1]), 4, F_NEXT, 200)
    ring.publish(10)
    return "head 10: descriptor 10: next 200 out of range (ring size 128)"


def _outside_memory(ring):
    ring.write_desc(ring.desc, 5, 0x7FFF0000, 1024)
    ring.publish(5)
    return "head 5: descriptor 5: addr 0x7fff0000 len 1024 outside guest memory"


def _straddles_end(ring):
    ring.write_desc(ring.desc, 5, GUEST_SIZE - 512, 1024)
    ring.publish(5)
    return "descriptor 5: addr 0x3fffe00 len 1024 outside guest memory"


def _addr_wraps(ring):
    ring.write_desc(ring.desc, 5, (1 << 64) - 4, 8)
    ring.publish(5)
    return "descriptor 5: addr 0xfffffffffffffffc len 8 outside guest memory"


def _writable(ring):
    ring.write_desc(ring.desc, 3, ring.put_pfns([1, 2]), 8, F_WRITE)
    ring.publish(3)
    return "head 3: descriptor 3 is device-writable (flags 0x2) in an inflate/deflate buffer"


def _odd_length(ring):
    ring.write_desc(ring.desc, 3, ring.put_pfns([1, 2, 3]), 10)
    ring.publish(3)
    return "head 3: descriptor 3: len 10 is not a multiple of 4"


def _too_big_for_queue(ring):
    ring.add_buffer(list(range(17)), pieces=2)
    return "buffer holds 17 PFNs, more than the 16 this queue takes per pop"


def _indirect_table(ring, length, addr=None, flags=F_INDIRECT):
    table = ring.g.alloc(max(length, 16)) if addr is None else addr
    ring.write_desc(ring.desc, 9, table, length, flags)
    ring.publish(9)
    return table


def _indirect_not_negotiated(ring):
    ring.vq.setup(ring.g.mem, ring.num, UADDR + ring.desc, UADDR + ring.avail, UADDR + ring.used, 0, False, False)
    ring.add_buffer([1, 2], indirect=True)
    return "descriptor 1 has the INDIRECT flag but indirect descriptors were not negotiated"


def _indirect_len_zero(ring):
    _indirect_table(ring, 0)
    return "descriptor 9: indirect table length 0 is not a nonzero multiple of 16 up to 32768 entries"


def _indirect_len_not_multiple(ring):
    _indirect_table(ring, 24)
    return "indirect table length 24 is not a nonzero multiple of 16"


def _indirect_len_too_long(ring):
    _indirect_table(ring, 16 * 32769, addr=0x100000)
    return f"indirect table length {16 * 32769} is not a nonzero multiple of 16 up to 32768 entries"


def _indirect_outside_memory(ring):
    _indirect_table(ring, 64, addr=GUEST_SIZE - 32)
    return "head 9: descriptor 9: indirect table addr 0x3ffffe0 len 64 outside guest memory"


def _indirect_with_next(ring):
    _indirect_table(ring, 16, flags=F_INDIRECT | F_NEXT)
    return "head 9: descriptor 9 has both INDIRECT and NEXT (flags 0x5)"


def _indirect_nested(ring):
    table = _indirect_table(ring, 32)
    ring.write_desc(table, 0, ring.put_pfns([1]), 4, F_NEXT, 1)
    ring.write_desc(table, 1, table, 32, F_INDIRECT)
    return "head 9: indirect descriptor 1 is itself INDIRECT"


def _indirect_entry_outside(ring):
    table = _indirect_table(ring, 32)
    ring.write_desc(table, 0, ring.put_pfns([1]), 4, F_NEXT, 1)
    ring.write_desc(table, 1, GUEST_SIZE, 4)
    return "head 9: indirect descriptor 1: addr 0x4000000 len 4 outside guest memory"


def _indirect_next_out_of_range(ring):
    table = _indirect_table(ring, 32)
    ring.write_desc(table, 0, ring.put_pfns([1]), 4, F_NEXT, 2)
    return "head 9: indirect descriptor 0: next 2 out of range (indirect table size 2)"


def _indirect_loop(ring):
    table = _indirect_table(ring, 32)
    ring.write_desc(table, 0, ring.put_pfns([1]), 4, F_NEXT, 1)
    ring.write_desc(table, 1, ring.put_pfns([2]), 4, F_NEXT, 0)
    return "head 9: chain has more than 2 descriptors (indirect table of 2)"


def _indirect_writable(ring):
    table = _indirect_table(ring, 16)
    ring.write_desc(table, 0, ring.put_pfns([1]), 4, F_WRITE)
    return "head 9: indirect descriptor 0 is device-writable"


MALFORMED = [
    _bad_avail_idx, _bad_head, _loop, _next_out_of_range, _outside_memory, _straddles_end,
    _addr_wraps, _writable, _odd_length, _too_big_for_queue, _indirect_not_negotiated,
    _indirect_len_zero, _indirect_len_not_multiple, _indirect_len_too_long, _indirect_outside_memory,
    _indirect_with_next, _indirect_nested, _indirect_entry_outside, _indirect_next_out_of_range,
    _indirect_loop, _indirect_writable,
]


@pytest.mark.parametrize("corrupt", MALFORMED, ids=[f.__name__.lstrip("_") for f in MALFORMED])
def test_malformed_ring_raises_with_values_and_consumes_nothing(guest, corrupt):
    ring = DriverRing(guest, 128)
    vq = ring.vq = Virtqueue(3, max_pfns=16)
    ring.setup(vq, indirect=True)
    ring.add_buffer([0x11, 0x22])  # a good buffer ahead of the bad one
    message = corrupt(ring)
    for _ in range(2):  # the same answer again: nothing moved
        with pytest.raises(RingError) as exc:
            vq.pop_pfn32(guest.mem)
        assert str(exc.value).startswith("queue 3: ")
        assert message in str(exc.value)
        assert vq.last_avail_idx == 0
        assert ring.used_idx() == 0


def test_pending_reports_a_bogus_avail_index(guest):
    ring = DriverRing(guest, 128)
    vq = Virtqueue(1)
    ring.setup(vq)
    ring.set_avail_idx(129)
    with pytest.raises(RingError, match=r"queue 1: avail idx 129 is 129 ahead of last_avail_idx 0 \(ring size 128\)"):
        vq.pending()
    ring.set_avail_idx(128)
    assert vq.pending() == 128


def test_buffers_that_do_not_fit_wait_for_the_next_pop(guest):
    ring = DriverRing(guest, 64)
    vq = Virtqueue(0, max_pfns=600, max_heads=3)
    ring.setup(vq)
    bufs = [list(range(k * 256, (k + 1) * 256)) for k in range(3)]
    for b in bufs:
        ring.add_buffer(b, pieces=2)
    heads, pfns = _pop(vq, guest.mem)
    assert heads == [0, 2] and pfns.tolist() == bufs[0] + bufs[1]
    assert vq.pending() == 1
    heads, pfns = _pop(vq, guest.mem)
    assert heads == [4] and pfns.tolist() == bufs[2]

    for k in range(5):
        ring.add_buffer([k])
    heads, pfns = _pop(vq, guest.mem)
    assert len(heads) == 3 and pfns.tolist() == [0, 1, 2]  # max_heads
    heads, pfns = _pop(vq, guest.mem)
    assert len(heads) == 2 and pfns.tolist() == [3, 4]


def test_pop_sees_only_published_buffers(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(0)
    ring.setup(vq)
    ring.add_buffer([1])
    head = ring.take_desc()
    ring.write_desc(ring.desc, head, ring.put_pfns([2]), 4)
    ring.publish(head, publish_idx=False)  # in the ring, idx not yet bumped
    heads, pfns = _pop(vq, guest.mem)
    assert pfns.tolist() == [1]
    ring.set_avail_idx(ring.avail_idx)
    heads, pfns = _pop(vq, guest.mem)
    assert heads == [head] and pfns.tolist() == [2]


# ---- used ring and notifications ----------------------------------------------


def test_push_used_writes_elements_then_index_across_wrap(guest):
    ring = DriverRing(guest, 4)
    vq = Virtqueue(0)
    ring.setup(vq, base=65534)
    vq.push_used([3, 1, 2], [0, 4, 8])
    assert ring.used_idx() == 1 == vq.used_idx
    assert [ring.used_elem(s) for s in (65534, 65535, 0)] == [(3, 0), (1, 4), (2, 8)]
    vq.push_used([0])
    assert ring.used_idx() == 2 and ring.used_elem(1) == (0, 0)
    with pytest.raises(ValueError, match=r"head 4 out of range \(ring size 4\)"):
        vq.push_used([4])
    assert ring.used_idx() == 2


def test_should_signal_without_event_idx_follows_no_interrupt(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(0)
    ring.setup(vq, event_idx=False)
    vq.push_used([0])
    assert vq.should_signal() is True
    ring.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    vq.push_used([1])
    assert vq.should_signal() is False
    ring.set_avail_flags(0)
    assert vq.should_signal() is True


def test_should_signal_with_event_idx_uses_used_event(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(0)
    ring.setup(vq, event_idx=True)
    ring.set_avail_flags(AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    ring.set_used_event(5)
    vq.push_used([0])
    assert vq.should_signal() is True     # first signal: nothing to compare with
    vq.push_used([1])                     # used 2: event 5 not crossed
    assert vq.should_signal() is False
    vq.push_used([2, 3, 4])               # used 5: still not past event 5
    assert vq.should_signal() is False
    vq.push_used([5])                     # used 6: crossed 5 -> 6
    assert vq.should_signal() is True
    vq.push_used([6])
    assert vq.should_signal() is False    # event 5 already signalled
    ring.set_used_event(6)
    vq.push_used([7, 8])                  # 7 -> 9: entry 6 was used before the last signal
    assert vq.should_signal() is False
    ring.set_used_event(9)
    vq.push_used([9])                     # 9 -> 10 uses entry 9
    assert vq.should_signal() is True


def test_pop_publishes_avail_event_with_event_idx(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(0)
    ring.setup(vq, base=40, event_idx=True)
    assert vq.pop_pfn32(guest.mem).heads == []
    assert ring.avail_event() == 40       # even an empty pop asks for the next kick
    ring.add_buffer([1])
    ring.add_buffer([2])
    heads = vq.pop_pfn32(guest.mem).heads
    assert len(heads) == 2 and ring.avail_event() == 42


def test_pop_leaves_avail_event_alone_without_event_idx(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(0)
    ring.setup(vq, event_idx=False)
    struct.pack_into("<H", guest.view, ring.used + 4 + 8 * 16, 0xBEEF)
    ring.add_buffer([1])
    vq.pop_pfn32(guest.mem)
    assert ring.avail_event() == 0xBEEF


# ---- balloon tracking ---------------------------------------------------------


def test_balloon_update_changed_unchanged_invalid_and_duplicates(memfd_1g):
    with GuestMemory() as mem:
        mem.add_region(os.dup(memfd_1g), 0, MiB, UADDR, 0)              # pfns 0..255
        mem.add_region(os.dup(memfd_1g), 4 * MiB, MiB, UADDR + MiB, MiB)  # pfns 1024..1279
        up = mem.balloon_update(PfnArray.from_list([1, 2, 2, 1024, 300, 3, 1279, 1280]), inflate=True)
        assert up.changed.pfns() == [1, 2, 1024, 3, 1279]
        assert (up.n_invalid, up.first_invalid, up.n_unchanged) == (2, 300, 1)
        assert [r.ballooned_pages for r in mem.regions] == [3, 2] and mem.ballooned_pages == 5

        up = mem.balloon_update(PfnArray.from_list([2, 4]), inflate=True)
        assert up.changed.pfns() == [4] and up.n_unchanged == 1 and up.first_invalid is None
        up = mem.balloon_update(PfnArray.from_list([2, 2, 5, 1279]), inflate=False)
        assert up.changed.pfns() == [2, 1279] and up.n_unchanged == 2 and up.n_invalid == 0
        assert [r.ballooned_pages for r in mem.regions] == [3, 1]
        up = mem.balloon_update(PfnArray.from_list([]), inflate=False)
        assert len(up.changed) == 0 and mem.ballooned_pages == 4


def test_pfn_array_round_trip_and_bounds():
    arr = PfnArray.from_list([0, 1, 0xFFFFFFFF])
    assert arr.tolist() == [0, 1, 0xFFFFFFFF] and len(arr) == 3 == arr.capacity
    with pytest.raises(ValueError):
        PfnArray.from_list([1 << 32])
    assert PfnArray(10).tolist() == []


def test_range_list_from_pairs():
    pairs = array("Q", [0x1000, 0x2000, 1 << 40, (1 << 64) - 1])
    ranges = RangeList.from_pairs(pairs)
    assert ranges.tolist() == [(0x1000, 0x2000), (1 << 40, (1 << 64) - 1)] and ranges.capacity == 2
    assert RangeList.from_pairs(array("Q")).tolist() == []
    with pytest.raises(ValueError):
        RangeList.from_pairs(array("Q", [0x1000]))  # a gpa without its length
    with pytest.raises(ValueError):
        RangeList.from_pairs(array("I", [0x1000, 0x2000]))  # not u64s
    with pytest.raises(ValueError):
        RangeList.from_pairs(array("d", [4096.0, 4096.0]))  # not integers


# ---- discard -------------------------------------------------------------------


def _page_pattern(i: int) -> bytes:
    return (i.to_bytes(4, "little") + b"\xa5\x5a\xc3\x3c") * (PAGE_SIZE // 8)


def _fill(view, first_page: int, npages: int) -> None:
    for i in range(first_page, first_page + npages):
        view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = _page_pattern(i)


def test_discard_frees_exactly_the_ballooned_pages_and_keeps_the_rest(guest):
    npages = GUEST_SIZE // PAGE_SIZE
    _fill(guest.view, 0, npages)
    assert allocated(guest.fd) == GUEST_SIZE
    victims = random.Random(7).sample(range(npages), 4096)
    pfns = PfnArray.from_list(victims + victims[:100])  # duplicates cost nothing

    stats, ranges = _discard_pfns(guest.mem, pfns)

    assert allocated(guest.fd) == GUEST_SIZE - 16 * MiB
    assert guest.mem.allocated_bytes() == GUEST_SIZE - 16 * MiB
    assert stats.bytes_freed == 16 * MiB and stats.bytes_failed == 0
    assert stats.syscalls == stats.ranges < 4096  # random picks still touch now and then
    assert ranges.pfns() == sorted(set(victims))  # sorted, each page once
    assert guest.mem.regions[0].discard_method == "fallocate"
    gone = set(victims)
    zero = bytes(PAGE_SIZE)
    for i in range(npages):
        page = guest.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        assert page == (zero if i in gone else _page_pattern(i)), f"page {i}"


def test_discard_coalesces_runs_into_single_syscalls(guest):
    _fill(guest.view, 0, 4096)
    before = allocated(guest.fd)
    run = list(range(1000, 2000))
    random.Random(1).shuffle(run)
    stats, _ = _discard_pfns(guest.mem, PfnArray.from_list(run))
    assert (stats.ranges, stats.syscalls, stats.bytes_freed) == (1, 1, 1000 * PAGE_SIZE)
    assert before - allocated(guest.fd) == 1000 * PAGE_SIZE

    pfns = [10, 11, 12, 12, 30, 40, 41, 11, 3, 20000, 20000]  # 20000 is past 64 MiB
    stats, _ = _discard_pfns(guest.mem, PfnArray.from_list(pfns))
    assert (stats.ranges, stats.syscalls, stats.pages_outside) == (4, 4, 1)
    assert stats.bytes_freed == 7 * PAGE_SIZE
    assert before - allocated(guest.fd) == 1007 * PAGE_SIZE


def test_discard_splits_runs_at_region_boundaries():
    fds = [new_memfd(MiB), new_memfd(MiB)]
    try:
        with GuestMemory() as mem:
            mem.add_region(os.dup(fds[0]), 0, MiB, UADDR, 0)
            mem.add_region(os.dup(fds[1]), MiB, MiB, UADDR + MiB, 0)
            ctypes.memset(mem.translate(0, MiB), 0xAA, MiB)
            ctypes.memset(mem.translate(MiB, MiB), 0xBB, MiB)
            stats, _ = _discard_pfns(mem, PfnArray.from_list(list(range(250, 262))))  # 6 pages each side
            assert (stats.ranges, stats.syscalls, stats.bytes_freed) == (2, 2, 12 * PAGE_SIZE)
            assert [allocated(fd) for fd in fds] == [MiB - 6 * PAGE_SIZE] * 2
    finally:
        for fd in fds:
            os.close(fd)


def test_discard_range(guest):
    _fill(guest.view, 0, 1024)
    stats = guest.mem.discard_ranges(RangeList.from_list([(MiB, MiB)]))
    assert (stats.bytes_freed, stats.syscalls) == (MiB, 1)
    assert allocated(guest.fd) == 3 * MiB
    stats = guest.mem.discard_ranges(RangeList.from_list([(GUEST_SIZE - PAGE_SIZE, 2 * PAGE_SIZE)]))
    assert (stats.pages_outside, stats.syscalls, stats.bytes_freed) == (2, 0, 0)
    stats = guest.mem.discard_ranges(RangeList.from_list([(0x800, PAGE_SIZE)]))
    assert (stats.last_errno, stats.bytes_failed, stats.syscalls) == (errno.EINVAL, PAGE_SIZE, 0)
    assert allocated(guest.fd) == 3 * MiB
    # Read last: reading a hole through a shared mapping allocates it again.
    assert guest.view[MiB:2 * MiB] == bytes(MiB) and guest.view[0:PAGE_SIZE] == _page_pattern(0)
    assert allocated(guest.fd) == 4 * MiB


def test_discard_falls_back_to_madvise_remove_where_fallocate_is_refused():
    # A MAP_SHARED mapping of /dev/zero is an anonymous shmem object: the fd
    # (a character device) refuses fallocate, MADV_REMOVE on the mapping works.
    zero = os.open("/dev/zero", os.O_RDWR)
    with GuestMemory() as mem:
        mem.add_region(zero, 0, MiB, UADDR, 0)
        host = mem.translate(0, MiB)
        ctypes.memset(host, 0x77, MiB)
        stats, _ = _discard_pfns(mem, PfnArray.from_list([4, 5, 6]))
        assert (stats.bytes_freed, stats.ranges, stats.syscalls) == (3 * PAGE_SIZE, 1, 2)
        assert mem.regions[0].discard_method == "madvise"
        stats, _ = _discard_pfns(mem, PfnArray.from_list([8, 10]))
        assert (stats.bytes_freed, stats.ranges, stats.syscalls) == (2 * PAGE_SIZE, 2, 2)  # straight to madvise
        data = ctypes.string_at(host, MiB)
        for page in range(256):
            want = 0 if page in (4, 5, 6, 8, 10) else 0x77
            assert data[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] == bytes([want]) * PAGE_SIZE, page


def test_region_refusing_both_methods_is_marked_and_skipped(guest):
    # A memfd sealed with F_SEAL_FUTURE_WRITE after we mapped it: shmem
    # refuses hole punching (EPERM) on both paths.  Real, no injection.
    sealed = new_memfd(MiB, "sealed", os.MFD_ALLOW_SEALING)
    try:
        guest.mem.add_region(os.dup(sealed), GUEST_SIZE, MiB, UADDR + GUEST_SIZE, 0)
        ctypes.memset(guest.mem.translate(GUEST_SIZE, MiB), 0x42, MiB)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        _fill(guest.view, 0, 16)
        first_sealed = GUEST_SIZE // PAGE_SIZE
        pfns = [1, 2, first_sealed + 1, first_sealed + 2, first_sealed + 9]

        stats, _ = _discard_pfns(guest.mem, PfnArray.from_list(pfns))
        assert stats.bytes_freed == 2 * PAGE_SIZE            # the good region still freed
        assert stats.bytes_failed == 3 * PAGE_SIZE
        assert (stats.last_errno, stats.failed_region) == (errno.EPERM, 1)
        assert stats.syscalls == 1 + 2                       # fallocate, then fallocate + madvise
        assert guest.mem.regions[1].discard_errno == errno.EPERM
        assert allocated(sealed) == MiB and allocated(guest.fd) == 14 * PAGE_SIZE

        stats, _ = _discard_pfns(guest.mem, PfnArray.from_list([first_sealed + 20, first_sealed + 30]))
        assert (stats.syscalls, stats.ranges, stats.bytes_failed) == (0, 2, 2 * PAGE_SIZE)
        assert stats.last_errno == errno.EPERM
        assert ctypes.string_at(guest.mem.translate(GUEST_SIZE, MiB), MiB) == b"\x42" * MiB
    finally:
        os.close(sealed)


def test_discard_stats_add():
    total = DiscardStats()
    total.add(DiscardStats(bytes_freed=8192, ranges=1, syscalls=1))
    total.add(DiscardStats(bytes_failed=4096, ranges=1, syscalls=2, last_errno=errno.EPERM, failed_region=1))
    total.add(DiscardStats(bytes_freed=4096, ranges=1, syscalls=1, pages_outside=3))
    assert total == DiscardStats(12288, 4096, 3, 4, 3, errno.EPERM, 1)


def test_discard_sorts_large_batches_correctly(guest):
    # Enough PFNs to take the radix path, spread over all 32 bits.
    rng = random.Random(3)
    values = [rng.getrandbits(32) for _ in range(200_000)] + list(range(5000, 5100))
    pfns = PfnArray.from_list(values)
    stats, ranges = _discard_pfns(guest.mem, pfns)
    assert ranges.pfns() == sorted(set(values))  # sorted, each page once
    inside = {v for v in values if v < GUEST_SIZE // PAGE_SIZE}
    assert stats.pages_outside == len(set(values) - inside)
    assert stats.bytes_freed == len(inside) * PAGE_SIZE


# ---- descriptor ranges (free page reporting, statistics) ---------------------


def _add_ranges(ring: DriverRing, segments, flags: int = F_WRITE, indirect: bool = False) -> int:
    """One buffer whose descriptors are the given (addr, len) ranges, as-is."""
    n = len(segments)
    if indirect:
        table = ring.g.alloc(16 * n)
        for k, (addr, length) in enumerate(segments):
            last = k == n - 1
            ring.write_desc(table, k, addr, length, flags | (0 if last else F_NEXT), 0 if last else k + 1)
        head = ring.take_desc()
        ring.write_desc(ring.desc, head, table, 16 * n, F_INDIRECT)
    else:
        ids = [ring.take_desc() for _ in segments]
        for k, (addr, length) in enumerate(segments):
            last = k == n - 1
            ring.write_desc(ring.desc, ids[k], addr, length, flags | (0 if last else F_NEXT), 0 if last else ids[k + 1])
        head = ids[0]
    ring.publish(head)
    return head


def test_pop_ranges_returns_each_buffers_descriptors_unchecked(guest):
    ring = DriverRing(guest, 64)
    vq = Virtqueue(3)
    ring.setup(vq, indirect=True)
    first = [(2 * MiB, 2 * MiB), (8 * MiB, 4 * MiB)]
    hostile = [(GUEST_SIZE + 2 * MiB, 2 * MiB), (5, 0), (1 << 63, 0xFFFFFFFF)]  # walker does not judge them
    indirect = [(32 * MiB + 4096 * k, 4096) for k in range(40)]
    heads = [_add_ranges(ring, first), _add_ranges(ring, hostile), _add_ranges(ring, indirect, indirect=True)]
    got = vq.pop_ranges(guest.mem, writable=True)
    assert [h for h, _ in got] == heads
    assert [[(d.addr, d.length) for d in descs] for _, descs in got] == [first, hostile, indirect]
    assert all(d.flags & F_WRITE for _, descs in got for d in descs)
    assert got[0][1][0].flags & F_NEXT and not got[0][1][1].flags & F_NEXT
    assert vq.last_avail_idx == 3 and vq.pop_ranges(guest.mem, writable=True) == []


def test_pop_ranges_refuses_the_wrong_direction_and_consumes_nothing(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(3)
    ring.setup(vq)
    _add_ranges(ring, [(2 * MiB, 2 * MiB), (4 * MiB, 4096)], flags=0)  # device-readable
    with pytest.raises(RingError, match=r"queue 3: head 0: descriptor 0 is device-readable \(flags 0x1\) in a buffer of device-writable"):
        vq.pop_ranges(guest.mem, writable=True)
    assert vq.last_avail_idx == 0
    got = vq.pop_ranges(guest.mem, writable=False)  # the same buffer is a fine stats buffer
    assert [(d.addr, d.length) for d in got[0][1]] == [(2 * MiB, 2 * MiB), (4 * MiB, 4096)]


def test_pop_ranges_shares_the_ring_guards(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(3)
    ring.setup(vq)
    _loop(ring)
    with pytest.raises(RingError, match="a loop"):
        vq.pop_ranges(guest.mem, writable=False)
    assert vq.last_avail_idx == 0


def test_pop_ranges_refuses_a_buffer_of_more_than_1024_descriptors(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(3)
    ring.setup(vq, indirect=True)
    _add_ranges(ring, [(2 * MiB, 4096)] * 1025, indirect=True)
    with pytest.raises(RingError, match="buffer holds 1025 descriptors, more than the 1024"):
        vq.pop_ranges(guest.mem, writable=True)
    assert vq.last_avail_idx == 0


def test_ranges_of_guest_memory_ballooned_pages_and_reads(guest):
    mem = guest.mem
    assert mem.region_of(0, GUEST_SIZE) == 0 and mem.region_of(GUEST_SIZE - 4096, 8192) is None
    assert mem.region_of(0, 0) is None
    mem.balloon_update(PfnArray.from_list([512, 513, 1023, 1024]), inflate=True)
    assert mem.ballooned_in_range(2 * MiB, 2 * MiB) == 3  # pages 512..1023
    assert mem.ballooned_in_range(4 * MiB, 4096) == 1 and mem.ballooned_in_range(6 * MiB, 2 * MiB) == 0
    assert mem.ballooned_in_range(2 * MiB + 512, 4096) is None  # not 4 KiB aligned
    assert mem.ballooned_in_range(GUEST_SIZE - 4096, 8192) is None  # not inside one region
    guest.view[4096:4100] = b"\x01\x02\x03\x04"
    assert mem.read(4096, 4) == b"\x01\x02\x03\x04" and mem.read(GUEST_SIZE - 2, 4) is None


def test_restore_position_keeps_a_held_buffer_out_of_the_used_ring(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(2)
    ring.setup(vq)
    _add_ranges(ring, [(2 * MiB, 100)], flags=0)
    _add_ranges(ring, [(2 * MiB, 100)], flags=0)
    (h0, _), (h1, _) = vq.pop_ranges(guest.mem, writable=False)
    vq.push_used([h0])
    assert vq.position == (2, 1)
    # Set up again (the memory table changed): the device goes back to base 0...
    vq.setup(guest.mem, ring.num, UADDR + ring.desc, UADDR + ring.avail, UADDR + ring.used, 0, False, False)
    assert vq.position == (0, 0)
    vq.restore_position(2, 1)
    assert vq.position == (2, 1) and vq.pop_ranges(guest.mem, writable=False) == []
    vq.push_used([h1])
    assert ring.used_idx() == 2 and ring.used_elem(1) == (h1, 0)


# ---- sinks: buffers -> ranges (PFN32, EXTENTS), and what follows on ranges ------


def test_generated_header_matches_the_python_sources():
    """csrc/vb_gen.h (and the module built from it) carry the numbers of the
    Python modules that own them; a stale header or build fails here."""
    from vhostballoon._native import ffi, lib
    from vhostballoon.device import config_layout
    from vhostballoon.device.journal_kinds import JournalKind
    from vhostballoon.device.queues import PFN_SHIFT, BufferFormat
    from vhostballoon.vhost_user import constants as c

    want = {
        "VB_VHOST_USER_HEADER_SIZE": c.HEADER_SIZE,
        "VB_VHOST_USER_REQ_GET_CONFIG": c.Request.GET_CONFIG,
        "VB_VHOST_USER_REQ_SET_CONFIG": c.Request.SET_CONFIG,
        "VB_VHOST_USER_F_VERSION": c.VERSION,
        "VB_VHOST_USER_F_REPLY": c.REPLY,
        "VB_VHOST_USER_F_NEED_REPLY": c.NEED_REPLY,
        "VB_VHOST_USER_MAX_FDS": c.MAX_FDS,
        "VB_VHOST_USER_CONFIG_HEADER_SIZE": c.CONFIG_HEADER_SIZE,
        "VB_MAX_MEM_REGIONS": c.MAX_MEM_SLOTS,
        "VB_CONFIG_SIZE": config_layout.CONFIG_SIZE,
        "VB_CONFIG_OFF_NUM_PAGES": config_layout.NUM_PAGES_OFFSET,
        "VB_CONFIG_OFF_ACTUAL": config_layout.ACTUAL_OFFSET,
        "VB_CONFIG_OFF_FREE_PAGE_HINT_CMD_ID": config_layout.FREE_PAGE_HINT_CMD_ID_OFFSET,
        "VB_CONFIG_OFF_POISON": config_layout.POISON_OFFSET,
        **{f"VB_JOURNAL_{k.name}": int(k) for k in JournalKind},
        **{f"VB_FORMAT_{f.name}": int(f) for f in BufferFormat},
        "VB_PAGE_SHIFT": PFN_SHIFT,
    }
    text = (REPO_CSRC / "vb_gen.h").read_text()
    header = {m[0]: int(m[1]) for m in re.findall(r"^#define (VB_\w+) (\d+)", text, re.M)}
    assert header == want
    assert {name: getattr(lib, name) for name in want} == want  # the built module too
    assert len(ffi.new("vb_mem *").regions) == c.MAX_MEM_SLOTS  # the table's size


def test_pfn32_sink_turns_each_buffer_into_ranges_in_order(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(0)
    ring.setup(vq)
    ring.add_buffer([5, 6, 7, 9, 9, 10, 0xFFFFFFFF])
    ring.add_buffer([11, 12])  # continues buffer 1's last range, but buffers are not joined
    got = vq.pop_pfn32(guest.mem)
    assert got.heads == [0, 1] and got.items == 9 and got.refused == 0
    assert got.ranges.tolist() == [
        (5 * PAGE_SIZE, 3 * PAGE_SIZE), (9 * PAGE_SIZE, PAGE_SIZE), (9 * PAGE_SIZE, 2 * PAGE_SIZE),
        (0xFFFFFFFF * PAGE_SIZE, PAGE_SIZE), (11 * PAGE_SIZE, 2 * PAGE_SIZE),
    ]
    # The ranges, page by page, are exactly what the guest wrote.
    assert got.ranges.pfns() == [5, 6, 7, 9, 9, 10, 0xFFFFFFFF, 11, 12]
    up = guest.mem.balloon_update(got.ranges, inflate=True)
    assert up.changed.pfns() == [5, 6, 7, 9, 10, 11, 12]
    assert (up.n_invalid, up.first_invalid, up.n_unchanged, up.first_unchanged) == (1, 0xFFFFFFFF, 1, 9)


def test_pfn32_ranges_stop_at_a_region_end():
    fds = [new_memfd(MiB), new_memfd(MiB)]
    try:
        with GuestMemory() as mem:
            mem.add_region(os.dup(fds[0]), 0, MiB, UADDR, 0)
            mem.add_region(os.dup(fds[1]), MiB, MiB, UADDR + MiB, 0)
            ranges = RangeList.from_pfns(list(range(254, 259)), mem)
            assert ranges.tolist() == [(254 * PAGE_SIZE, 2 * PAGE_SIZE), (256 * PAGE_SIZE, 3 * PAGE_SIZE)]
    finally:
        for fd in fds:
            os.close(fd)


def test_extents_sink_refuses_bad_ranges_names_the_first_and_still_takes_the_buffer(guest):
    ring = DriverRing(guest, 64)
    vq = Virtqueue(0)
    ring.setup(vq, indirect=True)
    good = [(2 * MiB, 2 * MiB), (8 * MiB, PAGE_SIZE)]
    bad = [
        (0x1800, PAGE_SIZE),                    # unaligned
        (4 * MiB, 0),                           # empty
        (GUEST_SIZE - PAGE_SIZE, 2 * PAGE_SIZE),  # past the end of guest memory
        ((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE),  # wraps
        (3 * MiB, PAGE_SIZE),                   # inside the first good range
    ]
    h1 = _add_ranges(ring, good[:1] + bad + good[1:], flags=0, indirect=True)
    h2 = _add_ranges(ring, [(2 * MiB, PAGE_SIZE)], flags=0)  # overlaps buffer 1, not its own: kept
    got = vq.pop_extents(guest.mem)
    assert got.heads == [h1, h2] and got.items == 8
    assert got.ranges.tolist() == good + [(2 * MiB, PAGE_SIZE)]
    assert got.refused == 5 and got.first_refused == (0x1800, PAGE_SIZE)
    assert got.first_refused_why == "not 4 KiB aligned"
    assert vq.pending() == 0  # the buffers are taken: they go back (used len 0) with the rest
    for segment, why in zip(bad[1:], ["empty", "not inside one region of guest memory", "wraps around",
                                     "overlaps another range of the buffer"]):
        _add_ranges(ring, [(2 * MiB, 2 * MiB), segment], flags=0)
        got = vq.pop_extents(guest.mem)
        assert (got.refused, got.first_refused, got.first_refused_why) == (1, segment, why)
        assert got.ranges.tolist() == [(2 * MiB, 2 * MiB)]
    assert guest.mem.ballooned_pages == 0


def test_extents_sink_treats_a_device_writable_descriptor_as_a_malformed_ring(guest):
    ring = DriverRing(guest, 16)
    vq = Virtqueue(2)
    ring.setup(vq)
    _add_ranges(ring, [(2 * MiB, PAGE_SIZE)], flags=F_WRITE)
    with pytest.raises(RingError, match="queue 2: head 0: descriptor 0 is device-writable"):
        vq.pop_extents(guest.mem)
    assert vq.last_avail_idx == 0


def test_whole_inflate_refuses_a_range_already_partly_in_the_balloon(guest):
    mem = guest.mem
    mem.balloon_update(RangeList.from_list([(MiB + 5 * PAGE_SIZE, PAGE_SIZE)]), inflate=True)
    up = mem.balloon_update(RangeList.from_list([(MiB, 64 * PAGE_SIZE), (4 * MiB, 2 * PAGE_SIZE)]),
                            inflate=True, whole=True)
    assert up.refused == 1 and up.changed.tolist() == [(4 * MiB, 2 * PAGE_SIZE)]
    assert mem.ballooned_pages == 3 and mem.ballooned_in_range(MiB, 64 * PAGE_SIZE) == 1


def test_deflate_of_a_sub_range_of_an_inflated_range(guest):
    mem = guest.mem
    mem.configure_huge_pages(0, 2 * MiB, "shmem", True)
    inflated = RangeList.from_list([(4 * MiB, MiB)])  # half a huge page: pending
    up = mem.balloon_update(inflated, inflate=True, whole=True)
    assert len(mem.track_inflate(up.changed)) == 0 and mem.pending_bytes == MiB
    back = RangeList.from_list([(4 * MiB + 64 * PAGE_SIZE, 16 * PAGE_SIZE)])
    up = mem.balloon_update(back, inflate=False, whole=True)
    assert up.changed.tolist() == back.tolist()
    assert mem.track_deflate(back) == 16
    assert mem.ballooned_pages == 240 and mem.pending_bytes == 240 * PAGE_SIZE
    assert mem.collect_pending().tolist() == [(4 * MiB, 64 * PAGE_SIZE), (4 * MiB + 80 * PAGE_SIZE, 176 * PAGE_SIZE)]


def test_a_range_covering_whole_huge_pages_frees_them_whole_without_a_split(guest):
    mem = guest.mem
    mem.configure_huge_pages(0, 2 * MiB, "shmem", True)
    _fill(guest.view, 0, 12 * MiB // PAGE_SIZE)
    before = allocated(guest.fd)
    # 2 MiB-aligned 4 MiB plus 64 KiB on each side: two whole huge pages, two partial.
    given = RangeList.from_list([(4 * MiB - 16 * PAGE_SIZE, 4 * MiB + 32 * PAGE_SIZE)])
    up = mem.balloon_update(given, inflate=True, whole=True)
    ranges = mem.track_inflate(up.changed)
    assert ranges.tolist() == [(4 * MiB, 4 * MiB)]
    stats = mem.discard_ranges(ranges)
    assert (stats.huge_pages_whole, stats.splits, stats.syscalls) == (2, 0, 1)
    assert before - allocated(guest.fd) == 4 * MiB
    assert mem.pending_bytes == 32 * PAGE_SIZE  # the partial pieces wait for their huge pages
