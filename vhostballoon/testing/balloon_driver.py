"""A guest balloon driver that behaves like Linux ``drivers/virtio/virtio_balloon.c``.

What it copies from Linux, and why a back-end cares:

- Queues are packed (``init_vqs``): inflate 0, deflate 1, then stats,
  free-page-hint and reporting, each only if its feature was negotiated.
- ``update_balloon_size_func``: read ``num_pages`` (one GET_CONFIG), move at
  most 256 PFNs (one buffer) towards it, write ``actual`` (one SET_CONFIG),
  and go round again while a difference remains. One buffer is in flight at a
  time and the driver waits for the device to return it (``tell_host``), so
  the back-end's round trip bounds the balloon's speed.
- Deflate takes the most recently inflated pages first (the balloon page list
  is LIFO: ``balloon_page_insert`` adds at the head, ``balloon_page_dequeue``
  takes from the head), and always tells the host through the deflate queue
  *before* it uses the pages again (``leak_balloon``; Linux does this whether
  or not MUST_TELL_HOST was negotiated).
- The stats queue is primed with one buffer during probe, before DRIVER_OK
  (so its kick never reaches a vhost-user back-end); each time the device
  returns it the driver refills it with fresh numbers (``stats_request``).
- ``virtballoon_validate``: a guest that does not poison free pages (here:
  ``poison_val=0``) drops PAGE_POISON; one that does keeps it, and drops
  REPORTING when the device does not offer PAGE_POISON.  With PAGE_POISON
  the driver writes ``poison_val`` into config during probe, before
  DRIVER_OK (so before the front-end sends SET_FEATURES).
- Free page reporting sends device-writable lists of at most 32 ranges
  (``PAGE_REPORTING_CAPACITY``) and waits for each.
- DEFLATE_ON_OOM (``virtio_balloon_oom_notify``): under memory pressure the
  guest leaks up to 256 pages through the deflate queue and writes
  ``actual``, with no target change (``oom_deflate``).

Not modelled: free page hinting (the queue is set up, nothing is sent),
balloon page migration, the guest's own reporting trigger (tests say what
is free: ``report_free_pages``, ``report_in_buffers``, ``send_report``).

The driver talks to the device through a transport (``Frontend``): config
access, kicks and call waits. Its own cost per buffer is a few array slices
and one ``pack``; PFN buffers are written as whole ``array('I')`` blocks.
"""

from __future__ import annotations

import enum
import random
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import trio

from .guest_ram import PAGE_SHIFT, PAGE_SIZE, GuestRAM
from .virtio_balloon import (
    CONFIG_ACTUAL,
    CONFIG_NUM_PAGES,
    CONFIG_POISON_VAL,
    PAGE_REPORTING_CAPACITY,
    RANGE_BLOCK_PAGES,
    VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_RANGES,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_OOM_NR_PAGES,
    VIRTIO_BALLOON_S_AVAIL,
    VIRTIO_BALLOON_S_CACHES,
    VIRTIO_BALLOON_S_HTLB_PGALLOC,
    VIRTIO_BALLOON_S_HTLB_PGFAIL,
    VIRTIO_BALLOON_S_MAJFLT,
    VIRTIO_BALLOON_S_MEMFREE,
    VIRTIO_BALLOON_S_MEMTOT,
    VIRTIO_BALLOON_S_MINFLT,
    VIRTIO_BALLOON_S_SWAP_IN,
    VIRTIO_BALLOON_S_SWAP_OUT,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    QueueRole,
    queue_roles,
)
from .virtqueue import DriverVirtqueue

if sys.byteorder != "little":  # array('I').tobytes() is written as le32 below
    raise ImportError("vhostballoon.testing assumes a little-endian host")

# What the real guest accepts. Seen with QEMU 10.2.2 and Linux 6.1: the guest
# never acks INDIRECT_DESC through vhost-user-test-device-pci even when the
# back-end offers it (guest sysfs features; SET_FEATURES 0x160000001 in
# protocol/transcripts). Pass accept_features=... | VIRTIO_RING_F_INDIRECT_DESC
# to exercise indirect descriptors.
LINUX_FEATURES = (
    VIRTIO_F_VERSION_1
    | VIRTIO_BALLOON_F_MUST_TELL_HOST
    | VIRTIO_BALLOON_F_STATS_VQ
    | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    | VIRTIO_BALLOON_F_FREE_PAGE_HINT
    | VIRTIO_BALLOON_F_PAGE_POISON
    | VIRTIO_BALLOON_F_REPORTING
    | VIRTIO_RING_F_EVENT_IDX
)

# What this project's range driver accepts (guest/linux/vhostballoon_guest.ko):
# Linux's, plus range ballooning (protocol/range-balloon.md).
RANGE_FEATURES = LINUX_FEATURES | VIRTIO_BALLOON_F_RANGES
RANGES_PER_BUFFER = 64  # the range driver's ranges per buffer (one descriptor each, ring permitting)

OUT_OF_PUFF_SLEEP = 0.2  # fill_balloon: "Sleep for at least 1/5 of a second before retry."
RAW_BUFFER_BYTES = 16 * PAGE_SIZE  # scratch buffer for send_pfns / send_raw_buffer (4096 PFNs)
_STAT = struct.Struct("<HQ")  # struct virtio_balloon_stat is packed: le16 tag, le64 val
STATS_BUFFER_ENTRIES = 64  # room in the model's stats buffer (Linux: VIRTIO_BALLOON_S_NR)


class PfnOrder(enum.Enum):
    RANDOM = "random"  # random guest pages, shuffled (the default)
    LINUX = "linux"  # descending runs of consecutive PFNs, two runs interleaved, as a real guest sends
    SEQUENTIAL = "sequential"  # ascending PFNs


class DriverError(RuntimeError):
    """The model guest could not do what it was asked."""


class DeviceTimeout(DriverError):
    """The device did not return a buffer in time."""


class Transport(Protocol):
    """What the driver needs from the front-end (``Frontend`` implements it)."""

    device_features: int
    num_vqs: int
    vq_size: int
    on_config_change: Callable[[], None] | None

    async def start_guest(self, features: int, ram: GuestRAM, queues: Sequence[DriverVirtqueue]) -> None: ...
    async def read_config(self) -> bytes: ...
    async def write_config(self, offset: int, data: bytes) -> None: ...
    def kick(self, queue_index: int) -> None: ...
    async def wait_call(self, queue_index: int) -> None: ...


def allocation_order(
    pfns: range, order: PfnOrder | str, *, seed: int = 0, run_length: int = 16, block_pages: int = 512
) -> array:
    """The order in which the model guest hands pages to the balloon.

    LINUX: 2 MiB blocks from the top of memory down; two blocks at a time
    are drained in alternating descending runs of ``run_length`` pages
    (e.g. 0x3fdff..0x3fdf0, 0x3fbff..0x3fbf0, 0x3fdef..), which is how a
    real guest's buddy allocator and per-cpu lists hand out pages.
    """
    order = PfnOrder(order)
    if order is PfnOrder.SEQUENTIAL:
        return array("I", pfns)
    if order is PfnOrder.RANDOM:
        shuffled = array("I", pfns).tolist()
        random.Random(seed).shuffle(shuffled)
        return array("I", shuffled)
    result = array("I")
    first, end = pfns.start, pfns.stop
    tops = list(range(end, first, -block_pages))  # exclusive upper ends of blocks, top down
    for pair in range(0, len(tops), 2):
        blocks = [(top, max(top - block_pages, first)) for top in tops[pair : pair + 2]]
        cursors = [top for top, _ in blocks]
        while any(cursor > bottom for cursor, (_, bottom) in zip(cursors, blocks)):
            for i, (_, bottom) in enumerate(blocks):
                if cursors[i] > bottom:
                    stop = max(cursors[i] - run_length, bottom)
                    result.extend(range(cursors[i] - 1, stop - 1, -1))
                    cursors[i] = stop
    return result


class BalloonDriver:
    """The model guest's balloon driver.

    Lifecycle: ``await probe()`` (features, queues, device start, initial
    target check), then ``await run()`` in a nursery task (serves config
    changes and stats requests until cancelled). ``model_guest`` does both.
    """

    def __init__(
        self,
        ram: GuestRAM,
        transport: Transport,
        *,
        accept_features: int = LINUX_FEATURES,
        order: PfnOrder | str = PfnOrder.RANDOM,
        seed: int = 0,
        poison_val: int = 0,
        touch_on_inflate: bool = False,
        buffer_timeout: float = 30.0,
        keep_balloon_of: "BalloonDriver | None" = None,
    ) -> None:
        self.ram = ram
        self.transport = transport
        self.accept_features = accept_features
        self.order = PfnOrder(order)
        self.poison_val = poison_val
        self.extra_stats: dict[int, int] = {}  # tag -> value sent after the usual ten (e.g. newer tags)
        self.touch_on_inflate = touch_on_inflate
        self.buffer_timeout = buffer_timeout
        self.features = 0
        self.queues: list[DriverVirtqueue] = []
        self.roles: list[QueueRole] = []
        self.inflate_vq: DriverVirtqueue | None = None
        self.deflate_vq: DriverVirtqueue | None = None
        self.stats_vq: DriverVirtqueue | None = None
        self.free_page_vq: DriverVirtqueue | None = None
        self.reporting_vq: DriverVirtqueue | None = None
        self.range_inflate_vq: DriverVirtqueue | None = None
        self.range_deflate_vq: DriverVirtqueue | None = None
        # Range ballooning: the blocks in the balloon by order (first PFNs,
        # newest last); only orders 0 and 9 (RANGE_BLOCK_PAGES) are used.
        self.range_blocks: dict[int, list[int]] = {0: [], 9: []}
        self.range_buffers = 0

        # Pages the guest can give, next one at the end; pages in the balloon, newest at the end.
        self._free_stack = allocation_order(ram.guest_pfns(), self.order, seed=seed)
        self._free_stack.reverse()
        self._balloon_stack = array("I")
        self.balloon_bitmap = bytearray(ram.num_pages)  # 1 where the page is in the balloon
        self.actual_pages = 0  # vb->num_pages: what the driver writes into config.actual
        if keep_balloon_of is not None:
            self._keep_balloon(keep_balloon_of)
        self.target_pages = 0  # num_pages as last read from config

        self.inflate_buffers = 0
        self.deflate_buffers = 0
        self.stats_buffers = 0
        self.report_buffers = 0
        self.oom_deflates = 0
        self.out_of_puff = 0
        self.inflate_rtt_ns = array("q")  # per buffer: kick -> used seen (after the call)
        self.deflate_rtt_ns = array("q")
        self.config_changes = 0

        self._balloon_lock = trio.Lock()  # vb->balloon_lock: one inflate/deflate buffer in flight
        self._queue_locks: dict[int, trio.Lock] = {}  # one waiter per call eventfd
        self._config_changed = trio.Event()
        self._progress = trio.Event()
        self._updating = False
        self._pfn_buf_gpa = 0
        self._raw_buf_gpa = 0
        self._stats_buf_gpa = 0
        self._stats_head: int | None = None

    def _keep_balloon(self, previous: "BalloonDriver") -> None:
        """The same guest on a new device connection (its front-end
        reconnected): the guest kept its balloon, so this driver starts with
        the pages ``previous`` held, in the same order, and the same
        ``actual``.  A new back-end session knows none of them."""
        if previous.ram is not self.ram:
            raise DriverError("keep_balloon_of: the previous driver ran on other guest RAM")
        self._free_stack = array("I", previous._free_stack)
        self._balloon_stack = array("I", previous._balloon_stack)
        self.balloon_bitmap[:] = previous.balloon_bitmap
        self.range_blocks = {order: list(firsts) for order, firsts in previous.range_blocks.items()}
        self.actual_pages = previous.actual_pages

    # -- probe ---------------------------------------------------------------

    async def probe(self) -> None:
        """What virtballoon_probe does, in the order the device sees it."""
        offered = self.transport.device_features
        if not offered & VIRTIO_F_VERSION_1:
            raise DriverError(f"device features {offered:#x} lack VERSION_1; the model guest is modern-only")
        self.features = offered & self.accept_features
        # virtballoon_validate: keep PAGE_POISON only when free pages are
        # poisoned; a poisoning guest cannot report without it.
        if self.poison_val == 0:
            self.features &= ~VIRTIO_BALLOON_F_PAGE_POISON
        elif not self.features & VIRTIO_BALLOON_F_PAGE_POISON:
            self.features &= ~VIRTIO_BALLOON_F_REPORTING
        self.roles = queue_roles(self.features)
        if len(self.roles) > self.transport.num_vqs:
            raise DriverError(
                f"negotiated features need {len(self.roles)} queues ({', '.join(r.value for r in self.roles)}) "
                f"but the device has {self.transport.num_vqs}"
            )
        num = self.transport.vq_size
        if QueueRole.REPORTING in self.roles and num < PAGE_REPORTING_CAPACITY:
            raise DriverError(f"free page reporting needs vq_size >= {PAGE_REPORTING_CAPACITY}, device has {num}")
        event_idx = bool(self.features & VIRTIO_RING_F_EVENT_IDX)
        indirect = bool(self.features & VIRTIO_RING_F_INDIRECT_DESC)
        self.queues = [
            DriverVirtqueue(self.ram, index, num, event_idx=event_idx, indirect=indirect)
            for index in range(len(self.roles))
        ]
        by_role = dict(zip(self.roles, self.queues))
        self.inflate_vq = by_role[QueueRole.INFLATE]
        self.deflate_vq = by_role[QueueRole.DEFLATE]
        self.stats_vq = by_role.get(QueueRole.STATS)
        self.free_page_vq = by_role.get(QueueRole.FREE_PAGE_HINT)
        self.reporting_vq = by_role.get(QueueRole.REPORTING)
        self.range_inflate_vq = by_role.get(QueueRole.RANGE_INFLATE)
        self.range_deflate_vq = by_role.get(QueueRole.RANGE_DEFLATE)
        self._queue_locks = {vq.index: trio.Lock() for vq in self.queues}
        self._pfn_buf_gpa = self.ram.alloc_reserved(4 * VIRTIO_BALLOON_ARRAY_PFNS_MAX, align=64)
        self._raw_buf_gpa = self.ram.alloc_reserved(RAW_BUFFER_BYTES, align=PAGE_SIZE)
        self._stats_buf_gpa = self.ram.alloc_reserved(_STAT.size * STATS_BUFFER_ENTRIES, align=64)

        self.transport.on_config_change = self.config_changed
        if self.stats_vq is not None:
            # init_vqs primes the stats queue and kicks it, before DRIVER_OK: QEMU's
            # vub_handle_output drops that kick, so the back-end must find the
            # buffer in the ring when the queue starts. No kick here either.
            size = self._write_stats()
            self._stats_head = self.stats_vq.add_buffer([(self._stats_buf_gpa, size)])
            self.stats_vq.kick_needed()  # the kick decision happened (and was lost)
        if self.features & VIRTIO_BALLOON_F_PAGE_POISON:
            # Before DRIVER_OK, so the back-end sees this SET_CONFIG before SET_FEATURES.
            await self.transport.write_config(CONFIG_POISON_VAL, struct.pack("<I", self.poison_val))
        await self.transport.start_guest(self.features, self.ram, self.queues)  # DRIVER_OK
        # virtballoon_probe ends with: if (towards_target(vb)) virtballoon_changed(vdev);
        if await self.towards_target():
            self.config_changed()

    # -- the balloon work ----------------------------------------------------

    def config_changed(self) -> None:
        """virtballoon_changed: queue the size update (a no-op if one is queued)."""
        self.config_changes += 1
        self._config_changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve config changes and stats requests until cancelled."""
        async with trio.open_nursery() as nursery:
            if self.stats_vq is not None:
                nursery.start_soon(self._serve_stats)
            task_status.started()
            while True:
                await self._config_changed.wait()
                self._config_changed = trio.Event()
                self._updating = True
                try:
                    await self.update_balloon_size_func()
                finally:
                    self._updating = False
                    self._signal_progress()

    async def towards_target(self) -> int:
        """Read num_pages (one GET_CONFIG); return target - actual."""
        config = await self.transport.read_config()
        (self.target_pages,) = struct.unpack_from("<I", config, CONFIG_NUM_PAGES)
        return self.target_pages - self.actual_pages

    async def update_balloon_size_func(self) -> None:
        """One pass of Linux's work item, re-run while a difference remains."""
        while True:
            diff = await self.towards_target()
            if diff == 0:
                return
            if diff > 0:
                moved = await self.fill_balloon(diff)
                if moved == 0:  # out of puff: fill_balloon slept 200 ms
                    self.out_of_puff += 1
                diff -= moved
            else:
                diff += await self.leak_balloon(-diff)
            await self.update_balloon_size()
            if diff == 0:
                return

    async def update_balloon_size(self) -> None:
        """Write ``actual``: QEMU turns the guest's 4-byte write into one
        SET_CONFIG of the whole 16-byte config at offset 0."""
        await self.transport.write_config(CONFIG_ACTUAL, struct.pack("<I", self.actual_pages))

    async def fill_balloon(self, num: int) -> int:
        """Take up to 256 free guest pages, tell the host through the inflate
        queue, wait for the buffer to come back. Returns pages inflated.
        With range ballooning: up to RANGES_PER_BUFFER ranges, whole 2 MiB
        blocks first, then 4 KiB pages (fill_ranges)."""
        if self.range_inflate_vq is not None:
            return await self.fill_ranges(num)
        num = min(num, VIRTIO_BALLOON_ARRAY_PFNS_MAX, len(self._free_stack))
        if num <= 0:
            await trio.sleep(OUT_OF_PUFF_SLEEP)
            return 0
        async with self._balloon_lock:
            pfns = self._free_stack[-num:]
            del self._free_stack[-num:]
            pfns.reverse()
            bitmap = self.balloon_bitmap
            for pfn in pfns:
                bitmap[pfn] = 1
            self._balloon_stack.extend(pfns)
            if self.touch_on_inflate:  # CONFIG_INIT_ON_ALLOC_DEFAULT_ON: the guest writes the page first
                self.ram.clear_canary(pfns)
            self.actual_pages += num
            rtt = await self._tell_host(self.inflate_vq, pfns)
            self.inflate_rtt_ns.append(rtt)
            self.inflate_buffers += 1
        self._signal_progress()
        return num

    async def leak_balloon(self, num: int) -> int:
        """Take up to 256 pages out of the balloon (newest first), tell the
        host through the deflate queue, then use them again (their canary is
        rewritten). Returns pages deflated.  With range ballooning: lowest
        order first (leak_ranges)."""
        if self.range_deflate_vq is not None and not self._balloon_stack:
            return await self.leak_ranges(num)
        num = min(num, VIRTIO_BALLOON_ARRAY_PFNS_MAX, len(self._balloon_stack))
        if num <= 0:
            return 0
        async with self._balloon_lock:
            pfns = self._balloon_stack[-num:]
            del self._balloon_stack[-num:]
            pfns.reverse()
            self.actual_pages -= num
            rtt = await self._tell_host(self.deflate_vq, pfns)
            self.deflate_rtt_ns.append(rtt)
            self.deflate_buffers += 1
            # release_pages_balloon: the pages are the guest's again.
            bitmap = self.balloon_bitmap
            for pfn in pfns:
                bitmap[pfn] = 0
            self.ram.touch(pfns)
            pfns.reverse()
            self._free_stack.extend(pfns)
        self._signal_progress()
        return num

    # -- range ballooning (protocol/range-balloon.md) ---------------------------

    def _take_free_blocks(self, count: int) -> list[int]:
        """Up to ``count`` free naturally aligned 2 MiB blocks, highest first,
        taken out of the free pages."""
        blocks = [first for first, _ in reversed(self.free_blocks(RANGE_BLOCK_PAGES))][:count]
        if blocks:
            taken = bytearray(self.ram.num_pages)
            for first in blocks:
                taken[first : first + RANGE_BLOCK_PAGES] = b"\x01" * RANGE_BLOCK_PAGES
            self._free_stack = array("I", (pfn for pfn in self._free_stack if not taken[pfn]))
        return blocks

    async def fill_ranges(self, num: int) -> int:
        """Inflate by ranges, highest order first: whole free 2 MiB blocks
        while at least one fits in ``num``, then 4 KiB pages; one buffer of
        up to RANGES_PER_BUFFER ranges.  Returns pages inflated."""
        limit = min(RANGES_PER_BUFFER, self.range_inflate_vq.num)
        blocks = self._take_free_blocks(min(num // RANGE_BLOCK_PAGES, limit))
        pages_left = num - len(blocks) * RANGE_BLOCK_PAGES
        singles = array("I")
        count = min(pages_left, limit - len(blocks), len(self._free_stack))
        if count > 0:
            singles = self._free_stack[-count:]
            del self._free_stack[-count:]
        ranges = [(first, RANGE_BLOCK_PAGES) for first in blocks] + [(pfn, 1) for pfn in singles]
        if not ranges:
            await trio.sleep(OUT_OF_PUFF_SLEEP)
            return 0
        async with self._balloon_lock:
            pages = 0
            for first, count in ranges:
                self.balloon_bitmap[first : first + count] = b"\x01" * count
                if self.touch_on_inflate:
                    self.ram.clear_canary(range(first, first + count))
                pages += count
            self.range_blocks[9].extend(blocks)
            self.range_blocks[0].extend(singles)
            self.actual_pages += pages
            rtt = await self._send_ranges(self.range_inflate_vq, ranges)
            self.inflate_rtt_ns.append(rtt)
            self.range_buffers += 1
        self._signal_progress()
        return pages

    async def leak_ranges(self, num: int) -> int:
        """Deflate by ranges, lowest order first: 4 KiB pages, then 2 MiB
        blocks, the last one split when less than all of it must go back (its
        other pages stay in the balloon as 4 KiB pages).  Returns pages deflated."""
        limit = min(RANGES_PER_BUFFER, self.range_deflate_vq.num)
        ranges: list[tuple[int, int]] = []
        want = num
        singles = self.range_blocks[0]
        while want > 0 and singles and len(ranges) < limit:
            ranges.append((singles.pop(), 1))
            want -= 1
        blocks = self.range_blocks[9]
        while want > 0 and blocks and len(ranges) < limit:
            first = blocks.pop()
            if want >= RANGE_BLOCK_PAGES:
                ranges.append((first, RANGE_BLOCK_PAGES))
                want -= RANGE_BLOCK_PAGES
            else:  # split: give back the top of the block, keep the rest as 4 KiB pages
                keep = RANGE_BLOCK_PAGES - want
                ranges.append((first + keep, want))
                singles.extend(range(first + keep - 1, first - 1, -1))
                want = 0
        if not ranges:
            return 0
        async with self._balloon_lock:
            pages = sum(count for _, count in ranges)
            self.actual_pages -= pages
            rtt = await self._send_ranges(self.range_deflate_vq, ranges)
            self.deflate_rtt_ns.append(rtt)
            self.range_buffers += 1
            for first, count in ranges:  # the guest's again only now (MUST_TELL_HOST)
                self.balloon_bitmap[first : first + count] = bytes(count)
                pfns = array("I", range(first, first + count))
                self.ram.touch(pfns)
                self._free_stack.extend(pfns)
        self._signal_progress()
        return pages

    async def send_ranges(self, role: QueueRole | str, ranges: Sequence[tuple[int, int]], *,
                          wait: bool = True) -> int | None:
        """Send ``(gpa, length)`` byte ranges as one buffer on a range queue
        exactly as given (unaligned, empty, outside, wrapping, overlapping,
        already ballooned...): the hostile-guest hook; the balloon's
        accounting is not touched.  Returns the used length if waited."""
        vq = self.queue(role)
        async with self._queue_locks[vq.index]:
            head = vq.add_buffer(list(ranges))
            self._kick(vq)
            if not wait:
                return None
            _, written = await self._wait_used(vq, head, f"raw range buffer of {len(ranges)} ranges")
            return written

    async def _send_ranges(self, vq: DriverVirtqueue, ranges: Sequence[tuple[int, int]]) -> int:
        """One buffer of device-readable descriptors, each one range
        (first PFN, pages), kick, wait for it. Returns ns."""
        segments = [(first << PAGE_SHIFT, count << PAGE_SHIFT) for first, count in ranges]
        async with self._queue_locks[vq.index]:
            head = vq.add_buffer(segments)
            start = time.perf_counter_ns()
            self._kick(vq)
            what = "range-inflate" if vq is self.range_inflate_vq else "range-deflate"
            await self._wait_used(vq, head, f"{what} buffer of {len(ranges)} ranges")
            return time.perf_counter_ns() - start

    async def wait_for_target(self, num_pages: int | None = None, *, timeout: float = 60.0) -> int:
        """Wait until the driver is idle with ``actual == target`` (or, given
        ``num_pages``, until actual equals it). Returns actual.

        Without ``num_pages`` the target is the last ``num_pages`` the driver
        read: called before the back-end's CONFIG_CHANGE_MSG has arrived, it
        returns at once. Pass the expected page count to avoid that race."""
        with trio.fail_after(timeout):
            while True:
                goal = self.target_pages if num_pages is None else num_pages
                if self.idle and self.actual_pages == goal:
                    return self.actual_pages
                await self._progress.wait()

    # -- views ---------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No size update running or queued."""
        return not self._updating and not self._config_changed.is_set()

    @property
    def balloon_pfns(self) -> array:
        """A copy of the PFNs in the balloon, in inflate order (PFN-ballooned
        pages, then range-ballooned ones by order)."""
        pfns = array("I", self._balloon_stack)
        for order, firsts in sorted(self.range_blocks.items()):
            for first in firsts:
                pfns.extend(range(first, first + (1 << order)))
        return pfns

    @property
    def free_pages(self) -> int:
        return len(self._free_stack)

    def guest_owned_pfns(self) -> array:
        """A copy of the guest pages not in the balloon (outside the reserved area)."""
        return array("I", self._free_stack)

    # -- free page reporting ---------------------------------------------------

    async def report_free_pages(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Report ``(first_pfn, num_pages)`` ranges as free (REPORTING queue):
        one device-writable buffer, one range per segment, as Linux does.
        The pages stay the guest's but their content is gone afterwards.
        Returns the bytes written by the device (Linux ignores it)."""
        if self.reporting_vq is None:
            raise DriverError("free page reporting was not negotiated")
        if not 0 < len(ranges) <= PAGE_REPORTING_CAPACITY:
            raise DriverError(f"a report holds 1..{PAGE_REPORTING_CAPACITY} ranges, got {len(ranges)}")
        for first, count in ranges:
            if first < self.ram.reserved_pages or first + count > self.ram.num_pages or count <= 0:
                raise DriverError(f"report range {first:#x}+{count} is outside the guest's ordinary pages")
            if any(self.balloon_bitmap[first : first + count]):
                raise DriverError(f"report range {first:#x}+{count} overlaps the balloon")
        segments = [(first << PAGE_SHIFT, count << PAGE_SHIFT) for first, count in ranges]
        async with self._queue_locks[self.reporting_vq.index]:
            head = self.reporting_vq.add_buffer((), segments)
            self._kick(self.reporting_vq)
            _, written = await self._wait_used(self.reporting_vq, head, f"report of {len(ranges)} ranges")
            self.report_buffers += 1
        return written

    async def report_in_buffers(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Report any number of ``(first_pfn, num_pages)`` ranges, 32 per
        buffer, one buffer at a time as page_reporting_process does.
        Returns the number of buffers sent."""
        buffers = 0
        for at in range(0, len(ranges), PAGE_REPORTING_CAPACITY):
            await self.report_free_pages(ranges[at : at + PAGE_REPORTING_CAPACITY])
            buffers += 1
        return buffers

    def free_blocks(self, pages_per_block: int = 512) -> list[tuple[int, int]]:
        """Naturally aligned blocks of ``pages_per_block`` guest pages (2 MiB
        by default: x86's pageblock) with no page in the balloon: what a
        guest could report if it freed them.  ``(first_pfn, num_pages)``."""
        blocks = []
        bitmap = self.balloon_bitmap
        first = -(-self.ram.reserved_pages // pages_per_block) * pages_per_block
        for start in range(first, self.ram.num_pages - pages_per_block + 1, pages_per_block):
            if not any(bitmap[start : start + pages_per_block]):
                blocks.append((start, pages_per_block))
        return blocks

    async def send_report(self, segments: Sequence[tuple[int, int]], *, wait: bool = True) -> int | None:
        """Send ``(gpa, length)`` byte ranges as one reporting buffer exactly
        as given (out of guest memory, misaligned, zero length, overlapping,
        ballooned...): the hostile-guest hook.  Returns the used length if waited."""
        vq = self.reporting_vq
        if vq is None:
            raise DriverError("free page reporting was not negotiated")
        async with self._queue_locks[vq.index]:
            head = vq.add_buffer((), list(segments))
            self._kick(vq)
            if not wait:
                return None
            _, written = await self._wait_used(vq, head, f"raw report of {len(segments)} entries")
            self.report_buffers += 1
            return written

    # -- deflate on OOM ----------------------------------------------------------

    async def oom_deflate(self, num: int = VIRTIO_BALLOON_OOM_NR_PAGES) -> int:
        """virtio_balloon_oom_notify: the guest is out of memory, so it takes
        up to ``num`` pages back from the balloon (deflate queue, as always
        before using them) and writes the new ``actual``, with no target
        change.  Needs DEFLATE_ON_OOM.  Returns pages deflated."""
        if not self.features & VIRTIO_BALLOON_F_DEFLATE_ON_OOM:
            raise DriverError("DEFLATE_ON_OOM was not negotiated: Linux registers no OOM notifier")
        freed = 0
        while freed < num:
            moved = await self.leak_balloon(num - freed)
            if moved == 0:
                break
            freed += moved
        await self.update_balloon_size()
        self.oom_deflates += 1
        self._signal_progress()
        return freed

    # -- hooks for bad-input tests --------------------------------------------

    def queue(self, role: QueueRole | str) -> DriverVirtqueue:
        role = QueueRole(role)
        for queue_role, vq in zip(self.roles, self.queues):
            if queue_role is role:
                return vq
        raise DriverError(f"no {role.value} queue (features {self.features:#x})")

    async def send_pfns(self, role: QueueRole | str, pfns: Iterable[int], *, wait: bool = True) -> int | None:
        """Send any PFN list (out of range, duplicates, over 256, reserved
        pages...) as one buffer on the inflate or deflate queue, without
        touching the balloon's accounting. Returns the used length if waited."""
        data = array("I", pfns).tobytes()
        return await self.send_raw_buffer(role, data, wait=wait)

    async def send_raw_buffer(self, role: QueueRole | str, data: bytes, *, wait: bool = True) -> int | None:
        """Send arbitrary bytes (e.g. 3 bytes: not a whole PFN) as one
        device-readable buffer on a queue. Returns the used length if waited."""
        if len(data) > RAW_BUFFER_BYTES:
            raise DriverError(f"raw buffer of {len(data)} bytes exceeds the {RAW_BUFFER_BYTES}-byte scratch area")
        vq = self.queue(role)
        if vq is self.stats_vq:
            raise DriverError("the stats queue is served by run(); send raw buffers on another queue")
        async with self._queue_locks[vq.index]:
            self.ram.write(self._raw_buf_gpa, data)
            head = vq.add_buffer([(self._raw_buf_gpa, len(data))])
            self._kick(vq)
            if not wait:
                return None
            _, written = await self._wait_used(vq, head, f"raw buffer of {len(data)} bytes")
            return written

    def kick(self, role: QueueRole | str, *, force: bool = True) -> None:
        """Kick a queue after a ``publish_*`` on it (force ignores event idx)."""
        vq = self.queue(role)
        if vq.kick_needed() or force:
            self.transport.kick(vq.index)

    # -- internals --------------------------------------------------------------

    def _kick(self, vq: DriverVirtqueue) -> None:
        if vq.kick_needed():
            self.transport.kick(vq.index)

    async def _tell_host(self, vq: DriverVirtqueue | None, pfns: array) -> int:
        """tell_host: one out buffer of le32 PFNs, kick, wait for it. Returns ns."""
        if vq is None:
            raise DriverError("the driver has no queues yet: call probe() first")
        data = pfns.tobytes()
        gpa = self._pfn_buf_gpa
        self.ram.mem[gpa : gpa + len(data)] = data
        async with self._queue_locks[vq.index]:
            head = vq.add_buffer([(gpa, len(data))])
            start = time.perf_counter_ns()
            self._kick(vq)
            what = "inflate" if vq is self.inflate_vq else "deflate"
            await self._wait_used(vq, head, f"{what} buffer of {len(pfns)} PFNs")
            return time.perf_counter_ns() - start

    async def _wait_used(self, vq: DriverVirtqueue, head: int, what: str) -> tuple[int, int]:
        with trio.move_on_after(self.buffer_timeout) as scope:
            while True:
                for used_head, written in vq.get_used():  # others: earlier unwaited raw buffers
                    if used_head == head:
                        return used_head, written
                await self.transport.wait_call(vq.index)
        assert scope.cancelled_caught
        raise DeviceTimeout(
            f"queue {vq.index}: {what} (head {head}) not returned by the device within {self.buffer_timeout} s "
            f"(avail idx {vq.avail_idx}, used idx {vq.used_idx()})"
        )

    async def _serve_stats(self) -> None:
        """stats_request + stats_handle_request: refill the stats buffer each
        time the device returns it."""
        vq = self.stats_vq
        assert vq is not None
        while True:
            returned = vq.get_used()
            if returned:
                size = self._write_stats()
                self._stats_head = vq.add_buffer([(self._stats_buf_gpa, size)])
                self.stats_buffers += 1
                self._kick(vq)
                continue
            await self.transport.wait_call(vq.index)

    def _write_stats(self) -> int:
        """Fill the stats buffer with fresh numbers; returns its size in bytes."""
        free = (len(self._free_stack)) * PAGE_SIZE
        total = self.ram.size - self.actual_pages * PAGE_SIZE
        values = (
            (VIRTIO_BALLOON_S_SWAP_IN, 0),
            (VIRTIO_BALLOON_S_SWAP_OUT, 0),
            (VIRTIO_BALLOON_S_MAJFLT, 0),
            (VIRTIO_BALLOON_S_MINFLT, self.inflate_buffers + self.deflate_buffers),
            (VIRTIO_BALLOON_S_MEMFREE, free),
            (VIRTIO_BALLOON_S_MEMTOT, total),
            (VIRTIO_BALLOON_S_AVAIL, free),
            (VIRTIO_BALLOON_S_CACHES, 0),
            (VIRTIO_BALLOON_S_HTLB_PGALLOC, 0),
            (VIRTIO_BALLOON_S_HTLB_PGFAIL, 0),
        )
        values += tuple(self.extra_stats.items())
        if len(values) > STATS_BUFFER_ENTRIES:
            raise DriverError(f"{len(values)} stats do not fit the {STATS_BUFFER_ENTRIES}-entry stats buffer")
        for i, (tag, val) in enumerate(values):
            _STAT.pack_into(self.ram.mem, self._stats_buf_gpa + i * _STAT.size, tag, val)
        return _STAT.size * len(values)

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

