"""Guest RAM for the model guest: a real memfd, mapped, with a per-page canary.

The front-end hands this memfd to the back-end exactly as QEMU hands over a
``memory-backend-memfd,share=on``: one region at guest physical address 0
covering the whole file, mmap offset 0, and a front-end virtual address
(``uaddr``) that the back-end must translate through the region table.

Layout::

    gpa 0 .. reserved_bytes      vrings, indirect tables, PFN and stats buffers
                                 (never ballooned, never reported)
    reserved_bytes .. size       ordinary guest pages, each carrying a canary

The canary of page ``pfn`` is the le64 ``(seed << 32) | pfn`` in the page's
first 8 bytes. Writing it allocates the page in the memfd, so ``touch()`` is
also how a test makes the host really hold guest memory.

Reading a page through the mapping allocates it again if the back-end punched
it out (shmem fills holes on a read fault), which would hide exactly what a
test wants to see. ``check_canary`` therefore finds holes with ``SEEK_HOLE``
first and reads only pages that are still backed.
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Iterable

PAGE_SIZE = 4096  # virtio balloon PFNs are in 4 KiB units (VIRTIO_BALLOON_PFN_SHIFT 12)
PAGE_SHIFT = 12
_QWORDS_PER_PAGE = PAGE_SIZE // 8

# A fake front-end virtual address for guest RAM, shaped like QEMU's mmap
# addresses; the back-end must only ever use it to translate vring addresses.
DEFAULT_UADDR = 0x7F00_0000_0000
DEFAULT_RAM_SIZE = 1 << 30
DEFAULT_RESERVED = 2 << 20

_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


class GuestMemoryError(ValueError):
    """A guest address or page outside guest RAM, or the reserved area full."""


class GuestRAM:
    """Guest RAM backed by a memfd (``fd``) and mapped here (``mem``); with
    ``directory``, by an unlinked file in that directory instead.

    ``mem`` supports the buffer protocol: ``struct.pack_into(fmt, ram.mem, gpa, ...)``
    writes guest memory at a guest physical address (region starts at gpa 0).
    """

    def __init__(
        self,
        size: int = DEFAULT_RAM_SIZE,
        *,
        reserved: int = DEFAULT_RESERVED,
        uaddr: int = DEFAULT_UADDR,
        seed: int = 0x5EED,
        name: str = "vb-guest",
        huge_pages: bool = False,
        directory: str | None = None,
    ) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"guest RAM size {size} is not a positive multiple of {PAGE_SIZE}")
        if reserved <= 0 or reserved % PAGE_SIZE or reserved >= size:
            raise GuestMemoryError(
                f"reserved area {reserved} must be a positive multiple of {PAGE_SIZE} below the RAM size {size}"
            )
        if not 0 < seed < 1 << 32:
            raise GuestMemoryError(f"canary seed {seed:#x} must be in 1..2**32-1 (0 would look like a hole)")
        self.size = size
        self.gpa = 0
        self.uaddr = uaddr
        self.seed = seed
        self.num_pages = size // PAGE_SIZE
        self.reserved_bytes = reserved
        self.reserved_pages = reserved // PAGE_SIZE
        self._next_reserved = 0
        if directory is None:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        else:  # an unlinked file there (e.g. on a tmpfs mounted huge=always)
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self.fd, size)
            self.mem = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            if huge_pages:
                # As QEMU does for guest RAM: with shmem_enabled=advise the
                # memfd then gets transparent huge pages where we touch it.
                self.mem.madvise(mmap.MADV_HUGEPAGE)
        except BaseException:
            os.close(self.fd)
            raise
        self._qwords = memoryview(self.mem).cast("Q")
        self._closed = False

    # -- addresses ---------------------------------------------------------

    def gpa_to_uaddr(self, gpa: int) -> int:
        """The front-end virtual address of a guest physical address (what
        QEMU puts in SET_VRING_ADDR)."""
        return self.uaddr + (gpa - self.gpa)

    def alloc_reserved(self, nbytes: int, align: int = 16) -> int:
        """Carve ``nbytes`` out of the reserved area; returns the gpa. Never freed."""
        start = -(-self._next_reserved // align) * align
        if start + nbytes > self.reserved_bytes:
            raise GuestMemoryError(
                f"reserved area full: need {nbytes} bytes at {start:#x}, area is {self.reserved_bytes:#x} bytes"
            )
        self._next_reserved = start + nbytes
        return start

    @property
    def reserved_used(self) -> int:
        return self._next_reserved

    def guest_pfns(self) -> range:
        """The PFNs the balloon may take: every page outside the reserved area."""
        return range(self.reserved_pages, self.num_pages)

    # -- canary ------------------------------------------------------------

    def canary(self, pfn: int) -> int:
        return (self.seed << 32) | pfn

    def touch(self, pfns: Iterable[int] | None = None) -> None:
        """Write the canary into each page (all guest pages if ``pfns`` is None),
        which also makes the host allocate it."""
        if pfns is None:
            self.touch_range(self.reserved_pages, self.num_pages)
            return
        qwords = self._qwords
        base = self.seed << 32
        for pfn in pfns:
            qwords[pfn * _QWORDS_PER_PAGE] = base | pfn

    def clear_canary(self, pfns: Iterable[int]) -> None:
        """Zero each page's first 8 bytes (a write, so the page gets allocated):
        what a guest with init_on_alloc does to a page it puts in the balloon."""
        qwords = self._qwords
        for pfn in pfns:
            qwords[pfn * _QWORDS_PER_PAGE] = 0

    def touch_range(self, first_pfn: int, end_pfn: int) -> None:
        """Write the canary into pages ``first_pfn .. end_pfn-1`` in one strided copy."""
        self._check_pfn_range(first_pfn, end_pfn)
        if first_pfn == end_pfn:
            return
        base = self.seed << 32
        view = self._qwords[first_pfn * _QWORDS_PER_PAGE : end_pfn * _QWORDS_PER_PAGE : _QWORDS_PER_PAGE]
        view[:] = array("Q", range(base | first_pfn, base | end_pfn))
        view.release()

    def hole_bitmap(self) -> bytearray:
        """One byte per page, 1 where the memfd has no page (punched or never written)."""
        holes = bytearray(self.num_pages)
        offset = 0
        while offset < self.size:
            try:
                hole = os.lseek(self.fd, offset, _SEEK_HOLE)
            except OSError:  # ENXIO: no hole at or after offset
                break
            if hole >= self.size:
                break
            try:
                data = os.lseek(self.fd, hole, _SEEK_DATA)
            except OSError:  # ENXIO: hole runs to the end of the file
                data = self.size
            first, end = hole // PAGE_SIZE, -(-data // PAGE_SIZE)
            holes[first:end] = b"\x01" * (end - first)
            offset = data
        return holes

    def host_holes(self) -> set[int]:
        """Guest pages (outside the reserved area) the host no longer holds."""
        holes = self.hole_bitmap()
        return {pfn for pfn in self.guest_pfns() if holes[pfn]}

    def check_canary(self, pfns: Iterable[int] | None = None) -> list[int]:
        """PFNs whose canary is wrong or whose page is gone (a hole), in the
        order given (all guest pages if ``pfns`` is None). Never reads a hole."""
        holes = self.hole_bitmap()
        base = self.seed << 32
        qwords = self._qwords
        if pfns is None:
            first, end = self.reserved_pages, self.num_pages
            expected = array("Q", range(base | first, base | end))
            got = array("Q")
            # Reading a hole through the mapping would allocate it: zero those out.
            view = qwords[first * _QWORDS_PER_PAGE : end * _QWORDS_PER_PAGE : _QWORDS_PER_PAGE]
            if not any(holes[first:end]):
                got.frombytes(view.tobytes())
                view.release()
                if got == expected:
                    return []
            else:
                view.release()
            return [pfn for pfn in range(first, end) if holes[pfn] or qwords[pfn * _QWORDS_PER_PAGE] != base | pfn]
        bad = []
        for pfn in pfns:
            if not 0 <= pfn < self.num_pages:
                raise GuestMemoryError(f"pfn {pfn:#x} is outside guest RAM ({self.num_pages:#x} pages)")
            if holes[pfn] or qwords[pfn * _QWORDS_PER_PAGE] != base | pfn:
                bad.append(pfn)
        return bad

    # -- host view ---------------------------------------------------------

    def allocated_bytes(self) -> int:
        """Bytes the host really holds for guest RAM (the memfd's st_blocks * 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def read(self, gpa: int, length: int) -> bytes:
        self._check_gpa(gpa, length)
        return self.mem[gpa : gpa + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._check_gpa(gpa, len(data))
        self.mem[gpa : gpa + len(data)] = data

    def _check_gpa(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM of {self.size:#x} bytes")

    def _check_pfn_range(self, first: int, end: int) -> None:
        if not 0 <= first <= end <= self.num_pages:
            raise GuestMemoryError(f"pfn range {first:#x}..{end:#x} is outside guest RAM ({self.num_pages:#x} pages)")

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._qwords.release()
        self.mem.close()
        os.close(self.fd)

    def __enter__(self) -> "GuestRAM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

