"""The C runtime's threads (csrc/serve.c, front.c): the lock they share
with the session, the queue threads and their counters, the front-end
socket reader."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

from .._native import ffi, lib

from ._base import _ERRLEN, _errbuf, _errtext
from .ranges import DiscardStats
from .rings import REFUSE_REASONS

if TYPE_CHECKING:
    from .memory import GuestMemory
    from .rings import Virtqueue
    from .config import ConfigMailbox
    from .journal import PageJournal


# Orders ranges are counted by, and buckets of buffer service times
# (vb_worker_counters: the sizes are C's).
RANGE_ORDERS = len(ffi.new("vb_worker_counters *").range_orders)
SERVICE_BUCKETS = len(ffi.new("vb_worker_counters *").service_us_buckets)


class NativeLock:
    """The lock the C queue workers take around every touch of guest memory
    state (csrc/serve.c vb_lock).  Any thread may release it, so the session
    can take it on the event loop and discard in a worker thread."""

    def __init__(self) -> None:
        self._lock = ffi.gc(lib.vb_lock_new(), lib.vb_lock_free)
        if self._lock == ffi.NULL:
            raise MemoryError("vb_lock_new")

    def acquire(self) -> None:
        """Blocking: call it from a worker thread when try_acquire fails."""
        lib.vb_lock_acquire(self._lock)

    def try_acquire(self) -> bool:
        return bool(lib.vb_lock_try(self._lock))

    def release(self) -> None:
        lib.vb_lock_release(self._lock)


@dataclass(frozen=True)
class WorkerCounters:
    """Totals of one queue worker since it started (vb_worker_counters)."""

    kicks: int = 0
    spurious_kicks: int = 0
    batches: int = 0
    buffers: int = 0
    pfns: int = 0
    changed: int = 0
    invalid: int = 0
    last_invalid_pfn: int = 0
    unchanged: int = 0
    last_unchanged_pfn: int = 0
    pending_dropped: int = 0
    signals: int = 0
    flushes: int = 0
    freed_measured: int = 0
    discard: DiscardStats = field(default_factory=DiscardStats)
    broken: str | None = None
    running: bool = False
    journal_waits: int = 0
    journal_dropped: int = 0
    refused: int = 0  # ranges refused (extents: malformed, or inflating ballooned pages)
    last_refused: tuple[int, int] = (0, 0)  # (gpa, len) of the first refused of the latest batch with one
    last_refused_why: str = ""
    range_orders: tuple[int, ...] = (0,) * RANGE_ORDERS  # extents inflate: accepted ranges by order
    # Buffers by service time (pop to used ring): bucket i under 2**i us, the last above; and their sum.
    service_us_buckets: tuple[int, ...] = (0,) * SERVICE_BUCKETS
    service_ns_sum: int = 0

    # Not running totals: minus() keeps the later value (discard: its own minus).
    _LATEST: ClassVar[frozenset[str]] = frozenset(
        {"last_invalid_pfn", "last_unchanged_pfn", "last_refused", "last_refused_why", "discard", "broken",
         "running"}
    )

    def minus(self, earlier: WorkerCounters) -> WorkerCounters:
        """What happened since ``earlier`` (the discard failure fields are the latest)."""
        discard = DiscardStats(**{
            name: getattr(self.discard, name) - getattr(earlier.discard, name) for name in DiscardStats._SUMMED
        })
        if discard.bytes_failed:
            discard.last_errno, discard.failed_region = self.discard.last_errno, self.discard.failed_region
        totals = {}
        for f in fields(self):
            if f.name in self._LATEST:
                continue
            now, then = getattr(self, f.name), getattr(earlier, f.name)
            totals[f.name] = tuple(a - b for a, b in zip(now, then)) if isinstance(now, tuple) else now - then
        latest = {name: getattr(self, name) for name in self._LATEST if name != "discard"}
        return WorkerCounters(**totals, **latest, discard=discard)


class QueueWorker:
    """A C thread serving one queue that moves pages (csrc/serve.c): per
    kick it pops with the sink of the queue's buffer format, updates the
    bitmap and the huge page tracker, frees, journals, fills the used ring
    and signals, all under the NativeLock.  ``format`` (a
    ``device.queues.BufferFormat``), the direction and ``journal_kind`` come
    from the queue's row of the queue table.

    It keeps the memory table, the lock and the queue alive until freed.
    Stop it before the memory table is closed or the queue replaced:
    request_stop(), then (once the caller holds the lock, the worker no
    longer touches the queue) join() in a thread, then free()."""

    def __init__(self, mem: GuestMemory, lock: NativeLock, vq: Virtqueue, *, format: int, inflate: bool,
                 journal_kind: int, kick_fd: int, call_fd: int | None, notify_fd: int | None,
                 flush_pages: int, journal: PageJournal | None = None,
                 config: ConfigMailbox | None = None) -> None:
        vq._check_mapped()
        if mem is not vq._mem:
            raise vq._fail("worker started with a different memory table than setup")
        err = _errbuf()
        worker = lib.vb_worker_start(
            mem._table(), lock._lock, vq._vq, int(format),
            lib.VB_DIRECTION_INFLATE if inflate else lib.VB_DIRECTION_DEFLATE, kick_fd,
            -1 if call_fd is None else call_fd, -1 if notify_fd is None else notify_fd,
            flush_pages, ffi.NULL if journal is None else journal._journal, int(journal_kind),
            ffi.NULL if config is None else config._config, err, _ERRLEN,
        )
        if worker == ffi.NULL:
            raise vq._fail(_errtext(err))
        self._worker = worker
        self._keep = (mem, lock, vq, config)
        self._journal = journal  # kept alive while the worker may append
        self._counters = ffi.new("vb_worker_counters *")
        self.inflate = inflate
        self.index = vq.index

    def set_call_fd(self, fd: int | None) -> None:
        """Hold the lock.  The worker signals its own duplicate of fd."""
        if lib.vb_worker_set_call_fd(self._worker, -1 if fd is None else fd) < 0:
            raise OSError(ffi.errno, f"queue {self.index}: cannot duplicate call fd {fd}")

    def set_flush_pages(self, pages: int) -> None:
        lib.vb_worker_set_flush_pages(self._worker, pages)

    def notice_pending(self) -> None:
        """Notify once more when pending pages appear (it notifies once, then
        waits to be asked again: the session's flush deadline covers them)."""
        lib.vb_worker_notice_pending(self._worker)

    def counters(self) -> WorkerCounters:
        c = self._counters
        lib.vb_worker_get_counters(self._worker, c)
        return WorkerCounters(
            kicks=c.kicks, spurious_kicks=c.spurious_kicks, batches=c.batches, buffers=c.buffers, pfns=c.pfns, changed=c.changed,
            invalid=c.invalid, last_invalid_pfn=c.last_invalid_pfn, unchanged=c.unchanged,
            last_unchanged_pfn=c.last_unchanged_pfn, pending_dropped=c.pending_dropped,
            signals=c.signals, flushes=c.flushes, freed_measured=c.freed_measured,
            discard=DiscardStats._from_c(c.discard),
            broken=_errtext(c.error) if c.broken else None, running=bool(c.running),
            journal_waits=c.journal_waits, journal_dropped=c.journal_dropped,
            refused=c.refused, last_refused=(c.last_refused_gpa, c.last_refused_len),
            last_refused_why=REFUSE_REASONS.get(c.last_refused_why, "") if c.refused else "",
            range_orders=tuple(c.range_orders),
            service_us_buckets=tuple(c.service_us_buckets), service_ns_sum=c.service_ns_sum,
        )

    def request_stop(self) -> None:
        lib.vb_worker_request_stop(self._worker)

    def join(self) -> None:
        """Blocking (the current batch finishes first): run it in a thread."""
        lib.vb_worker_join(self._worker)

    def free(self) -> None:
        if self._worker is not None:
            lib.vb_worker_free(self._worker)
            self._worker = None
            self._keep = None


# ---- the front-end's socket (csrc/front.c) -------------------------------------------

_FRONT_CHUNK_MAX = 65536


@dataclass(frozen=True)
class FrontChunk:
    """What the reader thread handed over: bytes and fds exactly as one
    recvmsg returned them (minus leading config messages it answered), or
    the end of the connection."""

    data: bytes
    fds: list[int]
    eof: bool = False
    fds_truncated: bool = False  # more fds than a message may carry arrived; they were closed
    error: int = 0  # errno of a failed read or write (the thread has ended)


@dataclass(frozen=True)
class FrontCounters:
    config_reads: int  # GET_CONFIGs answered by the reader thread
    config_writes: int  # SET_CONFIGs taken by the reader thread
    handed_over: int  # chunks handed to the session
    log_full: int  # SET_CONFIGs handed over because the write log was full


class FrontReader:
    """A C thread reading the front-end's socket (csrc/front.c).  It answers
    GET_CONFIG and SET_CONFIG of the shape QEMU sends once allowed
    (resume(fast=True)), and hands every other chunk to the session:
    ``chunk_fd`` becomes readable, take() returns it, resume() lets the
    thread read on.  It answers from, and writes to, the session's
    ConfigMailbox; ``writes_fd`` becomes readable when changes of ``actual``
    start to wait in the mailbox's log, ``target_fd`` when one of them
    brought the balloon to the target.  The socket fd is duplicated: the
    caller keeps its own."""

    def __init__(self, sock_fd: int, config: ConfigMailbox) -> None:
        self.chunk_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.writes_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.target_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        err = _errbuf()
        front = lib.vb_front_start(sock_fd, self.chunk_fd, self.writes_fd, self.target_fd, config._config,
                                   err, _ERRLEN)
        if front == ffi.NULL:
            for fd in (self.chunk_fd, self.writes_fd, self.target_fd):
                os.close(fd)
            raise OSError(_errtext(err))
        self._front = front
        self._config = config  # outlives the thread
        self._chunk = ffi.new("vb_front_chunk *")
        self._data = ffi.new("uint8_t[]", _FRONT_CHUNK_MAX)
        self._counters = ffi.new("vb_front_counters *")

    def take(self) -> FrontChunk | None:
        c = self._chunk
        if not lib.vb_front_take(self._front, c, self._data, _FRONT_CHUNK_MAX):
            return None
        return FrontChunk(
            bytes(ffi.buffer(self._data, c.len)), [c.fds[i] for i in range(c.nfds)],
            eof=bool(c.eof), fds_truncated=bool(c.ctrunc), error=c.error,
        )

    def resume(self, *, fast: bool, partial: bool) -> None:
        lib.vb_front_resume(self._front, 1 if fast else 0, 1 if partial else 0)

    def drain_signals(self) -> None:
        """Reset writes_fd and target_fd (before draining the mailbox's log)."""
        lib.vb_front_drain_config_signals(self._front)

    def counters(self) -> FrontCounters:
        c = self._counters
        lib.vb_front_get_counters(self._front, c)
        return FrontCounters(c.config_reads, c.config_writes, c.handed_over, c.log_full)

    def close(self) -> None:
        """Stops and joins the thread (blocking, briefly: it never waits on
        anything but its socket and the session), closes the eventfds."""
        if self._front is not None:
            lib.vb_front_free(self._front)
            self._front = None
            for fd in (self.chunk_fd, self.writes_fd, self.target_fd):
                os.close(fd)
