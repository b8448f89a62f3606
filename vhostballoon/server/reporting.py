"""Serving the free page reporting queue (a trio task of the session).

Each reporting buffer lists free ranges of guest memory (device-writable
descriptors, the EXTENTS format); ``device.reporting`` checks every entry
(alignment, inside guest memory, no overlap within the buffer or with a
ballooned page, poison, huge page policy) and says what may be freed.  The
buffer goes back at once, used length 0: the guest blocks until it does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
import trio

from ..device.balloon import BalloonDevice
from ..device.hugepages import HugePolicy
from ..device.reporting import ReportPlan
from ..native import GuestMemory, RangeList, RingError
from .memory_lock import MemoryLock
from .rings import QueueState

log = structlog.get_logger("vhostballoon.session")

# Reporting buffers with invalid entries logged per connection; later ones are only counted.
INVALID_REPORT_LOG_LIMIT = 20


class ReportServer:
    def __init__(
        self,
        *,
        memory: GuestMemory,
        memory_lock: MemoryLock,
        device: BalloonDevice,
        policy: Callable[[], HugePolicy],
        discard: Callable[[RangeList], Awaitable[tuple]],
        ring_broken: Callable[[QueueState, str], None],
    ) -> None:
        self.memory = memory
        self.memory_lock = memory_lock
        self.device = device
        self.policy = policy
        self.discard = discard
        self.ring_broken = ring_broken
        self._invalid_logged = 0
        self._unnatural_logged = False

    async def serve(self, q: QueueState, scope: trio.CancelScope) -> None:
        """Free what each available reporting buffer lists, then return it."""
        whole_only = self.policy() is HugePolicy.WHOLE
        async with self.memory_lock:
            with trio.CancelScope(shield=True):  # pop -> push: see rings.py
                while not scope.cancel_called:
                    try:
                        buffers = q.vq.pop_ranges(self.memory, writable=True)
                    except RingError as exc:
                        self.ring_broken(q, str(exc))
                        return
                    if not buffers:
                        break
                    free: list[tuple[int, int]] = []
                    for head, descs in buffers:
                        plan = self.device.plan_report(descs, whole_huge_pages_only=whole_only)
                        self._log(q, head, plan)
                        free.extend(plan.free)
                    if free:
                        stats, measured = await self.discard(RangeList.from_list(free))
                        self.device.record_report_discard(stats, measured)
                    q.give_back([head for head, _ in buffers])

    def _log(self, q: QueueState, head: int, plan: ReportPlan) -> None:
        log.debug(
            "free pages reported",
            queue=q.index, head=head, entries=plan.entries, reported=plan.reported_bytes,
            freeing=plan.free_bytes, skipped={k.value: v for k, v in plan.skipped.items()},
            invalid=len(plan.invalid),
        )
        if plan.invalid:
            self._invalid_logged += 1
            if self._invalid_logged <= INVALID_REPORT_LOG_LIMIT:
                d, reason = plan.invalid[0]
                log.warning(
                    "invalid free page report entries: skipped, never freed",
                    queue=q.index, head=head, count=len(plan.invalid),
                    reasons=sorted({r.value for _, r in plan.invalid}),
                    first_addr=hex(d.addr), first_len=d.length, first_reason=reason.value,
                    guest_ram=self.memory.total_bytes,
                )
                if self._invalid_logged == INVALID_REPORT_LOG_LIMIT:
                    log.warning("further invalid report entries are counted (query-balloon), not logged")
        if plan.unnatural and not self._unnatural_logged:
            self._unnatural_logged = True  # legal, freed; worth one line per connection
            d = plan.unnatural[0]
            log.info(
                "reported range is not a naturally aligned power of two (freed anyway; "
                "Linux reports whole buddy blocks, so the guest's page reporting order may be lowered)",
                addr=hex(d.addr), len=d.length,
            )
