"""The session's queues: ring set-up, and serving them behind one interface.

Who serves a queue is data (``device/queues.py``): inflate and deflate are
served by C threads (``native.QueueWorker``: one pass per kick pops the
buffers, updates the balloon bitmap and the huge page tracker, frees, fills
the used ring and signals; the session is woken through a notify eventfd
only for what it must log or act on); reporting and stats by trio tasks
(``reporting.py``, ``stats_queue.py``).  Both kinds are a ``QueueServer``:
started when the queue is enabled, kicked and set up, stopped by
GET_VRING_BASE, a new kick fd, a disable, a reset or a broken ring.  A
popped batch is processed to the end (bitmap, discard, used ring, call)
before its queue can stop: a C thread honours a stop request only between
batches, and the Python queues run pop to push shielded from cancellation.

The C threads keep their own counters; ``absorb()`` brings what they did
since the last look into the device's counters and says what must be
logged.  A stopped C thread is joined off the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ..device.balloon import BalloonDevice
from ..device.hugepages import FlushPolicy, HugePolicy
from ..device.queues import MAX_QUEUES, SPECS, Direction, QueueRole, Server
from ..native import PAGE_SIZE, ConfigMailbox, GuestMemory, QueueWorker, RingError, Virtqueue, WorkerCounters
from ..vhost_user import connection as vu
from .memory_lock import MemoryLock
from .transport import close_fds

log = structlog.get_logger("vhostballoon.session")

# A Python-served queue's loop body: serve what is available (pop to push).
TaskBody = Callable[["QueueState", trio.CancelScope], Awaitable[None]]


def flush_threshold_pages(policy: FlushPolicy) -> int:
    """What a C inflate thread is told: collect pending pages once this many
    are pending (0: never).  Deadlines and "guest at target" stay with the
    session's FlushPolicy."""
    if policy.mode is HugePolicy.WHOLE:
        return 0
    if policy.mode is HugePolicy.EAGER:
        return 1
    return max(1, policy.flush_bytes // PAGE_SIZE)


def signal_eventfd(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:  # counter saturated: the peer has a wakeup pending anyway
        pass


class CThreadServer:
    """A queue served by a C thread."""

    def __init__(self, worker: QueueWorker, role: QueueRole) -> None:
        self.worker = worker
        self.role = role
        self.seen = WorkerCounters()  # its counters as last absorbed

    def stop(self) -> None:
        self.worker.request_stop()

    def take_work(self) -> tuple[WorkerCounters, WorkerCounters]:
        """(counters now, what it did since the last call)."""
        now = self.worker.counters()
        work = now.minus(self.seen)
        self.seen = now
        return now, work


class TaskServer:
    """A queue served by a trio task of the session."""

    worker = None

    def __init__(self, scope: trio.CancelScope, role: QueueRole) -> None:
        self.scope = scope
        self.role = role

    def stop(self) -> None:
        self.scope.cancel()


@dataclass
class QueueState:
    index: int
    vq: Virtqueue
    num: int | None = None
    addr: vu.VringAddrSet | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    broken: str | None = None
    server: CThreadServer | TaskServer | None = None
    buffers: int = 0
    signals: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    held_head: int | None = None  # stats queue: the guest's buffer, kept until fresh numbers are wanted

    @property
    def running(self) -> bool:
        return self.server is not None

    @property
    def worker(self) -> QueueWorker | None:
        return self.server.worker if self.server is not None else None

    def give_back(self, heads: list[int]) -> None:
        """Return buffers unused (used len 0) and signal if the driver wants it."""
        self.vq.push_used(heads, [0] * len(heads))
        self.buffers += len(heads)
        if self.vq.should_signal():
            signal_eventfd(self.call_fd)
            self.signals += 1


class Rings:
    """The device's queues and what serves them."""

    def __init__(
        self,
        *,
        memory: GuestMemory,
        memory_lock: MemoryLock,
        device: BalloonDevice,
        notify_fd: int,
        tasks: dict[QueueRole, TaskBody],
        flush_policy: Callable[[], FlushPolicy],
        journal: Callable[[], Any],
        config: ConfigMailbox,
    ) -> None:
        self.memory = memory
        self.memory_lock = memory_lock
        self.device = device
        self.notify_fd = notify_fd
        self.tasks = tasks
        self.flush_policy = flush_policy
        self.journal = journal
        self.config = config
        self.queues = [QueueState(i, Virtqueue(i)) for i in range(MAX_QUEUES)]
        self.nursery: trio.Nursery | None = None
        self._stopping: list[tuple[QueueState, CThreadServer]] = []
        self.on_discard_failure: Callable[[Any], None] = lambda stats: None

    def __getitem__(self, index: int) -> QueueState:
        return self.queues[index]

    def queue_of(self, role: QueueRole) -> QueueState | None:
        roles = self.device.roles
        return self.queues[roles.index(role)] if role in roles else None

    # -- rings ---------------------------------------------------------------

    def setup(self, q: QueueState, *, keep_position: bool = False) -> None:
        """Map the rings.  keep_position (guest memory changed under a
        running ring): carry on where the device was, held stats buffer
        included, instead of going back to SET_VRING_BASE's base."""
        a = q.addr
        position = q.vq.position if keep_position and q.vq.ready else None
        q.vq.setup(
            self.memory, q.num, a.desc, a.avail, a.used, q.base,
            event_idx=self.device.event_idx, indirect=self.device.indirect,
        )
        if position is not None:
            q.vq.restore_position(*position)
        else:
            q.held_head = None

    def memory_changed(self) -> None:
        """Ring pointers point into the mappings: set the rings up again
        (memory lock held)."""
        for q in self.queues:
            if q.addr is not None and q.num is not None:
                try:
                    self.setup(q, keep_position=True)
                except RingError as exc:
                    self.stop(q)
                    log.warning("ring no longer in guest memory", queue=q.index, error=str(exc))

    def replace_fd(self, q: QueueState, name: str, fd: int | None) -> None:
        old = getattr(q, name)
        if old is not None and old != fd:
            if name == "kick_fd":
                trio.lowlevel.notify_closing(old)
            close_fds([old])
        setattr(q, name, fd)

    async def set_call_fd(self, q: QueueState, fd: int | None) -> None:
        if q.worker is not None:
            async with self.memory_lock:  # the C thread signals its own copy
                if q.worker is not None:
                    q.worker.set_call_fd(fd)
        self.replace_fd(q, "call_fd", fd)

    async def stop_ring(self, q: QueueState) -> int:
        """GET_VRING_BASE: stop serving, in-flight work finishes first; the
        index to resume from."""
        self.stop(q)
        async with self.memory_lock:
            base = q.vq.last_avail_idx if q.vq.ready else q.base
            if q.held_head is not None:
                # The held stats buffer was never used: hand it back as not
                # consumed, so a restarted ring pops it again and the guest,
                # which waits for it, does not lose its statistics for good.
                base = (base - 1) & 0xFFFF
                q.held_head = None
        q.base = base
        q.enabled = False
        self.replace_fd(q, "kick_fd", None)
        log.info("ring stopped", queue=q.index, last_avail_idx=base, buffers=q.buffers)
        return base

    def reset(self) -> None:
        """RESET_DEVICE: every ring forgotten (servers stopped first, memory lock held)."""
        for q in self.queues:
            q.enabled = False
            q.broken = None
            q.num = q.addr = None
            q.base = 0
            q.held_head = None
            q.vq = Virtqueue(q.index)

    # -- serving -------------------------------------------------------------

    def ready_to_serve(self, q: QueueState) -> bool:
        return q.enabled and q.kick_fd is not None and q.vq.ready and not q.broken

    def maybe_start(self, q: QueueState) -> None:
        role = self.device.role_of(q.index)
        if q.running or not self.ready_to_serve(q):
            return
        spec = SPECS.get(role) if role is not None else None
        if spec is None or spec.served_by is Server.NONE:
            # Free page hinting is never offered; a queue beyond the
            # negotiated ones (QEMU enables all num_vqs) has no role.
            log.info("queue not served", queue=q.index, role=role.value if role else None)
            return
        if spec.served_by is Server.C_THREAD:
            try:
                worker = QueueWorker(
                    self.memory, self.memory_lock.native, q.vq, format=spec.format,
                    inflate=spec.direction is Direction.INFLATE, journal_kind=spec.journal_kind,
                    kick_fd=q.kick_fd, call_fd=q.call_fd, notify_fd=self.notify_fd,
                    flush_pages=flush_threshold_pages(self.flush_policy()),
                    journal=self.journal(), config=self.config,
                )
            except RingError as exc:
                log.error("queue not started", queue=q.index, error=str(exc))
                return
            q.server = CThreadServer(worker, role)
        else:
            scope = trio.CancelScope()
            q.server = TaskServer(scope, role)
            self.nursery.start_soon(self._serve_task, q, self.tasks[role], scope)
        log.info("queue started", queue=q.index, role=role.value, num=q.num)

    async def _serve_task(self, q: QueueState, body: TaskBody, scope: trio.CancelScope) -> None:
        with scope:
            kick_fd = q.kick_fd
            while True:
                # Buffers may be there before the first kick: Linux primes the
                # stats queue before DRIVER_OK, and QEMU drops that kick.
                await body(q, scope)
                await trio.lowlevel.wait_readable(kick_fd)
                try:
                    os.eventfd_read(kick_fd)
                except BlockingIOError:
                    pass

    def stop(self, q: QueueState) -> None:
        """Stop serving q.  A C thread finishes its batch first: once the
        caller holds the memory lock it no longer touches the queue; it is
        joined in the background (or by the session's aclose())."""
        server, q.server = q.server, None
        if server is None:
            return
        server.stop()
        if isinstance(server, CThreadServer):
            self._stopping.append((q, server))
            if self.nursery is not None:
                self.nursery.start_soon(self._reap, q, server)

    async def _reap(self, q: QueueState, server: CThreadServer) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.worker.join)
        if (q, server) in self._stopping:  # the session's aclose() may have reaped it meanwhile
            self._stopping.remove((q, server))
            self._retire(q, server)

    def _retire(self, q: QueueState, server: CThreadServer) -> None:
        self._absorb(q, server)
        server.worker.free()

    def c_servers(self):
        for q in self.queues:
            if isinstance(q.server, CThreadServer):
                yield q, q.server
        yield from self._stopping

    def inflate_workers(self):
        return [s.worker for q, s in self.c_servers() if s.role is QueueRole.INFLATE and q.server is s]

    def set_flush_policy(self, policy: FlushPolicy) -> None:
        for _, server in self.c_servers():
            server.worker.set_flush_pages(flush_threshold_pages(policy))

    def absorb(self) -> None:
        """Bring the C threads' counters into the device's and act on what
        they report."""
        for q, server in list(self.c_servers()):
            self._absorb(q, server)

    def _absorb(self, q: QueueState, server: CThreadServer) -> None:
        now, work = server.take_work()
        self.device.record_queue_work(server.role, work)
        q.buffers += work.buffers
        q.signals += work.signals
        if work.discard.bytes_failed:
            self.on_discard_failure(work.discard)
        if work.flushes:
            log.info("pending partial huge pages freed", reason="flush-bytes reached", queue=q.index,
                     thp_splits_so_far=self.device.counters.discard.splits,
                     policy=self.flush_policy().mode.value)
        if work.journal_dropped:
            log.error("page journal full and no snapshot could be written: a back-end restart may now "
                      "forget ballooned pages (see the snapshot error above)",
                      queue=q.index, records_dropped=work.journal_dropped)
        if now.broken and not q.broken and server is q.server:
            self.ring_broken(q, now.broken)

    def ring_broken(self, q: QueueState, reason: str) -> None:
        q.broken = reason
        log.error("malformed ring from the guest: queue stopped", queue=q.index, error=reason)
        signal_eventfd(q.err_fd)
        self.stop(q)

    def broken_queues(self) -> dict[int, str]:
        return {q.index: q.broken for q in self.queues if q.broken}

    def join_stopped(self) -> None:
        """Wait for the stopped C threads to end (blocking: run it in a
        thread; they must be gone before the memory they serve is unmapped)."""
        for _, server in list(self._stopping):
            server.worker.join()

    def retire_stopped(self) -> None:
        """Count what the joined C threads did last, and free them."""
        while self._stopping:
            q, server = self._stopping.pop()
            server.worker.join()  # at once: joined already
            self._retire(q, server)

    def stop_all(self) -> None:
        for q in self.queues:
            self.stop(q)

    def close_fds(self) -> None:
        for q in self.queues:
            for name in ("kick_fd", "call_fd", "err_fd"):
                self.replace_fd(q, name, None)
