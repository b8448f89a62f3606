"""Python face of the native core (csrc/): guest memory, virtqueues, discard.

This package is the only one that imports the cffi extension; the rest of
the project uses the classes it exports and never sees a cdata.  Its parts:
``ranges`` (values that cross into C), ``memory`` (the guest memory table),
``rings`` (virtqueues and the sinks), ``runtime`` (the C threads),
``config`` (the config space's owner), ``journal`` (the page journal).

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

from .._native import ffi, lib
from ._base import (
    BACKING_KINDS,
    MAX_RANGES_PER_POP,
    MemoryTableError,
    NativeError,
    PAGE_SHIFT,
    PAGE_SIZE,
    RingError,
)
from .ranges import (
    BalloonUpdate,
    DescRange,
    DiscardStats,
    PfnArray,
    RangeList,
    RegionInfo,
    fd_backing,
)
from .memory import (
    GuestMemory,
)
from .rings import (
    PoppedBatch,
    REFUSE_REASONS,
    Virtqueue,
)
from .runtime import (
    RANGE_ORDERS,
    SERVICE_BUCKETS,
    FrontChunk,
    FrontCounters,
    FrontReader,
    NativeLock,
    QueueWorker,
    WorkerCounters,
)
from .config import (
    ConfigAccessError,
    ConfigMailbox,
    ConfigValues,
    ConfigWrite,
    at_target,
)
from .journal import (
    PageJournal,
    crc32,
    fault_discard,
    fault_discard_log,
)

__all__ = [
    "BACKING_KINDS",
    "BalloonUpdate",
    "ConfigAccessError",
    "ConfigMailbox",
    "ConfigValues",
    "ConfigWrite",
    "DescRange",
    "DiscardStats",
    "FrontChunk",
    "FrontCounters",
    "FrontReader",
    "GuestMemory",
    "MAX_RANGES_PER_POP",
    "MemoryTableError",
    "NativeError",
    "NativeLock",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PageJournal",
    "PfnArray",
    "PoppedBatch",
    "QueueWorker",
    "RANGE_ORDERS",
    "SERVICE_BUCKETS",
    "REFUSE_REASONS",
    "RangeList",
    "RegionInfo",
    "RingError",
    "Virtqueue",
    "WorkerCounters",
    "at_target",
    "crc32",
    "fault_discard",
    "fault_discard_log",
    "fd_backing",
    "ffi",
    "lib",
]
