"""The session's memory lock: held by whoever reads the rings or changes the
memory table, so a discard running in a worker thread never sees its mapping
go, and a deflate can never overtake the discard of an inflate."""

from __future__ import annotations

import trio

from ..native import NativeLock


class MemoryLock:
    """A trio lock among the session's tasks, plus the NativeLock its C
    queue threads take.  The native one is taken without blocking the event
    loop (a C thread may hold it through a discard)."""

    def __init__(self, native: NativeLock | None = None) -> None:
        self.native = native if native is not None else NativeLock()
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        try:
            if not self.native.try_acquire():
                await trio.to_thread.run_sync(self.native.acquire)
        except BaseException:
            self._lock.release()
            raise

    async def __aexit__(self, *exc_info) -> None:
        self.native.release()
        self._lock.release()
