"""Python face of the native core (csrc/): guest memory, virtqueues, discard.

This is the only module that imports the cffi extension; the rest of the
project uses the classes below and never sees a cdata.

The core works on ranges of guest addresses (``RangeList``): a popped
buffer becomes ranges through the sink of its format (``Virtqueue.pop_pfn32``,
``pop_extents``), and the bitmap update, the huge page tracker, the discard
engine and the journal take ranges.  ``PfnArray`` is for callers that hold
page numbers (tests, old journals): ``RangeList.from_pfns`` turns them into
ranges as the PFN32 sink does.

Threading: cffi releases the GIL during every C call.  ``GuestMemory.discard_ranges``
may run in a worker thread while the event loop pops and pushes on
virtqueues; it only writes the per-region discard fields.  Adding, removing or clearing regions must not overlap any
other call (the server serialises them with a lock).  The huge page tracker
(``track_*``, ``collect_pending``) runs under that same lock, and the ranges
it hands out must be discarded before the lock is released: a deflate that
ran in between could otherwise see a page freed after the guest took it
back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

from vhostballoon._native import ffi, lib

# Balloon PFNs are 4 KiB page numbers whatever the host page size
# (virtio 1.x 5.5.6; VIRTIO_BALLOON_PFN_SHIFT in linux/include/uapi/linux/virtio_balloon.h).
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

_ERRLEN = 512
# Descriptors one pop_ranges returns, and so the most one buffer may have:
# QEMU's virtqueue_pop refuses more than VIRTQUEUE_MAX_SIZE (1024) too.  A
# Linux reporting buffer has at most 32 (PAGE_REPORTING_CAPACITY), a stats
# buffer one.
MAX_RANGES_PER_POP = 1024
_DISCARD_METHODS = {0: "untried", 1: "fallocate", 2: "madvise"}

# What a region's fd lives on (vb.h VB_BACKING_*, from fstatfs f_type).
BACKING_KINDS = ("file", "shmem", "hugetlbfs")
_BACKING_CODES = {name: code for code, name in enumerate(BACKING_KINDS)}


class NativeError(Exception):
    """An operation of the native core was refused."""


class MemoryTableError(NativeError, ValueError):
    """A memory region was rejected or not found."""


class RingError(NativeError):
    """A virtqueue is malformed, or cannot be set up where the front-end says."""


@dataclass(frozen=True)
class RegionInfo:
    index: int
    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    fd: int
    ballooned_pages: int
    discard_errno: int
    discard_method: str  # "untried" | "fallocate" | "madvise"
    backing: str = "file"  # "shmem" | "hugetlbfs" | "file" (fstatfs of fd)
    fs_block: int = 0  # f_bsize: the huge page size on hugetlbfs
    huge_page_size: int = PAGE_SIZE  # tracked granule; PAGE_SIZE = freed page by page at once
    thp: bool = False  # partial punches may split a transparent huge page here
    track_configured: bool = False
    pending_pages: int = 0  # ballooned, held back until their huge page completes or a flush


@dataclass
class DiscardStats:
    bytes_freed: int = 0
    bytes_failed: int = 0
    ranges: int = 0
    syscalls: int = 0
    pages_outside: int = 0
    last_errno: int = 0
    failed_region: int = -1
    # By the region's huge page size, by file offset (vb.h vb_discard_stats):
    huge_pages_whole: int = 0  # whole huge pages freed (THP-possible shmem, hugetlbfs)
    splits: int = 0  # THP-possible huge pages first punched in part (once until freed whole): THP splits
    hugetlb_partial_bytes: int = 0  # hugetlbfs bytes outside whole huge pages: zeroed, not freed
    bytes_shmem: int = 0  # bytes_freed by backing kind
    bytes_hugetlbfs: int = 0
    bytes_file: int = 0

    _SUMMED = (
        "bytes_freed", "bytes_failed", "ranges", "syscalls", "pages_outside", "huge_pages_whole",
        "splits", "hugetlb_partial_bytes", "bytes_shmem", "bytes_hugetlbfs", "bytes_file",
    )

    @classmethod
    def _from_c(cls, st) -> DiscardStats:
        return cls(
            bytes_freed=st.bytes_freed,
            bytes_failed=st.bytes_failed,
            ranges=st.ranges,
            syscalls=st.syscalls,
            pages_outside=st.pages_outside,
            last_errno=st.last_errno,
            failed_region=st.failed_region,
            huge_pages_whole=st.huge_whole,
            splits=st.huge_split,
            hugetlb_partial_bytes=st.hugetlb_partial_bytes,
            bytes_shmem=st.bytes_shmem,
            bytes_hugetlbfs=st.bytes_hugetlbfs,
            bytes_file=st.bytes_file,
        )

    def add(self, other: DiscardStats) -> None:
        """Accumulate other's totals; its failure (if any) becomes the latest."""
        for name in self._SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.failed_region >= 0 or other.last_errno:
            self.last_errno = other.last_errno
            self.failed_region = other.failed_region


class PfnArray:
    """A batch of 4 KiB page numbers in C memory (uint32_t[capacity]).

    ``n`` is how many are in use.  Kept in C so a batch of hundreds of
    thousands of PFNs goes from the ring to the discard engine without a
    Python list.
    """

    __slots__ = ("capacity", "n", "cdata")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"PfnArray capacity {capacity} is negative")
        self.capacity = capacity
        self.n = 0
        self.cdata = ffi.new("uint32_t[]", max(capacity, 1))

    @classmethod
    def from_list(cls, pfns: Sequence[int]) -> PfnArray:
        arr = cls(len(pfns))
        if pfns:
            try:
                arr.cdata[0 : len(pfns)] = pfns
            except OverflowError as exc:
                raise ValueError(f"PFN does not fit in 32 bits: {exc}") from None
        arr.n = len(pfns)
        return arr

    def tolist(self) -> list[int]:
        return ffi.unpack(self.cdata, self.n) if self.n else []

    def view(self):
        """The PFNs in use as le32 bytes (a buffer over the C array, no copy)."""
        return ffi.buffer(self.cdata, 4 * self.n)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        head = self.tolist()[:8]
        more = ", ..." if self.n > 8 else ""
        return f"PfnArray(n={self.n}, capacity={self.capacity}, [{', '.join(map(hex, head))}{more}])"


class RangeList:
    """Guest-physical byte ranges in C memory (vb_range[capacity]), as the
    huge page tracker hands them out and ``GuestMemory.discard_ranges``
    frees them.  ``n`` is how many are in use."""

    __slots__ = ("capacity", "n", "cdata")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"RangeList capacity {capacity} is negative")
        self.capacity = capacity
        self.n = 0
        self.cdata = ffi.new("vb_range[]", max(capacity, 1))

    @classmethod
    def from_list(cls, ranges: Sequence[tuple[int, int]]) -> RangeList:
        out = cls(len(ranges))
        for i, (gpa, length) in enumerate(ranges):
            if not (0 <= gpa < 1 << 64 and 0 <= length < 1 << 64):
                raise ValueError(f"range gpa {gpa:#x} length {length:#x} is not 64-bit")
            out.cdata[i].gpa = gpa
            out.cdata[i].len = length
        out.n = len(ranges)
        return out

    @classmethod
    def from_pairs(cls, pairs) -> RangeList:
        """A list from native u64s laid out gpa0, len0, gpa1, len1, ... (an
        ``array('Q')``: a vb_range is two u64), copied at C speed: for lists
        of hundreds of thousands of ranges, where ``from_list`` is slow."""
        with memoryview(pairs) as view:
            if view.format not in ("Q", "L") or view.itemsize != 8 or len(view) % 2:
                raise ValueError(f"RangeList.from_pairs takes an even number of u64s, not {len(view)} "
                                 f"items of format {view.format!r}")
            out = cls(len(view) // 2)
            ffi.memmove(out.cdata, view, view.nbytes)
        out.n = out.capacity
        return out

    @classmethod
    def from_pfns(cls, pfns: PfnArray | Sequence[int], memory: GuestMemory | None = None) -> RangeList:
        """Page numbers as ranges, in their order, consecutive ascending ones
        joined (not across a region end of ``memory``), as the PFN32 sink
        makes them from a buffer: nothing dropped, nothing sorted."""
        if not isinstance(pfns, PfnArray):
            pfns = PfnArray.from_list(pfns)
        out = cls(pfns.n)
        mem = ffi.NULL if memory is None else memory._table()
        out.n = lib.vb_ranges_from_pfns(mem, pfns.cdata, pfns.n, out.cdata)
        return out

    def pfns(self) -> list[int]:
        """The 4 KiB page numbers the ranges cover, in order (for tests and logs)."""
        out: list[int] = []
        for gpa, length in self.tolist():
            first = gpa >> PAGE_SHIFT
            out.extend(range(first, first + ((length + PAGE_SIZE - 1) >> PAGE_SHIFT)))
        return out

    @property
    def pages(self) -> int:
        return sum((self.cdata[i].len + PAGE_SIZE - 1) >> PAGE_SHIFT for i in range(self.n))

    def __add__(self, other: RangeList) -> RangeList:
        """Both lists' ranges, self's first (a new list)."""
        out = RangeList(self.n + other.n)
        size = ffi.sizeof("vb_range")
        ffi.memmove(out.cdata, self.cdata, self.n * size)
        ffi.memmove(out.cdata + self.n, other.cdata, other.n * size)
        out.n = self.n + other.n
        return out

    def tolist(self) -> list[tuple[int, int]]:
        return [(self.cdata[i].gpa, self.cdata[i].len) for i in range(self.n)]

    @property
    def total_bytes(self) -> int:
        return sum(self.cdata[i].len for i in range(self.n))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        head = ", ".join(f"{gpa:#x}+{length:#x}" for gpa, length in self.tolist()[:6])
        more = ", ..." if self.n > 6 else ""
        return f"RangeList(n={self.n}, [{head}{more}])"


@dataclass(frozen=True)
class DescRange:
    """One descriptor of a buffer popped with ``Virtqueue.pop_ranges``, as the
    driver wrote it; its address is unchecked (validate before use)."""

    addr: int
    length: int
    flags: int


def fd_backing(fd: int) -> tuple[str, int]:
    """What fd lives on, by fstatfs: ("shmem" | "hugetlbfs" | "file", f_bsize)."""
    block = ffi.new("uint64_t *")
    code = lib.vb_fd_backing(fd, block)
    if code < 0:
        err = ffi.errno
        raise OSError(err, f"fstatfs of fd {fd}: {os.strerror(err)}")
    return BACKING_KINDS[code], block[0]


@dataclass
class BalloonUpdate:
    changed: RangeList      # pages whose state flipped, as ranges in input order
    n_invalid: int          # pages outside guest memory (ignored)
    first_invalid: int | None  # the first of them, a PFN
    n_unchanged: int        # already in the requested state (incl. duplicates)
    first_unchanged: int | None = None  # the first of them, a PFN
    refused: int = 0        # whole: inflate ranges refused (already partly ballooned)


# Why the extents sink or a whole update refused a range (vb_core.h VB_REFUSE_*).
REFUSE_REASONS = {
    lib.VB_REFUSE_EMPTY: "empty", lib.VB_REFUSE_UNALIGNED: "not 4 KiB aligned",
    lib.VB_REFUSE_WRAPS: "wraps around", lib.VB_REFUSE_OUTSIDE: "not inside one region of guest memory",
    lib.VB_REFUSE_OVERLAP: "overlaps another range of the buffer",
    lib.VB_REFUSE_BALLOONED: "already in the balloon",
}


@dataclass(frozen=True)
class PoppedBatch:
    """What a sink made of the buffers one pop took (``Virtqueue.pop_pfn32``,
    ``pop_extents``)."""

    heads: list[int]
    ranges: RangeList       # the queue's own buffer: valid until its next pop
    items: int              # PFNs or descriptors in the buffers
    refused: int = 0        # extents: ranges refused, never to be used
    first_refused: tuple[int, int] | None = None  # (gpa, len) as the guest wrote it
    first_refused_why: str | None = None


def _as_ranges(ranges: RangeList | PfnArray, memory: GuestMemory) -> RangeList:
    return RangeList.from_pfns(ranges, memory) if isinstance(ranges, PfnArray) else ranges


def _errbuf():
    return ffi.new("char[]", _ERRLEN)


def _errtext(buf) -> str:
    return ffi.string(buf).decode("utf-8", "replace")


class GuestMemory:
    """The guest memory table: regions mapped MAP_SHARED, ballooned bitmaps.

    The table owns the fd of every region it accepted and closes it on
    remove_region, clear and close.
    """

    def __init__(self) -> None:
        mem = lib.vb_mem_new()
        if mem == ffi.NULL:
            raise MemoryError("vb_mem_new")
        self._mem = ffi.gc(mem, lib.vb_mem_free)
        # Bumped whenever a mapping goes away, so a Virtqueue set up before
        # refuses to touch its (now dangling) ring pointers.
        self._unmap_generation = 0

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Unmap every region and close its fd.  Idempotent."""
        if self._mem is not None:
            mem, self._mem = self._mem, None
            self._unmap_generation += 1
            ffi.release(mem)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _table(self):
        if self._mem is None:
            raise NativeError("guest memory table is closed")
        return self._mem

    # -- regions ---------------------------------------------------------------

    def add_region(self, fd: int, gpa: int, size: int, uaddr: int, mmap_offset: int) -> None:
        """Map fd[mmap_offset, +size) as guest-physical [gpa, +size).

        On success the table owns fd; on MemoryTableError the caller still
        does (and must close it).
        """
        mem = self._table()
        for name, value in (("gpa", gpa), ("size", size), ("uaddr", uaddr), ("mmap_offset", mmap_offset)):
            if not 0 <= value < 1 << 64:
                raise MemoryTableError(f"region {name} {value:#x} is not a 64-bit unsigned value")
        if not 0 <= fd < 1 << 31:
            raise MemoryTableError(f"region gpa {gpa:#x}: bad fd {fd}")
        err = _errbuf()
        if lib.vb_mem_add(mem, fd, gpa, size, uaddr, mmap_offset, err, _ERRLEN) < 0:
            raise MemoryTableError(_errtext(err))

    def remove_region(self, gpa: int, size: int) -> None:
        mem = self._table()
        if not (0 <= gpa < 1 << 64 and 0 <= size < 1 << 64):
            raise MemoryTableError(f"no region with gpa {gpa:#x} size {size:#x}")
        err = _errbuf()
        if lib.vb_mem_remove(mem, gpa, size, err, _ERRLEN) < 0:
            raise MemoryTableError(_errtext(err))
        self._unmap_generation += 1

    def clear(self) -> None:
        lib.vb_mem_clear(self._table())
        self._unmap_generation += 1

    @property
    def regions(self) -> list[RegionInfo]:
        mem = self._table()
        out = []
        for i in range(mem.nregions):
            r = mem.regions[i]
            out.append(
                RegionInfo(
                    index=i,
                    gpa=r.gpa,
                    size=r.size,
                    uaddr=r.uaddr,
                    mmap_offset=r.mmap_offset,
                    fd=r.fd,
                    ballooned_pages=r.ballooned_pages,
                    discard_errno=r.discard_errno,
                    discard_method=_DISCARD_METHODS.get(r.discard_method, str(r.discard_method)),
                    backing=BACKING_KINDS[r.backing] if 0 <= r.backing < len(BACKING_KINDS) else str(r.backing),
                    fs_block=r.fs_block,
                    huge_page_size=r.granule,
                    thp=bool(r.thp),
                    track_configured=bool(r.track_configured),
                    pending_pages=r.pending_pages,
                )
            )
        return out

    def host_address(self, index: int) -> int:
        """Start of our own mapping of region `index` (for /proc/self/smaps)."""
        mem = self._table()
        if not 0 <= index < mem.nregions:
            raise IndexError(f"region {index} out of range (table has {mem.nregions} regions)")
        return int(ffi.cast("uintptr_t", mem.regions[index].host))

    @property
    def total_bytes(self) -> int:
        mem = self._table()
        return sum(mem.regions[i].size for i in range(mem.nregions))

    @property
    def ballooned_pages(self) -> int:
        mem = self._table()
        return sum(mem.regions[i].ballooned_pages for i in range(mem.nregions))

    def allocated_bytes(self) -> int:
        """Host memory really backing guest RAM, as the kernel counts it.

        Sums st_blocks * 512 over the distinct files behind the regions
        (two regions in one memfd count once).  It measures whole files,
        including parts no region maps, and a file that st_blocks does not
        describe (e.g. a MAP_SHARED /dev/zero) counts as 0.
        """
        return lib.vb_mem_allocated_bytes(self._table())

    def translate(self, gpa: int, length: int) -> int | None:
        """Host address of [gpa, gpa+length) if it lies in one region."""
        if not (0 <= gpa < 1 << 64 and 0 <= length < 1 << 64):
            return None
        p = lib.vb_mem_gpa_to_host(self._table(), gpa, length)
        return None if p == ffi.NULL else int(ffi.cast("uintptr_t", p))

    def region_of(self, gpa: int, length: int) -> int | None:
        """Index of the region that holds all of [gpa, gpa+length), length > 0."""
        if not (0 <= gpa < 1 << 64 and 0 < length < 1 << 64):
            return None
        index = lib.vb_mem_region_of(self._table(), gpa, length)
        return None if index < 0 else index

    def read(self, gpa: int, length: int) -> bytes | None:
        """A copy of guest memory [gpa, gpa+length), or None if it is not
        inside one region.  The caller keeps the table from changing meanwhile."""
        address = self.translate(gpa, length)
        if address is None:
            return None
        return bytes(ffi.buffer(ffi.cast("uint8_t *", address), length)) if length else b""

    def ballooned_in_range(self, gpa: int, length: int) -> int | None:
        """Ballooned 4 KiB pages in [gpa, gpa+length); None when the range is
        not 4 KiB aligned or not inside one region."""
        if not (0 <= gpa < 1 << 64 and 0 <= length < 1 << 64):
            return None
        count = lib.vb_mem_ballooned_in_range(self._table(), gpa, length)
        return None if count < 0 else count

    # -- balloon -----------------------------------------------------------------

    def balloon_update(self, ranges: RangeList | PfnArray, inflate: bool, *, whole: bool = False,
                       want_changed: bool = True) -> BalloonUpdate:
        """Mark the pages of ranges ballooned (inflate) or not, page by page
        in order; report which ones flipped.  ``whole``: an inflate range
        with any page ballooned already is refused as a whole (extents)."""
        mem = self._table()
        ranges = _as_ranges(ranges, self)
        changed = RangeList((ranges.n if whole else ranges.pages) if want_changed else 0)
        st = ffi.new("vb_update *")
        n = lib.vb_balloon_update(mem, ranges.cdata, ranges.n, 1 if inflate else 0, 1 if whole else 0,
                                  changed.cdata if want_changed else ffi.NULL, changed.capacity, st)
        if n < 0:  # capacity is enough by construction
            raise NativeError(f"vb_balloon_update: no room for the changed ranges of {ranges!r}")
        changed.n = max(n, 0) if want_changed else 0
        return BalloonUpdate(
            changed=changed,
            n_invalid=st.invalid_pages,
            first_invalid=st.first_invalid_gpa >> PAGE_SHIFT if st.invalid_pages else None,
            n_unchanged=st.unchanged_pages,
            first_unchanged=st.first_unchanged_gpa >> PAGE_SHIFT if st.unchanged_pages else None,
            refused=st.refused,
        )

    def merge(self, ranges: RangeList) -> RangeList:
        """Sort ranges by address and join those that overlap or touch within
        one region, in place (returns ranges)."""
        ranges.n = lib.vb_ranges_merge(self._table(), ranges.cdata, ranges.n)
        return ranges

    # -- discard -----------------------------------------------------------------

    def discard_ranges(self, ranges: RangeList) -> DiscardStats:
        """Free each range (one fallocate per range, or madvise where that is
        refused), counting whole huge pages and THP splits.  Blocking."""
        mem = self._table()
        st = ffi.new("vb_discard_stats *")
        lib.vb_discard_ranges(mem, ranges.cdata, ranges.n, st)
        return DiscardStats._from_c(st)

    # -- huge page tracking ----------------------------------------------------------

    def configure_huge_pages(self, index: int, huge_page_size: int, backing: str, thp: bool) -> None:
        """Track region `index` in huge pages of huge_page_size bytes (by file
        offset).  PAGE_SIZE turns deferral off: ballooned pages are handed
        out at once.  backing decides what may be flushed (never partial
        hugetlbfs pages); thp marks partial punches as THP splits."""
        mem = self._table()
        if backing not in _BACKING_CODES:
            raise ValueError(f"backing {backing!r} is not one of {BACKING_KINDS}")
        if not (0 <= index < 1 << 32 and 0 <= huge_page_size < 1 << 64):
            raise MemoryTableError(f"region {index}: bad huge page size {huge_page_size}")
        err = _errbuf()
        if lib.vb_track_configure(mem, index, huge_page_size, _BACKING_CODES[backing], 1 if thp else 0,
                                  err, _ERRLEN) < 0:
            raise MemoryTableError(_errtext(err))

    def track_inflate(self, changed: RangeList | PfnArray) -> RangeList:
        """Count pages that just became ballooned (``balloon_update(...).changed``)
        per huge page.  Returns what may be freed now: the huge pages that
        became wholly ballooned (a range covering whole huge pages: as they
        are), and the pages of regions that do not defer (coalesced).  The
        rest is pending."""
        mem = self._table()
        changed = _as_ranges(changed, self)
        out = RangeList(changed.n)
        n = lib.vb_track_inflate(mem, changed.cdata, changed.n, out.cdata, out.capacity)
        if n < 0:  # capacity is n by construction
            raise NativeError(f"vb_track_inflate: {changed.n} ranges but room for {out.capacity}")
        out.n = n
        return out

    def track_deflate(self, ranges: RangeList | PfnArray) -> int:
        """Pages that just left the balloon: never to be freed from now on.
        Returns how many of them were pending."""
        ranges = _as_ranges(ranges, self)
        return lib.vb_track_deflate(self._table(), ranges.cdata, ranges.n)

    def collect_pending(self, region: int | None = None) -> RangeList:
        """Take every pending page (of one region, or all) that a punch can
        free, as coalesced ranges; they are no longer pending.  Pending
        pages of hugetlbfs regions stay: a partial punch there frees nothing."""
        mem = self._table()
        if region is not None and not 0 <= region < mem.nregions:
            raise IndexError(f"region {region} out of range (table has {mem.nregions} regions)")
        if region is None:
            capacity = lib.vb_track_pending(mem, 1, ffi.NULL)
        else:
            capacity = mem.regions[region].pending_pages
        out = RangeList(capacity)
        out.n = lib.vb_track_collect(mem, -1 if region is None else region, out.cdata, out.capacity)
        return out

    def collect_pending_batch(self) -> RangeList:
        """Take the pending pages of plain shmem regions (tracked in 2 MiB
        blocks only to free across buffers), as coalesced ranges."""
        mem = self._table()
        out = RangeList(lib.vb_track_pending_batch(mem))
        out.n = lib.vb_track_collect_batch(mem, out.cdata, out.capacity)
        return out

    def pending(self, collectable_only: bool = False) -> tuple[int, int | None]:
        """(bytes pending, CLOCK_MONOTONIC ns since when, or None), over every
        region or only those collect_pending takes from."""
        oldest = ffi.new("uint64_t *")
        pages = lib.vb_track_pending(self._table(), 1 if collectable_only else 0, oldest)
        return pages * PAGE_SIZE, (oldest[0] or None) if pages else None

    @property
    def pending_bytes(self) -> int:
        return self.pending()[0]

    # -- state export / import (server/persist.py) ------------------------------------

    def _bitmap_words(self, index: int) -> int:
        mem = self._table()
        if not 0 <= index < mem.nregions:
            raise IndexError(f"region {index} out of range (table has {mem.nregions} regions)")
        return ((mem.regions[index].size >> PAGE_SHIFT) + 63) // 64

    def export_ballooned(self, index: int) -> bytes:
        """Region `index`'s ballooned bitmap: le64 words, bit p = region page p."""
        nwords = self._bitmap_words(index)
        words = ffi.new("uint64_t[]", max(nwords, 1))
        if lib.vb_mem_export_ballooned(self._table(), index, words, nwords) < 0:
            raise MemoryTableError(f"region {index}: ballooned bitmap export refused")
        return bytes(ffi.buffer(words, nwords * 8))

    def export_pending(self, index: int) -> bytes:
        """Region `index`'s pending bitmap (all zero without huge page tracking)."""
        nwords = self._bitmap_words(index)
        words = ffi.new("uint64_t[]", max(nwords, 1))
        if lib.vb_track_export_pending(self._table(), index, words, nwords) < 0:
            raise MemoryTableError(f"region {index}: pending bitmap export refused")
        return bytes(ffi.buffer(words, nwords * 8))

    def _import(self, fn, index: int, bitmap: bytes, what: str) -> int:
        nwords = self._bitmap_words(index)
        if len(bitmap) != nwords * 8:
            raise MemoryTableError(f"region {index}: {what} bitmap of {len(bitmap)} bytes, expected {nwords * 8}")
        words = ffi.new("uint64_t[]", max(nwords, 1))
        ffi.memmove(words, bitmap, len(bitmap))
        err = _errbuf()
        count = fn(self._table(), index, words, nwords, err, _ERRLEN)
        if count < 0:
            raise MemoryTableError(_errtext(err))
        return count

    def import_ballooned(self, index: int, bitmap: bytes) -> int:
        """Mark region `index`'s pages ballooned as ``bitmap`` says (a fresh
        region only; after configure_huge_pages).  They count as freed
        already, not pending.  Returns the pages now ballooned."""
        return self._import(lib.vb_mem_import_ballooned, index, bitmap, "ballooned")

    def import_pending(self, index: int, bitmap: bytes) -> int:
        """Mark ballooned pages of region `index` pending again (after
        import_ballooned).  Returns how many became pending."""
        return self._import(lib.vb_track_import_pending, index, bitmap, "pending")


class Virtqueue:
    """Device side of one split virtqueue.

    Owns its range and head buffers: the RangeList a pop returns is one of
    them, valid only until the next pop on this queue.  ``max_pfns``: the
    items (PFNs, or descriptors of an extents buffer) one pop takes.
    """

    def __init__(self, index: int, max_pfns: int = 65536, max_heads: int = 1024) -> None:
        if max_pfns < 1 or max_heads < 1 or max_heads > 1 << 16:
            raise ValueError(f"queue {index}: max_pfns {max_pfns} / max_heads {max_heads} out of range")
        self.index = index
        self._vq = ffi.new("vb_vq *")
        self._popped = RangeList(max_pfns)
        self._max_items = max_pfns
        self._heads = ffi.new("uint16_t[]", max_heads)
        self._max_heads = max_heads
        self._batch = ffi.new("vb_batch *")
        self._ranges = None  # vb_desc_range[MAX_RANGES_PER_POP], made on the first pop_ranges
        self._counts = None
        self._mem: GuestMemory | None = None
        self._generation = -1

    def _fail(self, message: str) -> RingError:
        return RingError(f"queue {self.index}: {message}")

    def _check_mapped(self) -> None:
        """Refuse to use ring pointers whose mapping may have gone away."""
        if not self._vq.ready:
            raise self._fail("not set up")
        mem = self._mem
        if mem is None or mem._mem is None or mem._unmap_generation != self._generation:
            raise self._fail("guest memory was unmapped since setup; set the queue up again")

    def setup(
        self,
        mem: GuestMemory,
        num: int,
        desc_uaddr: int,
        avail_uaddr: int,
        used_uaddr: int,
        base: int,
        event_idx: bool,
        indirect: bool,
    ) -> None:
        """Point the queue at its rings (front-end addresses) in mem."""
        self._vq.ready = 0
        for name, value in (("desc", desc_uaddr), ("avail", avail_uaddr), ("used", used_uaddr)):
            if not 0 <= value < 1 << 64:
                raise self._fail(f"{name} ring address {value:#x} is not 64-bit")
        if not 0 <= num < 1 << 32:
            raise self._fail(f"ring size {num} is not a power of two in 1..32768")
        if not 0 <= base < 1 << 16:
            raise self._fail(f"base {base} is not a 16-bit ring index")
        err = _errbuf()
        rc = lib.vb_vq_setup(
            self._vq, mem._table(), num, desc_uaddr, avail_uaddr, used_uaddr, base,
            1 if event_idx else 0, 1 if indirect else 0, err, _ERRLEN,
        )
        if rc < 0:
            raise self._fail(_errtext(err))
        self._mem = mem
        self._generation = mem._unmap_generation

    @property
    def ready(self) -> bool:
        """setup() succeeded.  Stays True when a region is unmapped later (so
        last_avail_idx is still meaningful); the queue then raises RingError
        until it is set up again."""
        return bool(self._vq.ready)

    @property
    def last_avail_idx(self) -> int:
        return self._vq.last_avail_idx

    @property
    def used_idx(self) -> int:
        return self._vq.used_idx

    @property
    def num(self) -> int:
        return self._vq.num

    def _pop(self, pop, name: str, mem: GuestMemory) -> PoppedBatch:
        self._check_mapped()
        if mem is not self._mem:
            raise self._fail(f"{name} with a different memory table than setup")
        err = _errbuf()
        out, batch = self._popped, self._batch
        count = pop(self._vq, mem._mem, out.cdata, self._max_items, batch, self._heads, self._max_heads,
                    err, _ERRLEN)
        if count < 0:
            out.n = 0
            raise self._fail(_errtext(err))
        out.n = batch.n_ranges
        return PoppedBatch(
            heads=ffi.unpack(self._heads, count) if count else [], ranges=out, items=batch.items,
            refused=batch.refused,
            first_refused=(batch.first_refused_gpa, batch.first_refused_len) if batch.refused else None,
            first_refused_why=REFUSE_REASONS.get(batch.first_refused_why) if batch.refused else None,
        )

    def pop_pfn32(self, mem: GuestMemory) -> PoppedBatch:
        """Pop every whole buffer available now (within this queue's limits)
        whose descriptors carry le32 PFN arrays, as ranges (the PFN32 sink):
        page by page the PFNs in order, outside ones included.  Buffers that
        do not fit stay for the next call.  On RingError nothing is consumed."""
        return self._pop(lib.vb_vq_pop_pfn32, "pop_pfn32", mem)

    def pop_extents(self, mem: GuestMemory) -> PoppedBatch:
        """Pop every whole buffer available now whose device-readable
        descriptors are each one range (the EXTENTS sink); ranges unfit for
        inflate/deflate are refused (counted, first one named), the buffer
        still taken.  On RingError nothing is consumed."""
        return self._pop(lib.vb_vq_pop_extents, "pop_extents", mem)

    def pop_ranges(self, mem: GuestMemory, *, writable: bool) -> list[tuple[int, list[DescRange]]]:
        """Pop every whole buffer available now and return its descriptors:
        ``[(head, [DescRange, ...]), ...]``.  ``writable``: every descriptor
        must be device-writable (free page reporting), else device-readable
        (statistics); otherwise the ring is malformed.  Addresses are not
        checked.  A buffer of more than MAX_RANGES_PER_POP descriptors is
        malformed.  On RingError nothing is consumed."""
        self._check_mapped()
        if mem is not self._mem:
            raise self._fail("pop_ranges with a different memory table than setup")
        if self._ranges is None:
            self._ranges = ffi.new("vb_desc_range[]", MAX_RANGES_PER_POP)
            self._counts = ffi.new("uint32_t[]", self._max_heads)
        err = _errbuf()
        n_ranges = ffi.new("uint32_t *")
        count = lib.vb_vq_pop_ranges(
            self._vq, mem._mem, 1 if writable else 0, self._ranges, MAX_RANGES_PER_POP, n_ranges,
            self._heads, self._counts, self._max_heads, err, _ERRLEN,
        )
        if count < 0:
            raise self._fail(_errtext(err))
        buffers = []
        at = 0
        for k in range(count):
            descs = []
            for r in self._ranges[at : at + self._counts[k]]:
                descs.append(DescRange(r.addr, r.len, r.flags))
            at += self._counts[k]
            buffers.append((self._heads[k], descs))
        return buffers

    @property
    def position(self) -> tuple[int, int]:
        """(last_avail_idx, used_idx): where the device is in the ring.  They
        differ while popped buffers are held (the statistics buffer)."""
        return self._vq.last_avail_idx, self._vq.used_idx

    def restore_position(self, last_avail_idx: int, used_idx: int) -> None:
        """After setting the rings up again (guest memory changed), carry on
        where the device was instead of going back to the original base."""
        self._check_mapped()
        if not (0 <= last_avail_idx < 1 << 16 and 0 <= used_idx < 1 << 16):
            raise self._fail(f"ring position {last_avail_idx}/{used_idx} is not 16-bit")
        self._vq.last_avail_idx = last_avail_idx
        self._vq.used_idx = used_idx
        self._vq.signalled_used = used_idx
        self._vq.signalled_used_valid = 0

    def push_used(self, heads: Sequence[int], lens: Sequence[int] | None = None) -> None:
        """Return buffers to the driver (len = bytes written, 0 by default)."""
        self._check_mapped()
        n = len(heads)
        if n == 0:
            return
        num = self._vq.num
        if n > num:
            raise ValueError(f"queue {self.index}: {n} used elements exceed ring size {num}")
        bad = [h for h in heads if not 0 <= h < num]
        if bad:
            raise ValueError(f"queue {self.index}: head {bad[0]} out of range (ring size {num})")
        c_lens = ffi.NULL
        if lens is not None:
            if len(lens) != n:
                raise ValueError(f"queue {self.index}: {n} heads but {len(lens)} lens")
            c_lens = ffi.new("uint32_t[]", list(lens))
        lib.vb_vq_push_used(self._vq, ffi.new("uint16_t[]", list(heads)), c_lens, n)

    def should_signal(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        self._check_mapped()
        return bool(lib.vb_vq_should_signal(self._vq))

    def pending(self) -> int:
        """Available buffers not popped yet."""
        self._check_mapped()
        n = lib.vb_vq_pending(self._vq)
        if n < 0:
            avail_idx = ffi.cast("uint16_t *", self._vq.avail)[1]  # le16, x86 and arm64 hosts
            last = self._vq.last_avail_idx
            raise self._fail(
                f"avail idx {avail_idx} is {(avail_idx - last) & 0xFFFF} ahead of "
                f"last_avail_idx {last} (ring size {self._vq.num})"
            )
        return n


class NativeLock:
    """The lock the C queue workers take around every touch of guest memory
    state (csrc/serve.c vb_lock).  Any thread may release it, so the session
    can take it on the event loop and discard in a worker thread."""

    def __init__(self) -> None:
        self._lock = ffi.gc(lib.vb_lock_new(), lib.vb_lock_free)
        if self._lock == ffi.NULL:
            raise MemoryError("vb_lock_new")

    def acquire(self) -> None:
        """Blocking: call it from a worker thread when try_acquire fails."""
        lib.vb_lock_acquire(self._lock)

    def try_acquire(self) -> bool:
        return bool(lib.vb_lock_try(self._lock))

    def release(self) -> None:
        lib.vb_lock_release(self._lock)


@dataclass(frozen=True)
class WorkerCounters:
    """Totals of one queue worker since it started (vb_worker_counters)."""

    kicks: int = 0
    spurious_kicks: int = 0
    batches: int = 0
    buffers: int = 0
    pfns: int = 0
    changed: int = 0
    invalid: int = 0
    last_invalid_pfn: int = 0
    unchanged: int = 0
    last_unchanged_pfn: int = 0
    pending_dropped: int = 0
    signals: int = 0
    flushes: int = 0
    freed_measured: int = 0
    discard: DiscardStats = field(default_factory=DiscardStats)
    broken: str | None = None
    running: bool = False
    journal_waits: int = 0
    journal_dropped: int = 0
    refused: int = 0  # ranges refused (extents: malformed, or inflating ballooned pages)
    last_refused: tuple[int, int] = (0, 0)  # (gpa, len) of the first refused of the latest batch with one
    last_refused_why: str = ""
    range_orders: tuple[int, ...] = (0,) * 32  # extents inflate: accepted ranges by order

    # Not running totals: minus() keeps the later value (discard: its own minus).
    _LATEST: ClassVar[frozenset[str]] = frozenset(
        {"last_invalid_pfn", "last_unchanged_pfn", "last_refused", "last_refused_why", "discard", "broken",
         "running"}
    )

    def minus(self, earlier: WorkerCounters) -> WorkerCounters:
        """What happened since ``earlier`` (the discard failure fields are the latest)."""
        discard = DiscardStats(**{
            name: getattr(self.discard, name) - getattr(earlier.discard, name) for name in DiscardStats._SUMMED
        })
        if discard.bytes_failed:
            discard.last_errno, discard.failed_region = self.discard.last_errno, self.discard.failed_region
        totals = {
            f.name: getattr(self, f.name) - getattr(earlier, f.name)
            for f in fields(self) if f.name not in self._LATEST and f.name != "range_orders"
        }
        totals["range_orders"] = tuple(a - b for a, b in zip(self.range_orders, earlier.range_orders))
        latest = {name: getattr(self, name) for name in self._LATEST if name != "discard"}
        return WorkerCounters(**totals, **latest, discard=discard)


class QueueWorker:
    """A C thread serving one queue that moves pages (csrc/serve.c): per
    kick it pops with the sink of the queue's buffer format, updates the
    bitmap and the huge page tracker, frees, journals, fills the used ring
    and signals, all under the NativeLock.  ``format`` (a
    ``device.queues.BufferFormat``), the direction and ``journal_kind`` come
    from the queue's row of the queue table.

    It keeps the memory table, the lock and the queue alive until freed.
    Stop it before the memory table is closed or the queue replaced:
    request_stop(), then (once the caller holds the lock, the worker no
    longer touches the queue) join() in a thread, then free()."""

    def __init__(self, mem: GuestMemory, lock: NativeLock, vq: Virtqueue, *, format: int, inflate: bool,
                 journal_kind: int, kick_fd: int, call_fd: int | None, notify_fd: int | None,
                 flush_pages: int, journal: PageJournal | None = None,
                 config: ConfigMailbox | None = None) -> None:
        vq._check_mapped()
        if mem is not vq._mem:
            raise vq._fail("worker started with a different memory table than setup")
        err = _errbuf()
        worker = lib.vb_worker_start(
            mem._table(), lock._lock, vq._vq, int(format),
            lib.VB_DIRECTION_INFLATE if inflate else lib.VB_DIRECTION_DEFLATE, kick_fd,
            -1 if call_fd is None else call_fd, -1 if notify_fd is None else notify_fd,
            flush_pages, ffi.NULL if journal is None else journal._journal, int(journal_kind),
            ffi.NULL if config is None else config._config, err, _ERRLEN,
        )
        if worker == ffi.NULL:
            raise vq._fail(_errtext(err))
        self._worker = worker
        self._keep = (mem, lock, vq, config)
        self._journal = journal  # kept alive while the worker may append
        self._counters = ffi.new("vb_worker_counters *")
        self.inflate = inflate
        self.index = vq.index

    def set_call_fd(self, fd: int | None) -> None:
        """Hold the lock.  The worker signals its own duplicate of fd."""
        if lib.vb_worker_set_call_fd(self._worker, -1 if fd is None else fd) < 0:
            raise OSError(ffi.errno, f"queue {self.index}: cannot duplicate call fd {fd}")

    def set_flush_pages(self, pages: int) -> None:
        lib.vb_worker_set_flush_pages(self._worker, pages)

    def notice_pending(self) -> None:
        """Notify once more when pending pages appear (it notifies once, then
        waits to be asked again: the session's flush deadline covers them)."""
        lib.vb_worker_notice_pending(self._worker)

    def counters(self) -> WorkerCounters:
        c = self._counters
        lib.vb_worker_get_counters(self._worker, c)
        return WorkerCounters(
            kicks=c.kicks, spurious_kicks=c.spurious_kicks, batches=c.batches, buffers=c.buffers, pfns=c.pfns, changed=c.changed,
            invalid=c.invalid, last_invalid_pfn=c.last_invalid_pfn, unchanged=c.unchanged,
            last_unchanged_pfn=c.last_unchanged_pfn, pending_dropped=c.pending_dropped,
            signals=c.signals, flushes=c.flushes, freed_measured=c.freed_measured,
            discard=DiscardStats._from_c(c.discard),
            broken=_errtext(c.error) if c.broken else None, running=bool(c.running),
            journal_waits=c.journal_waits, journal_dropped=c.journal_dropped,
            refused=c.refused, last_refused=(c.last_refused_gpa, c.last_refused_len),
            last_refused_why=REFUSE_REASONS.get(c.last_refused_why, "") if c.refused else "",
            range_orders=tuple(c.range_orders),
        )

    def request_stop(self) -> None:
        lib.vb_worker_request_stop(self._worker)

    def join(self) -> None:
        """Blocking (the current batch finishes first): run it in a thread."""
        lib.vb_worker_join(self._worker)

    def free(self) -> None:
        if self._worker is not None:
            lib.vb_worker_free(self._worker)
            self._worker = None
            self._keep = None


# ---- the front-end's socket (csrc/front.c) -------------------------------------------

_FRONT_CHUNK_MAX = 65536


@dataclass(frozen=True)
class FrontChunk:
    """What the reader thread handed over: bytes and fds exactly as one
    recvmsg returned them (minus leading config messages it answered), or
    the end of the connection."""

    data: bytes
    fds: list[int]
    eof: bool = False
    fds_truncated: bool = False  # more fds than a message may carry arrived; they were closed
    error: int = 0  # errno of a failed read or write (the thread has ended)


@dataclass(frozen=True)
class FrontCounters:
    config_reads: int  # GET_CONFIGs answered by the reader thread
    config_writes: int  # SET_CONFIGs taken by the reader thread
    handed_over: int  # chunks handed to the session
    log_full: int  # SET_CONFIGs handed over because the write log was full


class FrontReader:
    """A C thread reading the front-end's socket (csrc/front.c).  It answers
    GET_CONFIG and SET_CONFIG of the shape QEMU sends once allowed
    (resume(fast=True)), and hands every other chunk to the session:
    ``chunk_fd`` becomes readable, take() returns it, resume() lets the
    thread read on.  It answers from, and writes to, the session's
    ConfigMailbox; ``writes_fd`` becomes readable when changes of ``actual``
    start to wait in the mailbox's log, ``target_fd`` when one of them
    brought the balloon to the target.  The socket fd is duplicated: the
    caller keeps its own."""

    def __init__(self, sock_fd: int, config: ConfigMailbox) -> None:
        self.chunk_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.writes_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.target_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        err = _errbuf()
        front = lib.vb_front_start(sock_fd, self.chunk_fd, self.writes_fd, self.target_fd, config._config,
                                   err, _ERRLEN)
        if front == ffi.NULL:
            for fd in (self.chunk_fd, self.writes_fd, self.target_fd):
                os.close(fd)
            raise OSError(_errtext(err))
        self._front = front
        self._config = config  # outlives the thread
        self._chunk = ffi.new("vb_front_chunk *")
        self._data = ffi.new("uint8_t[]", _FRONT_CHUNK_MAX)
        self._counters = ffi.new("vb_front_counters *")

    def take(self) -> FrontChunk | None:
        c = self._chunk
        if not lib.vb_front_take(self._front, c, self._data, _FRONT_CHUNK_MAX):
            return None
        return FrontChunk(
            bytes(ffi.buffer(self._data, c.len)), [c.fds[i] for i in range(c.nfds)],
            eof=bool(c.eof), fds_truncated=bool(c.ctrunc), error=c.error,
        )

    def resume(self, *, fast: bool, partial: bool) -> None:
        lib.vb_front_resume(self._front, 1 if fast else 0, 1 if partial else 0)

    def drain_signals(self) -> None:
        """Reset writes_fd and target_fd (before draining the mailbox's log)."""
        lib.vb_front_drain_config_signals(self._front)

    def counters(self) -> FrontCounters:
        c = self._counters
        lib.vb_front_get_counters(self._front, c)
        return FrontCounters(c.config_reads, c.config_writes, c.handed_over, c.log_full)

    def close(self) -> None:
        """Stops and joins the thread (blocking, briefly: it never waits on
        anything but its socket and the session), closes the eventfds."""
        if self._front is not None:
            lib.vb_front_free(self._front)
            self._front = None
            for fd in (self.chunk_fd, self.writes_fd, self.target_fd):
                os.close(fd)


# ---- the config space (csrc/config.c) ---------------------------------------------------


class ConfigAccessError(NativeError, ValueError):
    """A config read or write outside the space (the values are in the message)."""


@dataclass(frozen=True)
class ConfigValues:
    num_pages: int
    actual: int
    free_page_hint_cmd_id: int
    poison_val: int


@dataclass(frozen=True)
class ConfigWrite:
    """One logged change of actual, with num_pages of that moment."""

    old_actual: int
    new_actual: int
    num_pages: int


_CONFIG_LOG_BATCH = 4096


def at_target(num_pages: int, pages: int) -> bool:
    """The balloon is at the guest's target (csrc/config.c: the one definition)."""
    return bool(lib.vb_at_target(num_pages, pages))


class ConfigMailbox:
    """The balloon's config space, the one owner of its values (C, shared with
    the front-end reader thread and the inflate thread).  ``read()`` is the
    one way to read them; ``guest_write()`` applies the one rule for a
    guest's write and logs each change of actual for ``take_writes()``."""

    ACTUAL_CHANGED = lib.VB_CONFIG_ACTUAL_CHANGED
    AT_TARGET = lib.VB_CONFIG_AT_TARGET
    POISON_CHANGED = lib.VB_CONFIG_POISON_CHANGED
    REFUSED = lib.VB_CONFIG_REFUSED

    def __init__(self) -> None:
        config = lib.vb_config_new()
        if config == ffi.NULL:
            raise MemoryError("cannot allocate the config mailbox")
        self._config = ffi.gc(config, lib.vb_config_free)
        self._values = ffi.new("vb_config_values *")
        self._log = ffi.new("vb_config_write[]", _CONFIG_LOG_BATCH)
        self._packed = ffi.new("uint8_t[]", 64)

    def read(self) -> ConfigValues:
        v = self._values
        lib.vb_config_get(self._config, v)
        return ConfigValues(v.num_pages, v.actual, v.free_page_hint_cmd_id, v.poison_val)

    def pack(self) -> bytes:
        lib.vb_config_pack(self._config, self._packed)
        return bytes(ffi.buffer(self._packed, lib.VB_CONFIG_SIZE))

    def set_num_pages(self, num_pages: int) -> None:
        lib.vb_config_set_num_pages(self._config, num_pages)

    def set_actual(self, actual: int) -> None:
        lib.vb_config_set_actual(self._config, actual)

    def set_poison(self, poison_val: int) -> None:
        lib.vb_config_set_poison(self._config, poison_val)

    def guest_write(self, offset: int, data: bytes, *, keep_poison: bool = False) -> int:
        """The guest wrote data at offset: the ConfigMailbox bits of what changed."""
        err = _errbuf()
        rc = lib.vb_config_guest_write(self._config, offset, data, len(data), 1 if keep_poison else 0, err, _ERRLEN)
        if rc < 0:
            raise ConfigAccessError(_errtext(err))
        return rc

    def take_writes(self) -> list[ConfigWrite]:
        """Logged changes of actual, oldest first."""
        out: list[ConfigWrite] = []
        log = self._log
        while True:
            n = lib.vb_config_take_writes(self._config, log, _CONFIG_LOG_BATCH)
            out.extend(ConfigWrite(log[i].old_actual, log[i].new_actual, log[i].num_pages) for i in range(n))
            if n < _CONFIG_LOG_BATCH:
                return out


# ---- fault injection (scripts/faults/ only) -----------------------------------------

_FAULT_LOG_MAX = 4096


def fault_discard(delay: float = 0.0, record: bool = False) -> None:
    """Make every discard (vb_discard_ranges, whoever calls it: the C queue
    workers or the session) ``delay`` seconds slower, and with ``record``
    log when each ran.  ``fault_discard()`` turns both off."""
    lib.vb_fault_discard(int(delay * 1e9), 1 if record else 0)


def fault_discard_log() -> list[tuple[float, float, int]]:
    """(start, end, bytes) of each discard since fault_discard(record=True),
    times in time.monotonic() seconds (both are CLOCK_MONOTONIC)."""
    start = ffi.new("uint64_t[]", _FAULT_LOG_MAX)
    end = ffi.new("uint64_t[]", _FAULT_LOG_MAX)
    size = ffi.new("uint64_t[]", _FAULT_LOG_MAX)
    n = lib.vb_fault_discard_log(start, end, size, _FAULT_LOG_MAX)
    return [(start[i] / 1e9, end[i] / 1e9, size[i]) for i in range(n)]


class PageJournal:
    """Appends page-journal records (csrc/persist.c) to a writable buffer
    the caller owns, e.g. a MAP_SHARED mmap; the C queue workers append to
    the same journal (QueueWorker's journal).  Call close() before the
    buffer is closed."""

    def __init__(self, buffer) -> None:
        self._buf = ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
        self.size = len(self._buf)
        self._journal = lib.vb_journal_new(self._buf, self.size)
        if self._journal == ffi.NULL:
            raise MemoryError("vb_journal_new")

    def rewind(self, epoch: int) -> None:
        lib.vb_journal_rewind(self._journal, epoch)

    @property
    def offset(self) -> int:
        return lib.vb_journal_offset(self._journal)

    def append(self, kind: int, values: bytes | PfnArray = b"") -> int:
        """0 done, 1 done and more than half full, -1 does not fit (nothing written)."""
        if isinstance(values, PfnArray):
            return lib.vb_journal_append(self._journal, kind, values.cdata, values.n)
        if len(values) % 4:
            raise ValueError(f"journal values of {len(values)} bytes are not le32 words")
        data = ffi.from_buffer("uint32_t[]", values) if values else ffi.NULL
        return lib.vb_journal_append(self._journal, kind, data, len(values) // 4)

    def append_ranges(self, kind: int, ranges: RangeList) -> int:
        """A record of ranges (le64 gpa, le64 len each); as append."""
        return lib.vb_journal_append_ranges(self._journal, kind, ranges.cdata, ranges.n)

    def close(self) -> None:
        if self._journal is not None:
            lib.vb_journal_free(self._journal)
            self._journal = None
            ffi.release(self._buf)


def crc32(data: bytes, crc: int = 0) -> int:
    """zlib's CRC-32, as the C journal computes it (for tests)."""
    return lib.vb_crc32(crc, data, len(data))
