"""Serving the statistics queue (a trio task of the session).

The guest posts one buffer of (tag, value) pairs and waits for it to come
back; the device decodes it and holds it until fresh numbers are wanted (a
timer every ``stats-interval`` seconds, or the operator), as QEMU's own
balloon does.  A second buffer replaces the first, which goes back at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import structlog
import trio

from ..device.balloon import BalloonDevice
from ..device.queues import QueueRole
from ..native import GuestMemory, RingError
from .memory_lock import MemoryLock
from .rings import QueueState, Rings

log = structlog.get_logger("vhostballoon.session")


class StatsServer:
    def __init__(
        self,
        *,
        memory: GuestMemory,
        memory_lock: MemoryLock,
        device: BalloonDevice,
        rings: Rings,
        interval: Callable[[], float],
    ) -> None:
        self.memory = memory
        self.memory_lock = memory_lock
        self.device = device
        self.rings = rings
        self.interval = interval
        self._wakeup = trio.Event()

    async def serve(self, q: QueueState, scope: trio.CancelScope) -> None:
        async with self.memory_lock:
            with trio.CancelScope(shield=True):
                try:
                    buffers = q.vq.pop_ranges(self.memory, writable=False)
                except RingError as exc:
                    self.rings.ring_broken(q, str(exc))
                    return
                if not buffers:
                    return
                head, descs = buffers[-1]
                self.device.record_stats(descs)
                give_back = [h for h, _ in buffers[:-1]]
                if q.held_head is not None:
                    give_back.insert(0, q.held_head)
                q.held_head = head
                if give_back:
                    log.info("guest posted another stats buffer while one was held: the older goes back",
                             queue=q.index, returned=len(give_back))
                    q.give_back(give_back)
        log.debug("guest statistics", updates=self.device.stats.updates, stats=len(self.device.stats.values))

    async def request(self) -> bool:
        """Return the held stats buffer so the guest refills it with fresh
        numbers; False when none is held (no stats queue, not started, or
        the guest has not refilled the last one yet)."""
        q = self.rings.queue_of(QueueRole.STATS)
        if q is None:
            return False
        async with self.memory_lock:
            if q.held_head is None or not q.running:
                return False
            head, q.held_head = q.held_head, None
            try:
                q.give_back([head])
            except RingError as exc:
                log.warning("stats queue no longer usable", queue=q.index, error=str(exc))
                return False
        return True

    async def timer(self) -> None:
        """Ask for fresh statistics every ``stats-interval`` seconds (0: never)."""
        while True:
            wakeup = self._wakeup = trio.Event()
            interval = self.interval()
            with trio.move_on_after(interval if interval > 0 else math.inf):
                await wakeup.wait()
            if not wakeup.is_set():
                await self.request()

    def interval_changed(self, nursery: trio.Nursery | None) -> None:
        """The operator changed the interval: restart the timer, and fetch
        fresh numbers now if polling is on."""
        self._wakeup.set()
        if self.interval() > 0 and nursery is not None:
            nursery.start_soon(self.request)
