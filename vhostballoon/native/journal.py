"""The page journal (csrc/persist.c) and fault injection for the fault
scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._native import ffi, lib

from .ranges import PfnArray

if TYPE_CHECKING:
    from .ranges import RangeList


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
