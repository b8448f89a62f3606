"""The model guest's range ballooning (protocol/range-balloon.md): what this
project's guest driver (guest/linux/) does when the device offers
VIRTIO_BALLOON_F_RANGES.  A mixin of BalloonDriver, which holds the state
(``range_blocks``, the queues, the free pages) and chooses it when the
range queues were negotiated."""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence

import trio

from .guest_ram import PAGE_SHIFT
from .virtio_balloon import OUT_OF_PUFF_SLEEP, RANGE_BLOCK_PAGES, QueueRole
from .virtqueue import DriverVirtqueue

RANGES_PER_BUFFER = 64  # the range driver's ranges per buffer (one descriptor each, ring permitting)


class RangeBallooning:
    """Inflate highest order first, deflate lowest order first, by ranges."""

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
