"""The guest memory table (csrc/mem.c, track.c, discard.c, persist.c):
regions, the ballooned bitmap, the huge page tracker, discards, state
export and import."""

from __future__ import annotations


from .._native import ffi, lib

from ._base import BACKING_KINDS, MemoryTableError, NativeError, PAGE_SHIFT, PAGE_SIZE, _BACKING_CODES, _DISCARD_METHODS, _ERRLEN, _errbuf, _errtext
from .ranges import BalloonUpdate, DiscardStats, PfnArray, RangeList, RegionInfo


def _as_ranges(ranges: RangeList | PfnArray, memory: GuestMemory) -> RangeList:
    return RangeList.from_pfns(ranges, memory) if isinstance(ranges, PfnArray) else ranges



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
