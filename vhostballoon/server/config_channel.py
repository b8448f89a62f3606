"""The config space and the back-end channel of one session.

The values live in the C mailbox (``native.ConfigMailbox``, the one owner),
which also holds the rule for a guest write.  The guest reads ``num_pages``
before and writes ``actual`` after every buffer; the C reader thread
(``native.FrontReader``) answers those messages from the mailbox, and the
mailbox logs each change of ``actual`` with the ``num_pages`` of that
moment.  This module replays that log (events, deflate-on-OOM accounting,
"guest at target"), sends the writes that come through the protocol
connection to the mailbox (then replays them the same way), and tells the
guest of a new target: CONFIG_CHANGE_MSG on the back-end channel.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import structlog
import trio

from ..device.balloon import BalloonDevice, plain_actual_step
from ..device.hugepages import HugePageTracker
from ..native import ConfigWrite, FrontReader, GuestMemory, at_target
from ..vhost_user import connection as vu
from ..vhost_user.constants import BackendRequest
from ..vhost_user.errors import ProtocolError
from .persist import SessionPersistence
from .transport import FdStream, close_fds

log = structlog.get_logger("vhostballoon.session")

BACKEND_REPLY_TIMEOUT = 5.0  # seconds to wait for the front-end's ack of CONFIG_CHANGE_MSG
# The guest's writes of ``actual`` taken by the reader thread are replayed
# (events, accounting) at most this often, in batches; a write that reaches
# the target is replayed at once (target_fd).
CONFIG_WRITES_INTERVAL = 0.05


class ConfigChannel:
    def __init__(
        self,
        *,
        device: BalloonDevice,
        memory: GuestMemory,
        huge: HugePageTracker,
        persist: SessionPersistence,
        front: FrontReader | None,
        publish: Callable[[str, dict], None],
        at_target: Callable[[str], None],
        reply_ack: Callable[[], bool],
    ) -> None:
        self.device = device
        self.memory = memory
        self.huge = huge
        self.persist = persist
        self.front = front
        self.publish = publish
        self.at_target = at_target  # the guest reached its target: flush what is pending
        self.reply_ack = reply_ack  # REPLY_ACK negotiated: CONFIG_CHANGE_MSG wants an ack
        self.backend_channel: FdStream | None = None
        self.backend_lock = trio.Lock()
        self.nursery: trio.Nursery | None = None

    # -- the config ----------------------------------------------------------

    def guest_at_target(self) -> bool:
        return self.device.at_target()

    async def writes_loop(self) -> None:
        """Replay the writes of actual the reader thread took, in batches."""
        while True:
            await trio.lowlevel.wait_readable(self.front.writes_fd)
            self.apply_writes()
            await trio.sleep(CONFIG_WRITES_INTERVAL)

    async def target_loop(self) -> None:
        """The guest wrote actual == num_pages: replay at once (the flush at
        the target starts from there), not at the batch pace."""
        while True:
            await trio.lowlevel.wait_readable(self.front.target_fd)
            self.apply_writes()

    def apply_writes(self) -> None:
        """Replay the changes of actual waiting in the mailbox's log."""
        if self.front is not None:
            self.front.drain_signals()
        self._replay(self.device.take_config_writes())

    def _replay(self, writes: list[ConfigWrite]) -> None:
        last = len(writes) - 1
        for i, w in enumerate(writes):
            # A step on the way to the target changes nothing but actual
            # (already in the mailbox; counted); the writes that matter are
            # announced: the last one, one at the target, one below what the
            # guest was asked and had (deflate-on-OOM).  Replaying 1024 writes
            # per GiB ballooned one by one showed up as a third of the
            # session's CPU.
            if i == last or not plain_actual_step(w.old_actual, w.new_actual, w.num_pages):
                self._actual_changed(w, announce=i == last)

    def read(self, offset: int, size: int) -> bytes:
        return self.device.read_config(offset, size)

    def written(self, offset: int, data: bytes) -> None:
        """A guest write of the config through the protocol connection."""
        self.apply_writes()  # the reader thread's first, in order
        write = self.device.write_config(offset, data)
        if write.poison_changed:
            log.info(
                "guest page poison value",
                poison_val=hex(write.poison_val),
                reported_pages=("kept: never discarded while the guest poisons free pages"
                                if write.poison_val else "discarded"),
            )
        self._replay(write.changes)

    def _actual_changed(self, w: ConfigWrite, *, announce: bool) -> None:
        """announce=False (all but the last of a replayed batch): the new
        actual is neither published as BALLOON_CHANGE nor recorded on disk,
        as QEMU throttles BALLOON_CHANGE to the latest value."""
        if announce:
            self.persist.record_actual(w.new_actual)
        actual = self.device.actual_bytes
        log.debug("guest balloon size", actual_pages=w.new_actual, num_pages=w.num_pages)
        unasked = self.device.pages_deflated_unasked_by(w)
        if unasked:
            log.info(
                "guest deflated its balloon below the target on its own (deflate-on-OOM)",
                pages=unasked, actual=actual, num_pages=self.device.config.num_pages,
            )
        if announce:
            self.publish("BALLOON_CHANGE", {"actual": actual})
        if at_target(w.num_pages, w.new_actual):
            log.info(
                "guest reached the target",
                actual=actual,
                ballooned_pages=w.new_actual,
                pending_partial_bytes=self.huge.state().collectable_bytes,
                huge_pages_freed_whole=self.device.counters.discard.huge_pages_whole,
                thp_splits=self.device.counters.discard.splits,
            )
            self.at_target("guest at target")

    def set_target(self, target_bytes: int) -> None:
        if self.device.set_target(target_bytes):
            log.info("new target for the guest", num_pages=self.device.config.num_pages)
            self.notify_change()

    # -- the back-end channel ------------------------------------------------

    def set_backend_channel(self, fd: int) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = FdStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))

    def notify_change(self) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(self._send_config_change)

    async def _send_config_change(self) -> None:
        channel = self.backend_channel
        if channel is None:
            log.warning("no backend channel (SET_BACKEND_REQ_FD): the guest cannot be told of the new target yet")
            return
        need_reply = self.reply_ack()
        message = vu.encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=need_reply)
        async with self.backend_lock:
            try:
                await channel.send(message)
                if need_reply:
                    with trio.fail_after(BACKEND_REPLY_TIMEOUT):
                        await self._wait_ack(channel)
            except trio.TooSlowError:
                log.warning("front-end did not ack CONFIG_CHANGE_MSG", timeout=BACKEND_REPLY_TIMEOUT)
            except (OSError, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("backend channel failed", error=str(exc))

    async def _wait_ack(self, channel: FdStream) -> None:
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

    def close(self) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
