"""One front-end connection: lifetime, and the dispatch of its requests.

The protocol itself (framing, validation, state) is the sans-I/O
BackendConnection; this module feeds it what the front-end sends and hands
each request to the part of the session that owns it:

- ``rings.py``: the queues, ring set-up, and serving them behind one
  interface (C threads for inflate/deflate, trio tasks for the rest);
- ``reporting.py`` and ``stats_queue.py``: the two Python-served queues;
- ``flushing.py``: discards off the event loop, and when pending pages go;
- ``config_channel.py``: the config space and the back-end channel;
- ``page_state.py``: the page state on disk.

They are joined by narrow callbacks given here, not by reaching into each
other.

Concurrency rules:
- ``memory_lock`` (a trio lock plus the C threads' NativeLock) is held by
  whoever reads the rings or changes the memory table, so a discard running
  in a worker thread never sees its mapping go.
- GET_CONFIG never takes that lock: a guest vCPU waits on it synchronously.
- A popped batch is processed to the end before its queue can stop (see
  rings.py).  The one buffer deliberately held across time is the guest's
  stats buffer; GET_VRING_BASE hands it back as not consumed.
- Deflate is sacred: a page the guest took back leaves the huge page
  tracker before anything else can free it, and a report overlapping a
  ballooned page is refused (device.reporting says why it never happens
  with a correct guest).
"""

from __future__ import annotations

import os
from typing import Callable

import structlog
import trio

from ..device.balloon import BalloonDevice, FeatureError
from ..device.config import CONFIG_SIZE, ConfigAccessError
from ..device.hugepages import FlushPolicy, HugePageTracker
from ..device.queues import SPECS, QueueRole, device_queue_count
from ..native import FrontReader, GuestMemory, MemoryTableError, RangeList, RingError
from ..vhost_user import connection as vu
from ..vhost_user.constants import MAX_FDS, MAX_MEM_SLOTS, VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from ..vhost_user.errors import ProtocolError
from .config_channel import ConfigChannel
from .flushing import Discarder, FlushScheduler
from .memory_lock import MemoryLock
from .page_state import PageState
from .persist import SessionPersistence
from .reporting import ReportServer
from .rings import Rings
from .stats_queue import StatsServer
from .transport import FdStream, close_fds

log = structlog.get_logger("vhostballoon.session")

# What the balloon offers on the vhost-user level: everything the connection
# implements (MQ, REPLY_ACK, BACKEND_REQ, CONFIG, CONFIGURE_MEM_SLOTS,
# RESET_DEVICE, STATUS); none of it claims migration support (no LOG_SHMFD,
# DEVICE_STATE or POSTCOPY).
PROTOCOL_FEATURES = int(vu.SUPPORTED_PROTOCOL_FEATURES)
TRUNCATED_FDS = (
    f"peer sent more fds than a vhost-user message may carry ({MAX_FDS}); ancillary data truncated"
)


class SessionClosed(Exception):
    """The session ended because of bad input; the reason was logged."""


class FrontendSession:
    def __init__(self, stream: FdStream, service, *, features: int, fast_config: bool = True) -> None:
        self.stream = stream
        self.service = service
        # Reads the socket; answers the guest's per-buffer GET_CONFIG and
        # SET_CONFIG itself once allowed (fast_config), hands the rest to
        # _receive_loop.
        self.fast_config = fast_config
        self.memory = GuestMemory()
        self.device = BalloonDevice(self.memory, features, target_bytes=service.target_bytes)
        self.front = FrontReader(stream.sock.fileno(), self.device.mailbox)
        self.conn = vu.BackendConnection(
            device_features=features,
            protocol_features=PROTOCOL_FEATURES,
            num_queues=device_queue_count(features),
            config_size=CONFIG_SIZE,
            max_mem_slots=MAX_MEM_SLOTS,
        )
        self.memory_lock = MemoryLock()
        # C queue threads write it when the session should look (_notify_loop).
        self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.nursery: trio.Nursery | None = None
        self.huge = HugePageTracker(self.memory, service.flush_policy)
        self.persist = SessionPersistence.for_service(service, self.memory, self.huge)
        self.discard = Discarder(self.memory, self.huge, self.device)
        tasks = {}
        self.rings = Rings(
            memory=self.memory, memory_lock=self.memory_lock, device=self.device, notify_fd=self._notify_fd,
            tasks=tasks, flush_policy=lambda: self.huge.policy, journal=lambda: self.persist.native_journal,
            config=self.device.mailbox,
        )
        self.rings.on_discard_failure = self.discard.report_failure
        self.reports = ReportServer(
            memory=self.memory, memory_lock=self.memory_lock, device=self.device,
            policy=lambda: self.huge.policy.mode, discard=self.discard, ring_broken=self.rings.ring_broken,
        )
        self.stats = StatsServer(
            memory=self.memory, memory_lock=self.memory_lock, device=self.device, rings=self.rings,
            interval=lambda: service.stats_interval,
        )
        tasks[QueueRole.REPORTING] = self.reports.serve
        tasks[QueueRole.STATS] = self.stats.serve
        self.config = ConfigChannel(
            device=self.device, memory=self.memory, huge=self.huge, persist=self.persist, front=self.front,
            publish=service.publish, at_target=lambda reason: self.flusher.soon(reason),
            reply_ack=lambda: bool(self.conn.acked_protocol_features & ProtocolFeature.REPLY_ACK),
        )
        self.flusher = FlushScheduler(
            memory_lock=self.memory_lock, huge=self.huge, device=self.device, persist=self.persist,
            rings=self.rings, discard=self.discard, guest_at_target=self.config.guest_at_target,
            before_look=self.config.apply_writes,
        )
        self.pages = PageState(
            persist=self.persist, memory_lock=self.memory_lock, device=self.device, rings=self.rings,
            discard=self.discard, flush_soon=self.flusher.soon,
        )
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

    @property
    def queues(self):
        return self.rings.queues

    # -- lifetime ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the front-end leaves or sends bad input; always cleans up."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = self.rings.nursery = self.flusher.nursery = self.config.nursery = nursery
                nursery.start_soon(self.stats.timer)
                nursery.start_soon(self._notify_loop)
                nursery.start_soon(self.pages.timer)
                nursery.start_soon(self.config.writes_loop)
                nursery.start_soon(self.config.target_loop)
                try:
                    await self._receive_loop()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # closed: aclose() reaps what is left itself
            self.nursery = self.rings.nursery = self.flusher.nursery = self.config.nursery = None
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Stop everything; the C threads are joined, and the last snapshot
        written, off the event loop."""
        self._stop_front()
        self.rings.stop_all()
        self.rings.close_fds()
        await trio.to_thread.run_sync(self.rings.join_stopped)
        self.rings.retire_stopped()
        self._close_rest()
        # No task is left: the last snapshot sees a quiet table.  The table
        # itself is unmapped on the event loop, where query-balloon reads it.
        await trio.to_thread.run_sync(self.persist.close)
        self.memory.close()
        self.stream.close()

    def _stop_front(self) -> None:
        if self.front is not None:  # first: nothing is answered from now on
            for fd in (self.front.chunk_fd, self.front.writes_fd, self.front.target_fd):
                trio.lowlevel.notify_closing(fd)
            self.front.close()
            self.front = self.config.front = None

    def _close_rest(self) -> None:
        if self._notify_fd is not None:
            trio.lowlevel.notify_closing(self._notify_fd)
            os.close(self._notify_fd)
            self._notify_fd = None
        self.config.close()
        self.conn.close()

    async def _receive_loop(self) -> None:
        front = self.front
        while True:
            await trio.lowlevel.wait_readable(front.chunk_fd)
            chunk = front.take()
            if chunk is None:
                continue
            self.config.apply_writes()  # what the guest wrote before this chunk
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
            front.resume(fast=self.fast_config and self._config_negotiated(), partial=self.conn.has_partial_message)

    def _config_negotiated(self) -> bool:
        """GET_CONFIG and SET_CONFIG are legal now (as conn's RULES say)."""
        conn = self.conn
        return conn.protocol_features_set and bool(conn.acked_protocol_features & ProtocolFeature.CONFIG)

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

    # -- what the C threads report --------------------------------------------------

    async def _notify_loop(self) -> None:
        """The C threads' wake-up: something to log, a broken ring, pending
        pages that need the flush deadline, a journal filling up."""
        while True:
            await trio.lowlevel.wait_readable(self._notify_fd)
            try:
                os.eventfd_read(self._notify_fd)
            except BlockingIOError:
                continue
            self.absorb_queue_work()
            self.flusher.arm_timer()
            await self.pages.snapshot_if_half_full()

    def absorb_queue_work(self) -> None:
        """Bring the C threads' counters into the device's (call before
        describing it) and act on what they report; replay the config
        writes the reader thread took."""
        self.config.apply_writes()
        self.rings.absorb()

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
        """New regions get their backing detected and huge page tracking set
        up; the rings are set up again (memory lock held)."""
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
        self.rings.memory_changed()
        if self.device.refresh_num_pages():
            self.config.notify_change()
        self.persist.snapshot("memory table changed")

    def _describe_regions(self) -> list[dict]:
        return [{"gpa": hex(r.gpa), "size": r.size, "mmap_offset": hex(r.mmap_offset)} for r in self.memory.regions]

    # -- rings ---------------------------------------------------------------------

    async def _on_vring_num(self, ev: vu.VringNumSet) -> None:
        self.rings[ev.index].num = ev.num

    async def _on_vring_base(self, ev: vu.VringBaseSet) -> None:
        q = self.rings[ev.index]
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
            and self._moves_pages(ev.index)
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

    def _moves_pages(self, index: int) -> bool:
        """The queue at index inflates or deflates (its changes are journaled)."""
        role = self.device.role_of(index)
        return role is not None and SPECS[role].journal_kind is not None

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
        q = self.rings[ev.index]
        if q.num is None:
            raise RingError(f"queue {ev.index}: SET_VRING_ADDR before SET_VRING_NUM")
        q.addr = ev
        async with self.memory_lock:
            self.rings.setup(q)  # ring addresses outside guest memory: RingError
        log.debug("ring set up", queue=q.index, num=q.num, base=q.base,
                  desc=hex(ev.desc), avail=hex(ev.avail), used=hex(ev.used))

    async def _on_vring_base_get(self, ev: vu.VringBaseGet) -> int:
        """GET_VRING_BASE stops the ring; in-flight work finishes first."""
        return await self.rings.stop_ring(self.rings[ev.index])

    async def _on_vring_kick(self, ev: vu.VringKickSet) -> None:
        q = self.rings[ev.index]
        self.rings.stop(q)
        self.rings.replace_fd(q, "kick_fd", ev.fd)
        if ev.fd is None:
            log.warning("queue without a kick fd (polling) is not served", queue=q.index)
        if not self.conn.acked_features & VHOST_USER_F_PROTOCOL_FEATURES:
            q.enabled = True  # vhost-user.rst: rings start enabled without protocol features
        await self.pages.start(q)
        self.rings.maybe_start(q)

    async def _on_vring_call(self, ev: vu.VringCallSet) -> None:
        await self.rings.set_call_fd(self.rings[ev.index], ev.fd)

    async def _on_vring_err(self, ev: vu.VringErrSet) -> None:
        self.rings.replace_fd(self.rings[ev.index], "err_fd", ev.fd)

    async def _on_vring_enable(self, ev: vu.VringEnableSet) -> None:
        q = self.rings[ev.index]
        q.enabled = ev.enabled
        if ev.enabled:
            await self.pages.start(q)
            self.rings.maybe_start(q)
        else:
            self.rings.stop(q)

    # -- config space and back-end channel ---------------------------------------

    async def _on_config_get(self, ev: vu.ConfigGet) -> bytes:
        return self.config.read(ev.offset, ev.size)

    async def _on_config_set(self, ev: vu.ConfigSet) -> None:
        self.config.written(ev.offset, ev.data)

    async def _on_backend_channel(self, ev: vu.BackendChannelSet) -> None:
        self.config.set_backend_channel(ev.fd)

    # -- reset ---------------------------------------------------------------------

    async def _on_reset(self, ev: vu.DeviceReset) -> None:
        self.rings.stop_all()
        async with self.memory_lock:
            self.rings.reset()
            # The balloon is device state too: after a reset no page is in it
            # (config.actual says 0 below). Left marked, a page the next driver
            # inflates would count as "already ballooned" and never be freed.
            released = self._empty_balloon()
        self.device.acked_features = 0
        self.device.config.actual = 0
        self.device.config.poison_val = 0  # the next driver writes its own during probe
        log.info("device reset", pages_released_from_balloon=released)

    # -- what the service asks -------------------------------------------------------

    def set_target(self, target_bytes: int) -> None:
        self.config.set_target(target_bytes)

    def set_flush_policy(self, policy: FlushPolicy) -> None:
        self.flusher.set_policy(policy)

    async def flush_pending(self, reason: str) -> None:
        await self.flusher.flush(reason)

    async def request_stats(self) -> bool:
        return await self.stats.request()

    def stats_interval_changed(self) -> None:
        self.stats.interval_changed(self.nursery)

    def broken_queues(self) -> dict[int, str]:
        return self.rings.broken_queues()

    def describe_front(self) -> dict[str, int]:
        """The reader thread's figures for query-balloon."""
        if self.front is None:
            return {}
        c = self.front.counters()
        return {"config-reads-in-c": c.config_reads, "config-writes-in-c": c.config_writes,
                "chunks-to-session": c.handed_over}
