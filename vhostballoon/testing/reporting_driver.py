"""The model guest's free page reporting (Linux mm/page_reporting.c and
virtio_balloon.c's reporting queue): a mixin of BalloonDriver, which holds
the queue and the balloon's bitmap."""

from __future__ import annotations

from collections.abc import Sequence

from .driver_errors import DriverError
from .guest_ram import PAGE_SHIFT
from .virtio_balloon import PAGE_REPORTING_CAPACITY


class PageReporting:
    """Report free ranges of guest memory, 32 per buffer, as Linux does."""

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
