"""The session's page state on disk: restored when the balloon queues first
start, snapshotted on a timer and when the journal fills (persist.py has the
format and the argument).  Snapshots run in a worker thread, under the
memory lock, so the event loop keeps answering the front-end."""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio

from ..device.balloon import BalloonDevice
from ..device.queues import QueueRole, SPECS
from .flushing import Discarder
from .memory_lock import MemoryLock
from .persist import SessionPersistence
from .rings import QueueState, Rings

log = structlog.get_logger("vhostballoon.session")


class PageState:
    def __init__(
        self,
        *,
        persist: SessionPersistence,
        memory_lock: MemoryLock,
        device: BalloonDevice,
        rings: Rings,
        discard: Discarder,
        flush_soon: Callable[[str], None],
    ) -> None:
        self.persist = persist
        self.memory_lock = memory_lock
        self.device = device
        self.rings = rings
        self.discard = discard
        self.flush_soon = flush_soon

    async def start(self, q: QueueState) -> None:
        """When a queue whose pages are journaled first starts (memory table
        and ring bases known, nothing served yet): bring back the saved page
        state if it is this guest's, then record every change."""
        role = self.device.role_of(q.index)
        if self.persist.started or role is None or SPECS[role].journal_kind is None:
            return
        if not self.rings.ready_to_serve(q):
            return
        inflate = self.rings.queue_of(QueueRole.INFLATE)
        base = inflate.base if inflate is not None else 0
        async with self.memory_lock:
            with trio.CancelScope(shield=True):
                restored = self.persist.restore(inflate_base=base)
                if restored is not None:
                    if len(restored.refree):
                        await self.discard(restored.refree)
                    if restored.actual is not None:
                        self.device.config.actual = restored.actual
                self.persist.start(inflate_base=base, actual=self.device.config.actual)
        if restored is not None:
            log.info(
                "page state restored from the state directory",
                ballooned_pages=restored.ballooned_pages, pending_bytes=restored.pending_bytes,
                journal_records=restored.journal_records, actual_pages=self.device.config.actual,
                freed_again_bytes=restored.refree.total_bytes, path=str(self.persist.store.directory),
            )
            self.flush_soon("restored")

    async def snapshot(self, reason: str) -> None:
        async with self.memory_lock:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.persist.snapshot, reason)

    async def timer(self) -> None:
        """Rewrite the page snapshot every snapshot_interval while something changed."""
        while True:
            await trio.sleep(max(self.persist.snapshot_interval, 0.05))
            if self.persist.snapshot_due():
                await self.snapshot("interval")

    async def snapshot_if_half_full(self) -> None:
        if self.persist.snapshot_soon():
            await self.snapshot("journal half full")
