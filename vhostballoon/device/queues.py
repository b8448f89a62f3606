"""The balloon's queues as data: one table, one row per queue role.

For each role: the buffer **format** (what a buffer's descriptors carry),
the **direction** (what the pages do), the **feature** that brings the
queue (0: always there), who **serves** it (a C queue thread or a Python
task), whether its descriptors are device-writable, and the **journal
kind** its page changes are recorded under.  Everything else reads this
table: the session starts the queue's server from it, the C runtime gets
the formats and kinds from a header generated from this file
(``csrc/build_native.py``), and the packed queue indices come from it.
Adding a queue type is one row here, at most one C sink for a new format,
and tests.

Sources: virtio 1.2, 5.5.2 "Virtqueues" and 5.5.6 "Device Operation";
Linux ``drivers/virtio/virtio_balloon.c`` (``init_vqs``: a queue exists only
when its feature is negotiated, and later queues move down, so indices are
packed in this table's order).

Standard library only (and ``features``, which is too): the build loads this
file by path, without the package's dependencies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

try:  # as part of the package
    from .features import BalloonFeature
    from .journal_kinds import JournalKind
except ImportError:  # loaded by path at build time (csrc/build_native.py)
    from features import BalloonFeature  # type: ignore[no-redef]
    from journal_kinds import JournalKind  # type: ignore[no-redef]


# The page of a page frame number, and so the balloon's unit everywhere (the
# C core counts, tracks and frees in it): 4 KiB whatever the host's page size
# (virtio 1.2, 5.5.6; VIRTIO_BALLOON_PFN_SHIFT in
# linux/include/uapi/linux/virtio_balloon.h).  C gets it as VB_PAGE_SHIFT.
PFN_SHIFT = 12


class BufferFormat(enum.IntEnum):
    """What a buffer's descriptors carry (C: one sink per format)."""

    PFN32 = 1  # device-readable arrays of le32 page frame numbers, 4 KiB pages (virtio 5.5.6)
    EXTENTS = 2  # each descriptor's own address and length is one guest-physical range (5.5.6.6, reporting)
    STATS = 3  # device-readable array of (le16 tag, le64 value) (5.5.6.3)
    HINT = 4  # free page hinting: a command id, then extents (5.5.6.5); never offered


class Direction(enum.Enum):
    """What the pages of a buffer do."""

    INFLATE = "inflate"  # the guest gives them: freed on the host
    DEFLATE = "deflate"  # the guest takes them back: never freed afterwards
    REPORT = "report"  # free in the guest now, may be freed; the guest keeps them
    STATS = "stats"  # no pages: the guest's statistics
    HINT = "hint"  # free page hints for migration


class Server(enum.Enum):
    """Who serves the queue."""

    C_THREAD = "c-thread"  # csrc/serve.c: one thread per queue, one pass per kick
    PYTHON = "python"  # a trio task of the session
    NONE = "none"  # never offered, never served


class QueueRole(enum.Enum):
    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    FREE_PAGE_HINT = "free-page-hint"
    REPORTING = "reporting"
    RANGE_INFLATE = "range-inflate"
    RANGE_DEFLATE = "range-deflate"


@dataclass(frozen=True)
class QueueSpec:
    role: QueueRole
    format: BufferFormat
    direction: Direction
    feature: int  # the balloon feature bit that brings the queue; 0: always present
    served_by: Server
    device_writable: bool  # descriptors are device-writable (the device fills them) vs device-readable
    journal_kind: JournalKind | None  # record kind of the page changes it makes; None: none journaled
    extension: bool = False  # not in the virtio spec: the device has the queue only when it offers the feature


QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec(QueueRole.INFLATE, BufferFormat.PFN32, Direction.INFLATE, 0,
              Server.C_THREAD, False, JournalKind.INFLATE_RANGES),
    QueueSpec(QueueRole.DEFLATE, BufferFormat.PFN32, Direction.DEFLATE, 0,
              Server.C_THREAD, False, JournalKind.DEFLATE_RANGES),
    QueueSpec(QueueRole.STATS, BufferFormat.STATS, Direction.STATS, int(BalloonFeature.STATS_VQ),
              Server.PYTHON, False, None),
    QueueSpec(QueueRole.FREE_PAGE_HINT, BufferFormat.HINT, Direction.HINT, int(BalloonFeature.FREE_PAGE_HINT),
              Server.NONE, True, None),
    QueueSpec(QueueRole.REPORTING, BufferFormat.EXTENTS, Direction.REPORT, int(BalloonFeature.REPORTING),
              Server.PYTHON, True, None),
    # protocol/range-balloon.md: each device-readable descriptor is one range.
    QueueSpec(QueueRole.RANGE_INFLATE, BufferFormat.EXTENTS, Direction.INFLATE, int(BalloonFeature.RANGES),
              Server.C_THREAD, False, JournalKind.INFLATE_RANGES, extension=True),
    QueueSpec(QueueRole.RANGE_DEFLATE, BufferFormat.EXTENTS, Direction.DEFLATE, int(BalloonFeature.RANGES),
              Server.C_THREAD, False, JournalKind.DEFLATE_RANGES, extension=True),
)

SPECS: dict[QueueRole, QueueSpec] = {spec.role: spec for spec in QUEUES}

# The most queues a balloon can have.
MAX_QUEUES = len(QUEUES)


def device_queue_count(offered: int) -> int:
    """The queues a device offering these features has (GET_QUEUE_NUM; QEMU's
    num_vqs may not exceed it): every queue of the virtio spec, whether
    offered or not, and an extension's queues only when it is offered."""
    return sum(1 for spec in QUEUES if not spec.extension or offered & spec.feature)


def queue_specs(features: int) -> list[QueueSpec]:
    """Queue index -> its row: the queues these features bring, packed."""
    return [spec for spec in QUEUES if not spec.feature or features & spec.feature]


def queue_roles(features: int) -> list[QueueRole]:
    """Queue index -> role, packed as Linux packs them."""
    return [spec.role for spec in queue_specs(features)]


def queues_needed(features: int) -> int:
    """How many queues a guest uses with these features (QEMU's ``num_vqs``
    must be at least this)."""
    return len(queue_specs(features))
