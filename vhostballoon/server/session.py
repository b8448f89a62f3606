"""One front-end connection: the vhost-user conversation, the queues, the discards.

The protocol itself (framing, validation, state) is the sans-I/O
BackendConnection; this module does the I/O it asks for: mapping guest
memory, waiting on kick eventfds, signalling call eventfds, running discards
in a worker thread, and talking on the backend channel.

Queues and what serves them: inflate and deflate are served by C threads
(native.QueueWorker: one pass per kick pops the PFN arrays, updates the
balloon bitmap and the huge page tracker, frees, fills the used ring and
signals; the session is woken through a notify eventfd only for what it must
log or act on); reporting (free ranges checked by
device.reporting and discarded, the buffer returned at once), stats (the
guest's one buffer is decoded and held; a timer returns it every
``stats-interval`` seconds so the guest refills it).  Free page hinting is
never offered, so never served.

Concurrency rules:
- ``memory_lock`` (a trio lock plus the C workers' NativeLock) is held by
  whoever reads the rings or changes the memory table, so a discard running
  in a worker thread never sees its mapping go.
- GET_CONFIG never takes that lock: a guest vCPU waits on it synchronously.
- A popped batch is processed to the end (bitmap, discard, used ring, call)
  before its queue can stop: a C worker honours a stop request only between
  batches, and the Python queues run pop to push shielded from cancellation;
  a stopped queue takes no further batch.  The one buffer deliberately held across time is
  the guest's stats buffer; GET_VRING_BASE hands it back as not consumed.
- Deflate is sacred: a page the guest took back leaves the huge page
  tracker before anything else can free it, and a report overlapping a
  ballooned page is refused (device.reporting says why it never happens
  with a correct guest).
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog
import trio

from ..device.balloon import BalloonDevice, FeatureError, plain_actual_step
from ..device.config import ACTUAL_OFFSET, CONFIG_SIZE, ConfigAccessError
from ..device.queues import MAX_QUEUES, SPECS, Direction, QueueRole
from ..device.hugepages import FlushPolicy, HugePageTracker, HugePolicy
from ..device.reporting import ReportPlan
from ..native import (
    PAGE_SIZE,
    FrontReader,
    GuestMemory,
    MemoryTableError,
    NativeLock,
    QueueWorker,
    RangeList,
    RingError,
    Virtqueue,
    WorkerCounters,
)
from ..vhost_user import connection as vu
from ..vhost_user.constants import MAX_MEM_SLOTS, VHOST_USER_F_PROTOCOL_FEATURES, BackendRequest, ProtocolFeature
from ..vhost_user.errors import ProtocolError
from .persist import SessionPersistence
from .transport import FdStream, close_fds

log = structlog.get_logger("vhostballoon.session")

# What the balloon offers on the vhost-user level: everything the connection
# implements (MQ, REPLY_ACK, BACKEND_REQ, CONFIG, CONFIGURE_MEM_SLOTS,
# RESET_DEVICE, STATUS); none of it claims migration support (no LOG_SHMFD,
# DEVICE_STATE or POSTCOPY).
PROTOCOL_FEATURES = int(vu.SUPPORTED_PROTOCOL_FEATURES)
BACKEND_REPLY_TIMEOUT = 5.0  # seconds to wait for the front-end's ack of CONFIG_CHANGE_MSG
# Reporting buffers with invalid entries logged per connection; later ones are only counted.
INVALID_REPORT_LOG_LIMIT = 20
# The guest's writes of ``actual`` taken by the reader thread are replayed
# (events, accounting) at most this often, in batches; a write that reaches
# the target is replayed at once (target_fd).
CONFIG_WRITES_INTERVAL = 0.05
TRUNCATED_FDS = (
    "peer sent more fds than a vhost-user message may carry (8); ancillary data truncated"
)


class SessionClosed(Exception):
    """The session ended because of bad input; the reason was logged."""


class MemoryLock:
    """The session's memory lock: a trio lock among its tasks, plus the
    NativeLock its C queue workers take.  The native one is taken without
    blocking the event loop (a worker may hold it through a discard)."""

    def __init__(self, native: NativeLock) -> None:
        self.native = native
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


def flush_threshold_pages(policy: FlushPolicy) -> int:
    """What a C inflate worker is told: collect pending pages once this many
    are pending (0: never).  Deadlines and "guest at target" stay with the
    session's FlushPolicy."""
    if policy.mode is HugePolicy.WHOLE:
        return 0
    if policy.mode is HugePolicy.EAGER:
        return 1
    return max(1, policy.flush_bytes // PAGE_SIZE)


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
    scope: trio.CancelScope | None = None
    buffers: int = 0
    signals: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    held_head: int | None = None  # stats queue: the guest's buffer, kept until fresh numbers are wanted
    worker: QueueWorker | None = None  # inflate/deflate: the C thread serving it
    role: QueueRole | None = None  # what the worker serves

    @property
    def running(self) -> bool:
        return self.scope is not None or self.worker is not None


class FrontendSession:
    def __init__(self, stream: FdStream, service, *, features: int, fast_config: bool = True) -> None:
        self.stream = stream
        self.service = service
        # Reads the socket; answers the guest's per-buffer GET_CONFIG and
        # SET_CONFIG itself once allowed (fast_config), hands the rest to
        # _receive_loop.
        self.front = FrontReader(stream.sock.fileno())
        self.fast_config = fast_config
        self.memory = GuestMemory()
        self.device = BalloonDevice(self.memory, features, target_bytes=service.target_bytes)
        self.conn = vu.BackendConnection(
            device_features=features,
            protocol_features=PROTOCOL_FEATURES,
            num_queues=MAX_QUEUES,
            config_size=CONFIG_SIZE,
            max_mem_slots=MAX_MEM_SLOTS,
        )
        self.queues = [QueueState(i, Virtqueue(i)) for i in range(MAX_QUEUES)]
        self.memory_lock = MemoryLock(NativeLock())
        # C queue workers write it when the session should look (notify_loop).
        self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping: list[tuple[QueueState, QueueWorker]] = []
        self._seen: dict[int, WorkerCounters] = {}  # id(worker) -> its counters last absorbed
        self.backend_channel: FdStream | None = None
        self.backend_lock = trio.Lock()
        self.nursery: trio.Nursery | None = None
        self.huge = HugePageTracker(self.memory, service.flush_policy)
        self.persist = SessionPersistence.for_service(service, self.memory, self.huge)
        self._flush_timer_armed = False
        self._failed_regions_reported: set[int] = set()
        self._stats_wakeup = trio.Event()
        self._invalid_reports_logged = 0
        self._unnatural_reports_logged = False
        self._handlers: dict[type, Callable] = {
            vu.FeaturesSet: self._on_features,
            vu.StatusSet: self._on_status,
            vu.MemoryTableSet: self._on_mem_table,
            vu.MemoryRegionAdded: self._on_region_added,
            vu.MemoryRegionRemoved: self._on_region_removed,
            vu.VringNumSet: self._on_vring_num,
            vu.VringAddrSet: self._on_vring_addr,
            vu.VringBaseSet: self._on_vring_base,
            vu.VringBaseGet: self._on_vring_base_get,
            vu.VringKickSet: self._on_vring_kick,
            vu.VringCallSet: self._on_vring_call,
            vu.VringErrSet: self._on_vring_err,
            vu.VringEnableSet: self._on_vring_enable,
            vu.ConfigGet: self._on_config_get,
            vu.ConfigSet: self._on_config_set,
            vu.BackendChannelSet: self._on_backend_channel,
            vu.DeviceReset: self._on_reset,
        }

    # -- lifetime ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the front-end leaves or sends bad input; always cleans up."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._stats_timer)
                nursery.start_soon(self._notify_loop)
                nursery.start_soon(self._snapshot_timer)
                nursery.start_soon(self._config_writes_loop)
                nursery.start_soon(self._config_target_loop)
                try:
                    await self._receive_loop()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.nursery = None  # closed: close() reaps what is left itself
            self.close()

    def close(self) -> None:
        if self.front is not None:  # first: nothing is answered from now on
            for fd in (self.front.chunk_fd, self.front.writes_fd, self.front.target_fd):
                trio.lowlevel.notify_closing(fd)
            self.front.close()
            self.front = None
        for q in self.queues:
            self._stop_worker(q)
            for name in ("kick_fd", "call_fd", "err_fd"):
                self._replace_fd(q, name, None)
        # The C threads must be gone before the memory they serve is unmapped.
        while self._stopping:
            q, worker = self._stopping.pop()
            worker.join()
            self._absorb(q, worker)
            self._seen.pop(id(worker), None)
            worker.free()
        if self._notify_fd is not None:
            trio.lowlevel.notify_closing(self._notify_fd)
            os.close(self._notify_fd)
            self._notify_fd = None
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.conn.close()
        self.persist.close()  # no task is left: the last snapshot sees a quiet table
        self.memory.close()
        self.stream.close()

    async def _receive_loop(self) -> None:
        front = self.front
        while True:
            await trio.lowlevel.wait_readable(front.chunk_fd)
            chunk = front.take()
            if chunk is None:
                continue
            self._apply_config_writes()  # what the guest wrote before this chunk
            if chunk.error:
                log.warning("front-end connection failed", error=str(OSError(chunk.error, os.strerror(chunk.error))))
                return
            if chunk.fds_truncated:
                log.error("bad input from front-end: closing the connection", error=TRUNCATED_FDS)
                return
            if chunk.eof:
                log.info("front-end left")
                return
            data, fds = chunk.data, chunk.fds
            try:
                self.conn.receive_data(data, fds)
                while True:
                    event = self.conn.next_event()
                    await self._flush()
                    if event is vu.NEED_DATA:
                        break
                    await self._dispatch(event)
                    await self._flush()
            except ProtocolError as exc:
                log.error("bad input from front-end: closing the connection", error=str(exc))
                await self._flush_quietly()
                return
            except SessionClosed:
                await self._flush_quietly()
                return
            self._share_config(whole=True)  # the thread waits: it may take all of it
            front.resume(fast=self.fast_config and self._config_negotiated(), partial=self.conn.has_partial_message)

    def _share_config(self, *, whole: bool) -> None:
        """Tell the C side the config: num_pages to the reader thread (which
        answers GET_CONFIG) and to the inflate worker (which frees plain
        shmem's partial blocks at the target); whole: the rest too, only
        while the reader thread waits for a resume."""
        config = self.device.config
        self.memory.set_target_pages(config.num_pages)
        if self.front is not None:
            if whole:
                self.front.set_config(config.pack())
            else:
                self.front.set_num_pages(config.num_pages)

    def _config_negotiated(self) -> bool:
        """GET_CONFIG and SET_CONFIG are legal now (as conn's RULES say)."""
        conn = self.conn
        return conn.protocol_features_set and bool(conn.acked_protocol_features & ProtocolFeature.CONFIG)

    async def _config_writes_loop(self) -> None:
        """Replay the writes of actual the reader thread took, in batches."""
        while True:
            await trio.lowlevel.wait_readable(self.front.writes_fd)
            self._apply_config_writes()
            await trio.sleep(CONFIG_WRITES_INTERVAL)

    async def _config_target_loop(self) -> None:
        """The guest wrote actual == num_pages: replay at once (the flush at
        the target starts from there), not at the batch pace."""
        while True:
            await trio.lowlevel.wait_readable(self.front.target_fd)
            self._apply_config_writes()

    def _apply_config_writes(self) -> None:
        if self.front is None:
            return
        writes = self.front.take_config_writes()
        last = len(writes) - 1
        config = self.device.config
        for i, (actual, num_pages) in enumerate(writes):
            # A step on the way to the target changes nothing but actual; the
            # writes that matter go through _config_written: the last one, one
            # at the target, one below what the guest was asked and had
            # (deflate-on-OOM).  Replaying 1024 writes per GiB ballooned one
            # by one showed up as a third of the session's CPU.
            if i == last or not plain_actual_step(config.actual, actual, num_pages):
                self._config_written(ACTUAL_OFFSET, actual.to_bytes(4, "little"), num_pages=num_pages,
                                     announce=i == last)
            else:
                config.actual = actual

    async def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            await self.stream.send(out)

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except Exception:  # the peer may be gone already; nothing to lose
            pass

    async def _dispatch(self, event) -> None:
        handler = self._handlers.get(type(event))
        if handler is None:  # a new event type the session does not know: refuse, visibly
            log.error("no handler for request", event=type(event).__name__)
            self.conn.complete(event, ok=False)
            return
        try:
            payload = await handler(event)
        except (MemoryTableError, RingError, ConfigAccessError, FeatureError) as exc:
            log.error(
                "request refused: closing the connection",
                request=type(event).__name__,
                error=str(exc),
            )
            self.conn.complete(event, ok=False)
            raise SessionClosed(str(exc)) from exc
        self.conn.complete(event, payload=payload)

    # -- protocol-level notifications -------------------------------------------

    async def _on_features(self, ev: vu.FeaturesSet) -> None:
        self.device.negotiate(ev.features & ~VHOST_USER_F_PROTOCOL_FEATURES)
        roles = {i: r.value for i, r in enumerate(self.device.roles)}
        log.info("features negotiated", features=hex(ev.features), queue_roles=roles)

    async def _on_status(self, ev: vu.StatusSet) -> None:
        log.debug("device status", status=hex(ev.status))

    # -- memory ------------------------------------------------------------------

    async def _on_mem_table(self, ev: vu.MemoryTableSet) -> None:
        pending = list(ev.regions)  # the fds not yet owned by the memory table
        async with self.memory_lock:
            self.memory.clear()
            try:
                while pending:
                    region, fd = pending[0]
                    self.memory.add_region(fd, region.gpa, region.size, region.uaddr, region.mmap_offset)
                    pending.pop(0)
            finally:
                close_fds([fd for _, fd in pending])
            self._memory_changed()
        log.info("memory table set", regions=self._describe_regions())

    async def _on_region_added(self, ev: vu.MemoryRegionAdded) -> None:
        r = ev.region
        async with self.memory_lock:
            try:
                self.memory.add_region(ev.fd, r.gpa, r.size, r.uaddr, r.mmap_offset)
            except MemoryTableError:
                close_fds([ev.fd])
                raise
            self._memory_changed()
        log.info("memory region added", gpa=hex(r.gpa), size=r.size, guest_ram=self.memory.total_bytes)

    async def _on_region_removed(self, ev: vu.MemoryRegionRemoved) -> None:
        r = ev.region
        async with self.memory_lock:
            self.memory.remove_region(r.gpa, r.size)
            self._memory_changed()
        log.info("memory region removed", gpa=hex(r.gpa), size=r.size)

    def _memory_changed(self) -> None:
        """Ring pointers point into the mappings: set the rings up again.
        New regions get their backing detected and huge page tracking set up."""
        for index, backing in self.huge.configure_regions():
            log.info(
                "region backing",
                region=index,
                backing=backing.kind,
                huge_page_size=backing.huge_page_size,
                thp=backing.thp,
                thp_setting=backing.thp_setting,
                tracking_granule=backing.granule,
            )
        for q in self.queues:
            if q.addr is not None and q.num is not None:
                try:
                    self._setup_ring(q, keep_position=True)
                except RingError as exc:
                    self._stop_worker(q)
                    log.warning("ring no longer in guest memory", queue=q.index, error=str(exc))
        if self.device.refresh_num_pages():
            self._notify_config_change()
        self.persist.snapshot("memory table changed")

    def _describe_regions(self) -> list[dict]:
        return [{"gpa": hex(r.gpa), "size": r.size, "mmap_offset": hex(r.mmap_offset)} for r in self.memory.regions]

    # -- rings ---------------------------------------------------------------------

    def _setup_ring(self, q: QueueState, *, keep_position: bool = False) -> None:
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

    async def _on_vring_num(self, ev: vu.VringNumSet) -> None:
        self.queues[ev.index].num = ev.num

    async def _on_vring_base(self, ev: vu.VringBaseSet) -> None:
        q = self.queues[ev.index]
        stopped_at = q.base if not q.running else None
        q.base = ev.base
        # A guest reboot (or driver reload) never reaches us as RESET_DEVICE:
        # QEMU stops the rings (GET_VRING_BASE), and the new driver's rings
        # start again at 0. A VM stop/cont restarts them where they stopped.
        # So an inflate/deflate ring that had moved and comes back at 0 means
        # a new driver with an empty balloon. Left marked, the pages it
        # inflates that were in the old balloon would never be freed (seen
        # with the real guest: 61183 of 65536 pages after a reboot).
        if (
            ev.base == 0
            and stopped_at
            and self.device.role_of(ev.index) in (QueueRole.INFLATE, QueueRole.DEFLATE)
            and self.memory.ballooned_pages
        ):
            async with self.memory_lock:
                released = self._empty_balloon()
            self.device.config.actual = 0
            log.info(
                "guest driver restarted (ring base back to 0): balloon emptied",
                queue=ev.index,
                ring_was_at=stopped_at,
                pages_released_from_balloon=released,
            )

    def _empty_balloon(self) -> int:
        """Mark every page as out of the balloon (memory lock held). Nothing
        is freed; pending pages leave the tracker like deflated ones."""
        released = self.memory.ballooned_pages
        every_page = RangeList.from_list([(r.gpa, r.size) for r in self.memory.regions])
        self.memory.balloon_update(every_page, inflate=False, want_changed=False)
        self.huge.deflated(every_page)
        self.persist.snapshot("balloon emptied")
        return released

    async def _on_vring_addr(self, ev: vu.VringAddrSet) -> None:
        q = self.queues[ev.index]
        if q.num is None:
            raise RingError(f"queue {ev.index}: SET_VRING_ADDR before SET_VRING_NUM")
        q.addr = ev
        async with self.memory_lock:
            self._setup_ring(q)  # ring addresses outside guest memory: RingError
        log.debug("ring set up", queue=q.index, num=q.num, base=q.base,
                  desc=hex(ev.desc), avail=hex(ev.avail), used=hex(ev.used))

    async def _on_vring_base_get(self, ev: vu.VringBaseGet) -> int:
        """GET_VRING_BASE stops the ring; in-flight work finishes first."""
        q = self.queues[ev.index]
        self._stop_worker(q)
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
        self._replace_fd(q, "kick_fd", None)
        log.info("ring stopped", queue=q.index, last_avail_idx=base, buffers=q.buffers)
        return base

    async def _on_vring_kick(self, ev: vu.VringKickSet) -> None:
        q = self.queues[ev.index]
        self._stop_worker(q)
        self._replace_fd(q, "kick_fd", ev.fd)
        if ev.fd is None:
            log.warning("queue without a kick fd (polling) is not served", queue=q.index)
        if not self.conn.acked_features & VHOST_USER_F_PROTOCOL_FEATURES:
            q.enabled = True  # vhost-user.rst: rings start enabled without protocol features
        await self._start_persistence(q)
        self._maybe_start(q)

    async def _on_vring_call(self, ev: vu.VringCallSet) -> None:
        q = self.queues[ev.index]
        if q.worker is not None:
            async with self.memory_lock:  # the worker signals its own copy
                if q.worker is not None:
                    q.worker.set_call_fd(ev.fd)
        self._replace_fd(q, "call_fd", ev.fd)

    async def _on_vring_err(self, ev: vu.VringErrSet) -> None:
        self._replace_fd(self.queues[ev.index], "err_fd", ev.fd)

    async def _on_vring_enable(self, ev: vu.VringEnableSet) -> None:
        q = self.queues[ev.index]
        q.enabled = ev.enabled
        if ev.enabled:
            await self._start_persistence(q)
            self._maybe_start(q)
        else:
            self._stop_worker(q)

    def _replace_fd(self, q: QueueState, name: str, fd: int | None) -> None:
        old = getattr(q, name)
        if old is not None and old != fd:
            if name == "kick_fd":
                trio.lowlevel.notify_closing(old)
            close_fds([old])
        setattr(q, name, fd)

    def _maybe_start(self, q: QueueState) -> None:
        role = self.device.role_of(q.index)
        if q.running or not q.enabled or q.kick_fd is None or not q.vq.ready or q.broken:
            return
        if role not in (QueueRole.INFLATE, QueueRole.DEFLATE, QueueRole.STATS, QueueRole.REPORTING):
            # Free page hinting is never offered; a queue beyond the
            # negotiated ones (QEMU enables all num_vqs) has no role.
            log.info("queue not served", queue=q.index, role=role.value if role else None)
            return
        if role in (QueueRole.INFLATE, QueueRole.DEFLATE):
            try:
                q.worker = QueueWorker(
                    self.memory, self.memory_lock.native, q.vq, format=SPECS[role].format,
                    inflate=SPECS[role].direction is Direction.INFLATE, journal_kind=SPECS[role].journal_kind,
                    kick_fd=q.kick_fd, call_fd=q.call_fd, notify_fd=self._notify_fd,
                    flush_pages=flush_threshold_pages(self.huge.policy),
                    journal=self.persist.native_journal,
                )
            except RingError as exc:
                log.error("queue not started", queue=q.index, error=str(exc))
                return
            q.role = role
            self._seen[id(q.worker)] = WorkerCounters()
        else:
            q.scope = trio.CancelScope()
            self.nursery.start_soon(self._queue_worker, q, role, q.scope)
        log.info("queue started", queue=q.index, role=role.value, num=q.num)

    def _stop_worker(self, q: QueueState) -> None:
        """Stop serving q.  A C worker finishes its batch first: once the
        caller holds the memory lock it no longer touches the queue; its
        thread is reaped in the background (or by close())."""
        if q.scope is not None:
            q.scope.cancel()
            q.scope = None
        if q.worker is not None:
            worker, q.worker = q.worker, None
            worker.request_stop()
            self._stopping.append((q, worker))
            if self.nursery is not None:
                self.nursery.start_soon(self._reap_worker, q, worker)

    async def _reap_worker(self, q: QueueState, worker: QueueWorker) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(worker.join)
        if (q, worker) in self._stopping:  # close() may have reaped it meanwhile
            self._stopping.remove((q, worker))
            self._absorb(q, worker)
            self._seen.pop(id(worker), None)
            worker.free()

    def _workers(self):
        for q in self.queues:
            if q.worker is not None:
                yield q, q.worker
        yield from self._stopping

    def absorb_queue_work(self) -> None:
        """Bring the C workers' counters into the device's (call before
        describing it) and act on what they report; replay the config
        writes the reader thread took."""
        self._apply_config_writes()
        for q, worker in list(self._workers()):
            self._absorb(q, worker)

    def _absorb(self, q: QueueState, worker: QueueWorker) -> None:
        now = worker.counters()
        work = now.minus(self._seen.get(id(worker), WorkerCounters()))
        self._seen[id(worker)] = now
        self.device.record_queue_work(q.role, work)
        q.buffers += work.buffers
        q.signals += work.signals
        if work.discard.bytes_failed:
            self._report_discard_failure(work.discard)
        if work.flushes:
            log.info("pending partial huge pages freed", reason="flush-bytes reached", queue=q.index,
                     thp_splits_so_far=self.device.counters.discard.splits,
                     policy=self.huge.policy.mode.value)
        if work.journal_dropped:
            log.error("page journal full and no snapshot could be written: a back-end restart may now "
                      "forget ballooned pages (see the snapshot error above)",
                      queue=q.index, records_dropped=work.journal_dropped)
        if now.broken and not q.broken and worker is q.worker:
            self._ring_broken(q, now.broken)

    async def _notify_loop(self) -> None:
        """The C workers' wake-up: something to log, a broken ring, pending
        pages that need the flush deadline."""
        while True:
            await trio.lowlevel.wait_readable(self._notify_fd)
            try:
                os.eventfd_read(self._notify_fd)
            except BlockingIOError:
                continue
            self.absorb_queue_work()
            self._arm_flush_timer()
            if self.persist.snapshot_soon():
                async with self.memory_lock:
                    self.persist.snapshot("journal half full")

    def describe_front(self) -> dict[str, int]:
        """The reader thread's figures for query-balloon."""
        if self.front is None:
            return {}
        c = self.front.counters()
        return {"config-reads-in-c": c.config_reads, "config-writes-in-c": c.config_writes,
                "chunks-to-session": c.handed_over}

    def broken_queues(self) -> dict[int, str]:
        return {q.index: q.broken for q in self.queues if q.broken}

    async def _queue_worker(self, q: QueueState, role: QueueRole, scope: trio.CancelScope) -> None:
        process = {
            QueueRole.REPORTING: self._process_reports,
            QueueRole.STATS: self._process_stats,
        }[role]
        with scope:
            kick_fd = q.kick_fd
            while True:
                # Buffers may be there before the first kick: Linux primes the
                # stats queue before DRIVER_OK, and QEMU drops that kick.
                await process(q, role, scope)
                await trio.lowlevel.wait_readable(kick_fd)
                try:
                    os.eventfd_read(kick_fd)
                except BlockingIOError:
                    pass

    # -- free page reporting -------------------------------------------------------

    async def _process_reports(self, q: QueueState, role: QueueRole, scope: trio.CancelScope) -> None:
        """Free what each reporting buffer lists, then return it (used len 0):
        the guest blocks until it comes back."""
        whole_only = self.huge.policy.mode is HugePolicy.WHOLE
        async with self.memory_lock:
            with trio.CancelScope(shield=True):  # pop -> push: see the module docstring
                while not scope.cancel_called:
                    try:
                        buffers = q.vq.pop_ranges(self.memory, writable=True)
                    except RingError as exc:
                        self._ring_broken(q, str(exc))
                        return
                    if not buffers:
                        break
                    free: list[tuple[int, int]] = []
                    for head, descs in buffers:
                        plan = self.device.plan_report(descs, whole_huge_pages_only=whole_only)
                        self._log_report(q, head, plan)
                        free.extend(plan.free)
                    if free:
                        stats, measured = await self._discard(RangeList.from_list(free))
                        self.device.record_report_discard(stats, measured)
                    heads = [head for head, _ in buffers]
                    q.vq.push_used(heads, [0] * len(heads))
                    q.buffers += len(heads)
                    if q.vq.should_signal():
                        self._signal(q.call_fd)
                        q.signals += 1

    def _log_report(self, q: QueueState, head: int, plan: ReportPlan) -> None:
        log.debug(
            "free pages reported",
            queue=q.index, head=head, entries=plan.entries, reported=plan.reported_bytes,
            freeing=plan.free_bytes, skipped={k.value: v for k, v in plan.skipped.items()},
            invalid=len(plan.invalid),
        )
        if plan.invalid:
            self._invalid_reports_logged += 1
            if self._invalid_reports_logged <= INVALID_REPORT_LOG_LIMIT:
                d, reason = plan.invalid[0]
                log.warning(
                    "invalid free page report entries: skipped, never freed",
                    queue=q.index, head=head, count=len(plan.invalid),
                    reasons=sorted({r.value for _, r in plan.invalid}),
                    first_addr=hex(d.addr), first_len=d.length, first_reason=reason.value,
                    guest_ram=self.memory.total_bytes,
                )
                if self._invalid_reports_logged == INVALID_REPORT_LOG_LIMIT:
                    log.warning("further invalid report entries are counted (query-balloon), not logged")
        if plan.unnatural and not self._unnatural_reports_logged:
            self._unnatural_reports_logged = True  # legal, freed; worth one line per connection
            d = plan.unnatural[0]
            log.info(
                "reported range is not a naturally aligned power of two (freed anyway; "
                "Linux reports whole buddy blocks, so the guest's page reporting order may be lowered)",
                addr=hex(d.addr), len=d.length,
            )

    # -- statistics ----------------------------------------------------------------

    def _queue_of(self, role: QueueRole) -> QueueState | None:
        roles = self.device.roles
        return self.queues[roles.index(role)] if role in roles else None

    async def _process_stats(self, q: QueueState, role: QueueRole, scope: trio.CancelScope) -> None:
        """Decode the guest's stats buffer and keep it (the guest adds one and
        waits for it to come back); a second one replaces the first, which
        goes back at once."""
        async with self.memory_lock:
            with trio.CancelScope(shield=True):
                try:
                    buffers = q.vq.pop_ranges(self.memory, writable=False)
                except RingError as exc:
                    self._ring_broken(q, str(exc))
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
                    self._give_back(q, give_back)
        log.debug("guest statistics", updates=self.device.stats.updates, stats=len(self.device.stats.values))

    def _give_back(self, q: QueueState, heads: list[int]) -> None:
        q.vq.push_used(heads, [0] * len(heads))
        q.buffers += len(heads)
        if q.vq.should_signal():
            self._signal(q.call_fd)
            q.signals += 1

    async def request_stats(self) -> bool:
        """Return the held stats buffer so the guest refills it with fresh
        numbers; False when none is held (no stats queue, not started, or
        the guest has not refilled the last one yet)."""
        q = self._queue_of(QueueRole.STATS)
        if q is None:
            return False
        async with self.memory_lock:
            if q.held_head is None or not q.running:
                return False
            head, q.held_head = q.held_head, None
            try:
                self._give_back(q, [head])
            except RingError as exc:
                log.warning("stats queue no longer usable", queue=q.index, error=str(exc))
                return False
        return True

    async def _stats_timer(self) -> None:
        """Ask for fresh statistics every ``stats-interval`` seconds (0: never)."""
        while True:
            wakeup = self._stats_wakeup = trio.Event()
            interval = self.service.stats_interval
            with trio.move_on_after(interval if interval > 0 else math.inf):
                await wakeup.wait()
            if not wakeup.is_set():
                await self.request_stats()

    def stats_interval_changed(self) -> None:
        """The operator changed the interval: restart the timer, and fetch
        fresh numbers now if polling is on."""
        self._stats_wakeup.set()
        if self.service.stats_interval > 0 and self.nursery is not None:
            self.nursery.start_soon(self.request_stats)

    async def _discard(self, ranges: RangeList):
        """Free ranges in a worker thread (cffi releases the GIL); the memory
        lock must be held by the caller.  Returns (DiscardStats, bytes the
        backing files shrank by)."""
        stats, measured = await trio.to_thread.run_sync(self._discard_blocking, ranges)
        self.device.record_discard(stats, measured)
        if stats.bytes_failed:
            self._report_discard_failure(stats)
        return stats, measured

    def _discard_blocking(self, ranges: RangeList):
        before = self.memory.allocated_bytes()
        stats = self.huge.discard(ranges)
        after = self.memory.allocated_bytes()
        return stats, max(0, before - after)

    # -- partially ballooned huge pages -------------------------------------------

    def _guest_at_target(self) -> bool:
        config = self.device.config
        return config.num_pages > 0 and config.actual == config.num_pages

    async def flush_pending(self, reason: str) -> None:
        """Free the pending pages of partly ballooned huge pages if the policy
        says so now (after a deadline, at the target, on a policy change)."""
        self._apply_config_writes()
        async with self.memory_lock:
            if self.huge.flush_due(guest_at_target=self._guest_at_target()):
                ranges = self.huge.collect()
                if len(ranges):
                    splits_before = self.device.counters.discard.splits
                    await self._discard(ranges)
                    self.persist.record_collect()
                    log.info(
                        "pending partial huge pages freed",
                        reason=reason,
                        bytes=ranges.total_bytes,
                        ranges=len(ranges),
                        thp_splits=self.device.counters.discard.splits - splits_before,
                        policy=self.huge.policy.mode.value,
                    )
            # Plain shmem's partial 2 MiB blocks: no huge page to keep whole,
            # so they go under every policy.
            batch = self.huge.collect_batch()
            if len(batch):
                await self._discard(batch)
                self.persist.record_collect_batch()
        self._arm_flush_timer()

    def _arm_flush_timer(self) -> None:
        if self._flush_timer_armed or self.nursery is None:
            return
        # The inflate worker tells once when pending pages appear; ask again
        # before looking, so pages that appear after the look are told.
        for q in self.queues:
            if q.worker is not None and q.worker.inflate:
                q.worker.notice_pending()
        delay = self.huge.flush_delay()
        if delay is None:
            return
        self._flush_timer_armed = True
        self.nursery.start_soon(self._timed_flush, delay)

    async def _timed_flush(self, delay: float) -> None:
        await trio.sleep(delay)
        self._flush_timer_armed = False
        await self.flush_pending("deadline")

    # -- page state on disk (persist.py) -------------------------------------------

    async def _start_persistence(self, q: QueueState) -> None:
        """When the inflate or deflate queue first starts (memory table and
        ring bases known, nothing served yet): bring back the saved page
        state if it is this guest's, then record every change."""
        if self.persist.started or self.device.role_of(q.index) not in (QueueRole.INFLATE, QueueRole.DEFLATE):
            return
        if not (q.enabled and q.kick_fd is not None and q.vq.ready and not q.broken):
            return
        inflate = self._queue_of(QueueRole.INFLATE)
        base = inflate.base if inflate is not None else 0
        async with self.memory_lock:
            with trio.CancelScope(shield=True):
                restored = self.persist.restore(inflate_base=base)
                if restored is not None:
                    if len(restored.refree):
                        await self._discard(restored.refree)
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
            if self.nursery is not None:
                self.nursery.start_soon(self.flush_pending, "restored")

    async def _snapshot_timer(self) -> None:
        """Rewrite the page snapshot every snapshot_interval while something changed."""
        while True:
            await trio.sleep(max(self.persist.snapshot_interval, 0.05))
            if self.persist.snapshot_due():
                async with self.memory_lock:
                    self.persist.snapshot("interval")

    def set_flush_policy(self, policy: FlushPolicy) -> None:
        self.huge.policy = policy
        for _, worker in self._workers():
            worker.set_flush_pages(flush_threshold_pages(policy))
        if self.nursery is not None:
            self.nursery.start_soon(self.flush_pending, "policy change")

    def _report_discard_failure(self, stats) -> None:
        region = stats.failed_region
        if region in self._failed_regions_reported:  # say it once per region
            return
        self._failed_regions_reported.add(region)
        log.error(
            "host memory of this region cannot be freed (fallocate and madvise both refused): "
            "pages stay ballooned in the guest but the host keeps them",
            region=region,
            errno=stats.last_errno,
            error=os.strerror(stats.last_errno) if stats.last_errno else None,
        )

    def _ring_broken(self, q: QueueState, reason: str) -> None:
        q.broken = reason
        log.error("malformed ring from the guest: queue stopped", queue=q.index, error=reason)
        self._signal(q.err_fd)
        self._stop_worker(q)

    @staticmethod
    def _signal(fd: int | None) -> None:
        if fd is None:
            return
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:  # counter saturated: the peer has a wakeup pending anyway
            pass

    # -- config space --------------------------------------------------------------

    async def _on_config_get(self, ev: vu.ConfigGet) -> bytes:
        return self.device.read_config(ev.offset, ev.size)

    async def _on_config_set(self, ev: vu.ConfigSet) -> None:
        self._config_written(ev.offset, ev.data)

    def _config_written(self, offset: int, data: bytes, *, num_pages: int | None = None, announce: bool = True) -> None:
        """A guest write of the config, through the connection or replayed
        from the reader thread (num_pages: the target when it was written).
        announce=False (all but the last of a replayed batch): the new actual
        is neither published as BALLOON_CHANGE nor recorded on disk, as QEMU
        throttles BALLOON_CHANGE to the latest value."""
        unasked_before = self.device.counters.pages_deflated_unasked
        poison_before = self.device.config.poison_val
        write = self.device.write_config(offset, data, num_pages=num_pages)
        if write.poison_val != poison_before:
            log.info(
                "guest page poison value",
                poison_val=hex(write.poison_val),
                reported_pages=("kept: never discarded while the guest poisons free pages"
                                if write.poison_val else "discarded"),
            )
        if write.actual_changed:
            if announce:
                self.persist.record_actual(write.new_actual)
            actual = self.device.actual_bytes
            log.debug("guest balloon size", actual_pages=write.new_actual, num_pages=self.device.config.num_pages)
            unasked = self.device.counters.pages_deflated_unasked - unasked_before
            if unasked:
                log.info(
                    "guest deflated its balloon below the target on its own (deflate-on-OOM)",
                    pages=unasked, actual=actual, num_pages=self.device.config.num_pages,
                )
            if announce:
                self.service.publish("BALLOON_CHANGE", {"actual": actual})
            if write.new_actual == (self.device.config.num_pages if num_pages is None else num_pages):
                log.info(
                    "guest reached the target",
                    actual=actual,
                    ballooned_pages=write.new_actual,
                    pending_partial_bytes=self.huge.state().collectable_bytes,
                    huge_pages_freed_whole=self.device.counters.discard.huge_pages_whole,
                    thp_splits=self.device.counters.discard.splits,
                )
                if self.nursery is not None:
                    self.nursery.start_soon(self.flush_pending, "guest at target")

    def set_target(self, target_bytes: int) -> None:
        if self.device.set_target(target_bytes):
            self._share_config(whole=False)
            log.info("new target for the guest", num_pages=self.device.config.num_pages)
            self._notify_config_change()

    # -- backend channel -------------------------------------------------------------

    async def _on_backend_channel(self, ev: vu.BackendChannelSet) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = FdStream(trio.socket.from_stdlib_socket(socket.socket(fileno=ev.fd)))

    def _notify_config_change(self) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(self._send_config_change)

    async def _send_config_change(self) -> None:
        channel = self.backend_channel
        if channel is None:
            log.warning("no backend channel (SET_BACKEND_REQ_FD): the guest cannot be told of the new target yet")
            return
        need_reply = bool(self.conn.acked_protocol_features & ProtocolFeature.REPLY_ACK)
        message = vu.encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=need_reply)
        async with self.backend_lock:
            try:
                await channel.send(message)
                if need_reply:
                    with trio.fail_after(BACKEND_REPLY_TIMEOUT):
                        await self._wait_backend_ack(channel)
            except trio.TooSlowError:
                log.warning("front-end did not ack CONFIG_CHANGE_MSG", timeout=BACKEND_REPLY_TIMEOUT)
            except (OSError, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("backend channel failed", error=str(exc))

    async def _wait_backend_ack(self, channel: FdStream) -> None:
        reader = vu.BackendChannel()
        while True:
            data, fds = await channel.receive(4096)
            close_fds(fds)
            if not data:
                raise ProtocolError("backend channel closed before the front-end replied")
            ack = reader.receive_reply(data)
            if ack is not None:
                if ack != 0:
                    log.warning("front-end refused CONFIG_CHANGE_MSG", status=ack)
                return

    # -- reset ---------------------------------------------------------------------

    async def _on_reset(self, ev: vu.DeviceReset) -> None:
        for q in self.queues:
            self._stop_worker(q)
        async with self.memory_lock:
            for q in self.queues:
                q.enabled = False
                q.broken = None
                q.num = q.addr = None
                q.base = 0
                q.held_head = None
                q.vq = Virtqueue(q.index)
            # The balloon is device state too: after a reset no page is in it
            # (config.actual says 0 below). Left marked, a page the next driver
            # inflates would count as "already ballooned" and never be freed.
            released = self._empty_balloon()
        self.device.acked_features = 0
        self.device.config.actual = 0
        self.device.config.poison_val = 0  # the next driver writes its own during probe
        log.info("device reset", pages_released_from_balloon=released)
