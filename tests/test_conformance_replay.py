"""Replay what a real QEMU 10.2.2 sent, and compare our replies with the recorded ones.

The transcripts in ``protocol/transcripts/`` were recorded between a real
QEMU (``vhost-user-test-device-pci``, virtio-id 5) with a Linux guest and
this back-end, by ``scripts/record_qemu_transcript.py`` (format:
``protocol/README.md``). Here every front-end message is sent again, in the
recorded order and with its recorded flags (NEED_REPLY included) and payload,
to the in-process back-end over a real unix socket with real fds. Only
QEMU's resources are replaced by ours:

- the guest-RAM fd: one sparse, never-touched memfd of the recorded size,
  with each region's gpa, size and mmap_offset kept; the region's user
  address is moved into an address space of our own, and ring addresses
  are translated relative to it (so a back-end that ignored the region's
  uaddr would look in the wrong place);
- kick/call/err fds: fresh eventfds; SET_BACKEND_REQ_FD: one end of a
  socketpair, whose other end plays QEMU's part of the back-end channel;
- operator entries (``vhostballoon-ctl balloon``) become ``set_target`` calls.

Every reply must match the recorded one in request, flags and size, and in
payload wherever the value does not depend on what the guest did (the
GET_VRING_BASE index, which our empty rings cannot reproduce, is the
exception). The back-end must send exactly the recorded number of replies,
stay usable, and leak no fd.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import struct
import tempfile
import termios
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from vhostballoon.server.daemon import run_backend
from vhostballoon.server.service import BalloonService
from vhostballoon.testing.fds import fd_count
from vhostballoon.testing.waiting import wait_until
from vhostballoon.vhost_user.codec import (
    ConfigSpace,
    Empty,
    MemoryRegion,
    MemoryTable,
    Message,
    MessageDecoder,
    Raw,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringFd,
    VringState,
    close_fds,
    encode,
)
from vhostballoon.vhost_user.constants import (
    MAX_FDS,
    REPLY,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    Request,
)

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "protocol" / "transcripts"
# Committed data: a missing file is a failure, not a skip.
REQUIRED = ["qemu-10.2.2-balloon.json", "qemu-10.2.2-boot.json"]

# Our user-address space for guest RAM: far from QEMU's (0x7f.. in the
# recordings), so an untranslated ring address cannot land in guest memory.
OUR_UADDR_BASE = 0x5500_0000_0000
REPLY_TIMEOUT = 5.0
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
# virtio-balloon config (virtio 1.2, 5.5.4): le32 num_pages, actual, free_page_hint_cmd_id, poison_val
_BALLOON_CONFIG = struct.Struct("<4I")

_PAYLOAD_TYPES = {
    cls.__name__: cls
    for cls in (Empty, Raw, U64, VringState, VringAddr, VringFd, MemoryTable, SingleMemoryRegion, ConfigSpace)
}


def load_transcript(name: str) -> dict[str, Any]:
    path = TRANSCRIPTS / name
    assert path.exists(), (
        f"{path} is missing: it is committed data recorded from a real QEMU "
        "(re-record with scripts/record_qemu_transcript.py, see protocol/README.md)"
    )
    return json.loads(path.read_text())


def expand(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Undo the collapsing: each ``{"repeat": N, "of": BLOCK}`` becomes BLOCK
    N times. Entries from a repeat block are marked: their payloads are those
    of the last elided block, so guest-written values (``actual``) differ."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        if "repeat" in entry:
            for _ in range(entry["repeat"]):
                out.extend({**e, "repeated": True} for e in entry["of"])
        else:
            out.append(entry)
    return out


def payload_from_json(data: dict[str, Any]) -> Any:
    kind = _PAYLOAD_TYPES[data["type"]]
    fields = {k: v for k, v in data.items() if k != "type"}
    if kind is SingleMemoryRegion:
        return SingleMemoryRegion(MemoryRegion(**fields["region"]))
    if kind is MemoryTable:
        return MemoryTable(tuple(MemoryRegion(**r) for r in fields["regions"]))
    if kind in (ConfigSpace, Raw):
        fields["data"] = bytes.fromhex(fields["data"])
    return kind(**fields)


def regions_of(entries: list[dict[str, Any]]) -> list[MemoryRegion]:
    regions = []
    for e in entries:
        if e.get("direction") == "front-end" and e.get("request") in ("ADD_MEM_REG", "SET_MEM_TABLE"):
            payload = payload_from_json(e["payload"])
            regions += [payload.region] if isinstance(payload, SingleMemoryRegion) else list(payload.regions)
    return regions


class Peer:
    """One end of a unix stream socket: messages out with fds, messages in."""

    def __init__(self, sock: trio.socket.SocketType, decoder: MessageDecoder, what: str) -> None:
        self.sock = sock
        self.decoder = decoder
        self.what = what

    async def send(self, data: bytes, fds: list[int]) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sent = await self.sock.sendmsg([data], anc)
        assert sent == len(data)

    async def receive(self, expected: str) -> Message:
        with trio.move_on_after(REPLY_TIMEOUT):
            while (message := self.decoder.next_message()) is None:
                data, ancdata, _, _ = await self.sock.recvmsg(65536, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
                fds = [fd for lvl, typ, blob in ancdata if typ == socket.SCM_RIGHTS for fd in array.array("i", blob)]
                if not data:
                    close_fds(fds)
                    pytest.fail(f"{self.what}: the back-end closed the socket; expected {expected}")
                self.decoder.feed(data, fds)
            assert not message.fds, f"{self.what}: {message.name} carries fds"
            return message
        pytest.fail(f"{self.what}: no message within {REPLY_TIMEOUT} s; expected {expected} (a missing reply?)")

    def assert_idle(self) -> None:
        """Nothing more has arrived (no extra reply or ack)."""
        assert not self.decoder.has_partial_message, f"{self.what}: stray bytes buffered"
        pending = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, pending)  # SIOCINQ: unread bytes
        assert pending[0] == 0, f"{self.what}: {pending[0]} unexpected bytes from the back-end"

    def close(self) -> None:
        self.sock.close()
        self.decoder.close()


class Replay:
    """Plays QEMU's part of one transcript against the back-end."""

    def __init__(self, service: BalloonService, front: Peer, memfd: int, regions: list[MemoryRegion]) -> None:
        self.service = service
        self.front = front
        self.memfd = memfd
        # (QEMU's uaddr, size, our uaddr) per region
        self.uaddr_map = [(r.uaddr, r.size, OUR_UADDR_BASE + r.gpa) for r in regions]
        self.channel: Peer | None = None
        self.actual_written: int | None = None  # the `actual` of our last SET_CONFIG
        self.replies_checked = 0

    def our_uaddr(self, qemu_uaddr: int) -> int:
        for start, size, ours in self.uaddr_map:
            if start <= qemu_uaddr < start + size:
                return ours + (qemu_uaddr - start)
        raise AssertionError(f"ring address {qemu_uaddr:#x} is outside every recorded memory region")

    async def run(self, entries: list[dict[str, Any]]) -> None:
        for number, entry in enumerate(entries):
            where = f"entry {number} ({entry.get('direction')} {entry.get('request', '')})"
            if entry["direction"] == "operator":
                self.service.set_target(entry["value"])
            elif entry["direction"] == "note":
                continue
            elif entry["channel"] == "vhost-user" and entry["direction"] == "front-end":
                await self.send_request(entry)
            elif entry["channel"] == "vhost-user":
                reply = await self.front.receive(f"the reply to {entry['request']} ({where})")
                self.check_reply(entry, reply, where)
                self.replies_checked += 1
            elif entry["direction"] == "back-end":  # back-end channel request
                assert self.channel is not None, f"{where}: no back-end channel was set up"
                message = await self.channel.receive(f"{entry['request']} ({where})")
                assert (message.name, f"{message.flags:#x}", message.size) == (
                    entry["request"], entry["flags"], entry["size"]
                ), f"{where}: back-end channel message differs"
            else:  # QEMU's reply on the back-end channel, verbatim
                assert self.channel is not None
                request = BackendRequest[entry["request"]]
                payload = payload_from_json(entry["payload"])
                await self.channel.send(encode(request, payload, flags=int(entry["flags"], 16)), [])

    async def send_request(self, entry: dict[str, Any]) -> None:
        request = Request[entry["request"]]
        payload = payload_from_json(entry["payload"])
        fds: list[int] = []
        if request in (Request.ADD_MEM_REG, Request.SET_MEM_TABLE):
            regions = [payload.region] if isinstance(payload, SingleMemoryRegion) else list(payload.regions)
            moved = [
                MemoryRegion(r.gpa, r.size, self.our_uaddr(r.uaddr), r.mmap_offset) for r in regions
            ]
            payload = SingleMemoryRegion(moved[0]) if isinstance(payload, SingleMemoryRegion) else MemoryTable(moved)
            fds = [self.memfd] * len(moved)
        elif request == Request.SET_VRING_ADDR:
            payload = VringAddr(
                payload.index,
                payload.flags,
                self.our_uaddr(payload.desc),
                self.our_uaddr(payload.used),
                self.our_uaddr(payload.avail),
                payload.log,  # a guest physical address (log_guest_addr): kept
            )
        elif request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            if not payload.invalid:
                fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)]
        elif request == Request.SET_BACKEND_REQ_FD:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.channel = Peer(
                trio.socket.from_stdlib_socket(ours), MessageDecoder.for_backend_requests(), "back-end channel"
            )
            fds = [theirs.detach()]
        elif request == Request.SET_CONFIG:
            self.actual_written = _BALLOON_CONFIG.unpack(payload.data)[1]
        assert len(fds) == entry["fds"], f"{request.name}: recorded with {entry['fds']} fds, replaying {len(fds)}"
        data = encode(request, payload, flags=int(entry["flags"], 16))
        try:
            await self.front.send(data, fds)
        finally:  # the kernel passed its own copies; ours are done with
            close_fds([fd for fd in fds if fd != self.memfd])

    def check_reply(self, entry: dict[str, Any], reply: Message, where: str) -> None:
        got = (reply.name, f"{reply.flags:#x}", reply.size)
        assert got == (entry["request"], entry["flags"], entry["size"]), (
            f"{where}: reply {got} differs from QEMU's recording "
            f"{(entry['request'], entry['flags'], entry['size'])}"
        )
        recorded = payload_from_json(entry["payload"])
        if isinstance(recorded, VringState):  # GET_VRING_BASE: num is the guest's ring progress
            assert isinstance(reply.payload, VringState) and reply.payload.index == recorded.index, where
        elif isinstance(recorded, ConfigSpace) and entry.get("repeated"):
            # A collapsed block carries the last block's payloads: check the
            # back-end's fields exactly, and `actual` against what we wrote.
            assert isinstance(reply.payload, ConfigSpace), where
            assert (reply.payload.offset, reply.payload.size, reply.payload.flags) == (
                recorded.offset, recorded.size, recorded.flags
            ), where
            num_pages, actual, hint, poison = _BALLOON_CONFIG.unpack(reply.payload.data)
            want_num_pages, _, want_hint, want_poison = _BALLOON_CONFIG.unpack(recorded.data)
            assert (num_pages, hint, poison) == (want_num_pages, want_hint, want_poison), where
            assert actual == self.actual_written, where
        else:  # features, protocol features, queue num, mem slots, status, acks, config
            assert reply.payload == recorded, f"{where}: payload {reply.payload!r}, QEMU got {recorded!r}"


@pytest.mark.parametrize("name", REQUIRED)
async def test_replay_of_qemu_transcript(name: str) -> None:
    transcript = load_transcript(name)
    entries = expand(transcript["messages"])
    messages = [e for e in entries if "request" in e]
    assert len(messages) == transcript["message_count"], "collapsed entries do not expand to the recorded count"
    recorded_replies = sum(1 for e in messages if e["channel"] == "vhost-user" and e["direction"] == "back-end")
    regions = regions_of(entries)
    assert regions, "the transcript sets up no guest memory"

    sock_dir = tempfile.mkdtemp(prefix="vb-replay-", dir="/tmp")  # sun_path holds 108 bytes
    fds_before = fd_count()
    # The back-end offers what it offered when the transcript was recorded
    # (its default offer has grown since: stats, reporting, poison, oom), so
    # every reply, GET_FEATURES included, can be compared with the recording.
    first_features = next(e for e in messages if e["request"] == "GET_FEATURES" and e["direction"] == "back-end")
    service = BalloonService(features=first_features["payload"]["value"] & ~VHOST_USER_F_PROTOCOL_FEATURES)
    memfd = os.memfd_create("replayed-guest-ram", os.MFD_CLOEXEC)
    front = channel = None
    try:
        os.ftruncate(memfd, max(r.mmap_offset + r.size for r in regions))  # sparse: never touched
        async with trio.open_nursery() as nursery:
            path = os.path.join(sock_dir, "vb.sock")
            await nursery.start(partial(run_backend, path, control_path="", service=service))
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(path)
            front = Peer(sock, MessageDecoder.for_replies(), "vhost-user socket")
            replay = Replay(service, front, memfd, regions)
            await replay.run(entries)
            channel = replay.channel
            assert replay.replies_checked == recorded_replies

            # No extra reply is pending, and the back-end still answers.
            await trio.sleep(0.05)
            front.assert_idle()
            if channel is not None:
                channel.assert_idle()
            await front.send(encode(Request.GET_FEATURES), [])
            reply = await front.receive("the reply to GET_FEATURES after the replay")
            assert (reply.request, reply.flags) == (Request.GET_FEATURES, REPLY | VERSION)
            assert reply.payload == U64(first_features["payload"]["value"])
            assert service.session is not None and not service.session.broken_queues()

            front.close()  # QEMU goes away, as at the end of the recording
            front = None
            await wait_until(lambda: service.session is None, what="the session to end")
            nursery.cancel_scope.cancel()
    finally:
        for peer in (front, channel):
            if peer is not None:
                peer.close()
        os.close(memfd)
        os.rmdir(sock_dir)
    assert fd_count() == fds_before, "file descriptors leaked"

