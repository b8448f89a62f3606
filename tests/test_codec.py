"""The vhost-user wire codec: round trips, any chunking, malformed input.

Fds are real (pipes, eventfds); leaks show in /proc/self/fd. The chunking
model follows the kernel: the fds of one sendmsg come with the recvmsg chunk
holding that sendmsg's first byte, and that chunk ends within the sendmsg
(unix_stream_read_generic breaks after an skb that carries fds); a chunk may
begin with the tail of earlier fd-less messages.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostballoon.vhost_user.codec import (
    ConfigSpace,
    Direction,
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
    encode,
)
from vhostballoon.vhost_user.constants import (
    HEADER_SIZE,
    MAX_BODY_SIZE,
    NEED_REPLY,
    REPLY,
    VERSION,
    BackendRequest,
    Request,
)
from vhostballoon.testing.fds import is_open, no_fd_leak
from vhostballoon.vhost_user.errors import LocalProtocolError, ProtocolError


def new_fds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


REGION = MemoryRegion(gpa=0, size=1 << 30, uaddr=0x7F00_0000_0000, mmap_offset=0)
REGION2 = MemoryRegion(gpa=1 << 32, size=1 << 29, uaddr=0x7F80_0000_0000, mmap_offset=1 << 30)

# (direction, request, payload, number of fds, flags extra)
SAMPLES = [
    (Direction.REQUESTS, Request.GET_FEATURES, Empty(), 0),
    (Direction.REQUESTS, Request.SET_FEATURES, U64((1 << 32) | (1 << 30) | 0x7), 0),
    (Direction.REQUESTS, Request.SET_OWNER, Empty(), 0),
    (Direction.REQUESTS, Request.RESET_OWNER, Empty(), 0),
    (Direction.REQUESTS, Request.SET_MEM_TABLE, MemoryTable((REGION,)), 1),
    (Direction.REQUESTS, Request.SET_MEM_TABLE, MemoryTable((REGION, REGION2)), 2),
    (Direction.REQUESTS, Request.SET_VRING_NUM, VringState(3, 256), 0),
    (Direction.REQUESTS, Request.SET_VRING_ADDR, VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0), 0),
    (Direction.REQUESTS, Request.SET_VRING_BASE, VringState(2, 0), 0),
    (Direction.REQUESTS, Request.GET_VRING_BASE, VringState(2, 0), 0),
    (Direction.REQUESTS, Request.SET_VRING_KICK, VringFd(4), 1),
    (Direction.REQUESTS, Request.SET_VRING_KICK, VringFd(4, invalid=True), 0),
    (Direction.REQUESTS, Request.SET_VRING_CALL, VringFd(255), 1),
    (Direction.REQUESTS, Request.SET_VRING_ERR, VringFd(0), 1),
    (Direction.REQUESTS, Request.GET_PROTOCOL_FEATURES, Empty(), 0),
    (Direction.REQUESTS, Request.SET_PROTOCOL_FEATURES, U64(0x1822B), 0),
    (Direction.REQUESTS, Request.GET_QUEUE_NUM, Empty(), 0),
    (Direction.REQUESTS, Request.SET_VRING_ENABLE, VringState(4, 1), 0),
    (Direction.REQUESTS, Request.SET_BACKEND_REQ_FD, Empty(), 1),
    (Direction.REQUESTS, Request.GET_CONFIG, ConfigSpace(0, 16, 0, bytes(16)), 0),
    (Direction.REQUESTS, Request.SET_CONFIG, ConfigSpace(4, 4, 0, b"\x01\x02\x03\x04"), 0),
    (Direction.REQUESTS, Request.SET_CONFIG, ConfigSpace(0, 256, 1, bytes(range(256))), 0),
    (Direction.REQUESTS, Request.RESET_DEVICE, Empty(), 0),
    (Direction.REQUESTS, Request.GET_MAX_MEM_SLOTS, Empty(), 0),
    (Direction.REQUESTS, Request.ADD_MEM_REG, SingleMemoryRegion(REGION), 1),
    (Direction.REQUESTS, Request.REM_MEM_REG, SingleMemoryRegion(REGION), 0),
    (Direction.REQUESTS, Request.REM_MEM_REG, SingleMemoryRegion(REGION), 1),
    (Direction.REQUESTS, Request.SET_STATUS, U64(0x8), 0),
    (Direction.REQUESTS, Request.GET_STATUS, Empty(), 0),
    (Direction.REQUESTS, Request.SEND_RARP, Raw(b"\x52\x54\x00\x12\x34\x56\x00\x00"), 0),
    (Direction.REQUESTS, Request.SET_LOG_BASE, Raw(bytes(16)), 1),
    (Direction.REPLIES, Request.GET_FEATURES, U64(1 << 32), 0),
    (Direction.REPLIES, Request.GET_VRING_BASE, VringState(1, 517), 0),
    (Direction.REPLIES, Request.GET_CONFIG, ConfigSpace(0, 16, 0, bytes(range(16))), 0),
    (Direction.REPLIES, Request.GET_CONFIG, Empty(), 0),
    (Direction.REPLIES, Request.SET_MEM_TABLE, U64(0), 0),
    (Direction.REPLIES, Request.SET_VRING_ENABLE, U64(1), 0),
    (Direction.BACKEND_REQUESTS, BackendRequest.CONFIG_CHANGE_MSG, Empty(), 0),
    (Direction.BACKEND_REQUESTS, BackendRequest.VRING_CALL, VringState(2, 0), 0),
    (Direction.BACKEND_REPLIES, BackendRequest.CONFIG_CHANGE_MSG, U64(0), 0),
]


def wire(direction: Direction, request, payload, *, need_reply: bool = False) -> bytes:
    replies = direction in (Direction.REPLIES, Direction.BACKEND_REPLIES)
    return encode(request, payload, reply=replies, need_reply=need_reply and not replies)


def chunked(messages: list[tuple[bytes, list[int]]], cuts: set[int]):
    """Split the concatenated messages at ``cuts`` (stream offsets) and after
    every fd-carrying message; each message's fds go with the chunk that holds
    its first byte."""
    stream = b"".join(data for data, _ in messages)
    starts, pos = [], 0
    boundaries = set(c for c in cuts if 0 < c < len(stream))
    for data, fds in messages:
        starts.append((pos, fds))
        pos += len(data)
        if fds:
            boundaries.add(pos)
    edges = [0, *sorted(b for b in boundaries if b < len(stream)), len(stream)]
    chunks = []
    for a, b in zip(edges, edges[1:]):
        fds = [fd for start, fds in starts for fd in fds if a <= start < b]
        chunks.append((stream[a:b], fds))
    return chunks


def decode_all(direction: Direction, chunks) -> list[Message]:
    decoder = MessageDecoder(direction)
    out = []
    for data, fds in chunks:
        decoder.feed(data, fds)
        while (message := decoder.next_message()) is not None:
            out.append(message)
    assert not decoder.has_partial_message
    decoder.close()
    return out


# -- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("direction,request_,payload,nfds", SAMPLES, ids=lambda v: getattr(v, "name", None))
def test_round_trip(direction, request_, payload, nfds):
    with no_fd_leak():
        fds = new_fds(nfds)
        data = wire(direction, request_, payload, need_reply=True)
        decoder = MessageDecoder(direction)
        decoder.feed(data, fds)
        message = decoder.next_message()
        assert message == Message(
            request_, data[4] | data[5] << 8, payload, tuple(fds)
        )
        assert message.request is request_
        assert message.size == len(data) - HEADER_SIZE
        assert decoder.next_message() is None
        assert all(is_open(fd) for fd in fds)  # the caller owns them now
        for fd in fds:
            os.close(fd)


def test_header_layout_and_flags():
    data = encode(Request.SET_VRING_NUM, VringState(1, 256), need_reply=True)
    assert data == struct.pack("=IIIII", 8, VERSION | NEED_REPLY, 8, 1, 256)
    reply = encode(Request.GET_FEATURES, U64(5), reply=True)
    assert reply == struct.pack("=IIIQ", 1, VERSION | REPLY, 8, 5)
    message = MessageDecoder.for_replies()
    message.feed(reply)
    m = message.next_message()
    assert m.is_reply and not m.need_reply and m.flags == 0x5


def test_wire_sizes_match_qemu():
    # hw/virtio/vhost-user.c: sizeof(vhost_vring_addr) 40, VhostUserMemRegMsg 40,
    # SET_MEM_TABLE 8 + 32 * n, config 12 + size.
    assert len(encode(Request.SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3, 4))) == HEADER_SIZE + 40
    assert len(encode(Request.ADD_MEM_REG, SingleMemoryRegion(REGION))) == HEADER_SIZE + 40
    assert len(encode(Request.SET_MEM_TABLE, MemoryTable([REGION, REGION2]))) == HEADER_SIZE + 8 + 64
    assert len(encode(Request.GET_CONFIG, ConfigSpace(0, 16, 0, bytes(16)))) == HEADER_SIZE + 28


# -- any chunking decodes the same ---------------------------------------------------


def stream_samples(direction):
    return [(r, p, n) for d, r, p, n in SAMPLES if d is direction]


def build_stream(direction):
    items = stream_samples(direction)
    fds_per = [new_fds(n) for _, _, n in items]
    messages = [(wire(direction, r, p), fds) for (r, p, _), fds in zip(items, fds_per)]
    expected = [
        Message(r, (VERSION | REPLY) if direction in (Direction.REPLIES, Direction.BACKEND_REPLIES) else VERSION, p, tuple(fds))
        for (r, p, _), fds in zip(items, fds_per)
    ]
    return messages, expected


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("how", ["whole", "byte_by_byte"])
def test_same_whole_and_byte_by_byte(direction, how):
    with no_fd_leak():
        messages, expected = build_stream(direction)
        total = sum(len(d) for d, _ in messages)
        cuts = set() if how == "whole" else set(range(total))
        assert decode_all(direction, chunked(messages, cuts)) == expected
        for m in expected:
            for fd in m.fds:
                os.close(fd)


def test_every_single_split_point():
    with no_fd_leak():
        messages, expected = build_stream(Direction.REQUESTS)
        total = sum(len(d) for d, _ in messages)
        for cut in range(1, total):
            assert decode_all(Direction.REQUESTS, chunked(messages, {cut})) == expected
        for m in expected:
            for fd in m.fds:
                os.close(fd)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_split_anywhere(data):
    with no_fd_leak():
        messages, expected = build_stream(Direction.REQUESTS)
        total = sum(len(d) for d, _ in messages)
        cuts = data.draw(st.sets(st.integers(1, total - 1), max_size=40))
        try:
            assert decode_all(Direction.REQUESTS, chunked(messages, cuts)) == expected
        finally:
            for m in expected:
                for fd in m.fds:
                    os.close(fd)


def test_fds_belong_to_last_message_starting_in_chunk():
    # What the kernel really returns when QEMU sends SET_VRING_NUM, SET_VRING_BASE
    # and SET_VRING_KICK(fd) back to back and we read late: one chunk, one fd.
    with no_fd_leak():
        (kick,) = new_fds(1)
        stream = (
            encode(Request.SET_VRING_NUM, VringState(0, 64))
            + encode(Request.SET_VRING_BASE, VringState(0, 0))
            + encode(Request.SET_VRING_KICK, VringFd(0))
        )
        decoder = MessageDecoder.for_requests()
        decoder.feed(stream, [kick])
        got = [decoder.next_message() for _ in range(3)]
        assert [m.fds for m in got] == [(), (), (kick,)]
        os.close(kick)


# -- trailing garbage -------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage,error",
    [
        (struct.pack("=III", 99, VERSION, 0), "unknown request 99"),
        (struct.pack("=III", 3, 0x2, 0), "SET_OWNER: version 2 in flags 0x2 (expected 1)"),
        (struct.pack("=III", 8, VERSION, 4) + b"\0" * 4, "SET_VRING_NUM: body is 4 bytes, expected 8"),
        (b"\xff" * 12, "version 3 in flags 0xffffffff"),
    ],
)
def test_trailing_garbage(garbage, error):
    with no_fd_leak():
        (fd,) = new_fds(1)
        decoder = MessageDecoder.for_requests()
        # an fd-less message and the garbage in one chunk, after an fd message
        decoder.feed(encode(Request.SET_VRING_CALL, VringFd(1)), [fd])
        decoder.feed(encode(Request.SET_VRING_NUM, VringState(1, 64)) + garbage)
        first = decoder.next_message()
        assert first == Message(Request.SET_VRING_CALL, VERSION, VringFd(1), (fd,))
        second = decoder.next_message()
        assert second == Message(Request.SET_VRING_NUM, VERSION, VringState(1, 64))
        with pytest.raises(ProtocolError) as info:
            decoder.next_message()
        assert error in str(info.value)
        os.close(fd)


def test_partial_header_is_not_an_error():
    decoder = MessageDecoder.for_requests()
    decoder.feed(b"\x01\x00\x00")
    assert decoder.next_message() is None
    assert decoder.has_partial_message


# -- malformed input: a clear error, fds closed, decoder poisoned -------------------------


def hdr(request: int, flags: int, size: int) -> bytes:
    return struct.pack("=III", request, flags, size)


MALFORMED = [
    # (label, bytes, number of fds, direction, expected message)
    ("wrong size", hdr(8, 1, 4) + b"\0" * 4, 0, Direction.REQUESTS, "SET_VRING_NUM: body is 4 bytes, expected 8"),
    ("wrong size addr", hdr(9, 1, 48) + b"\0" * 48, 0, Direction.REQUESTS, "SET_VRING_ADDR: body is 48 bytes, expected 40"),
    ("unknown request", hdr(99, 1, 0), 1, Direction.REQUESTS, "unknown request 99"),
    ("request 0", hdr(0, 1, 0), 0, Direction.REQUESTS, "unknown request 0"),
    ("bad version", hdr(1, 2, 0), 0, Direction.REQUESTS, "GET_FEATURES: version 2 in flags 0x2 (expected 1)"),
    ("version 0", hdr(1, 0, 0), 0, Direction.REQUESTS, "GET_FEATURES: version 0 in flags 0x0 (expected 1)"),
    ("unknown flag bits", hdr(3, 0x11, 0), 0, Direction.REQUESTS, "SET_OWNER: unknown flag bits 0x10 in flags 0x11"),
    ("reply flag on request", hdr(3, 0x5, 0), 0, Direction.REQUESTS, "SET_OWNER: REPLY flag set on a request"),
    ("fd on no-fd request", hdr(3, 1, 0), 1, Direction.REQUESTS, "SET_OWNER carries 1 fd, takes none"),
    ("fds on no-fd request", hdr(8, 1, 8) + struct.pack("=II", 0, 64), 2, Direction.REQUESTS,
     "SET_VRING_NUM carries 2 fds, takes none"),
    ("missing fd", encode(Request.SET_VRING_KICK, VringFd(2)), 0, Direction.REQUESTS,
     "SET_VRING_KICK carries 0 fds, takes exactly 1 (no-fd bit not set)"),
    ("fd with no-fd bit", encode(Request.SET_VRING_CALL, VringFd(2, invalid=True)), 1, Direction.REQUESTS,
     "SET_VRING_CALL carries 1 fd but its no-fd bit (0x100) is set"),
    ("reserved vring fd bits", encode(Request.SET_VRING_ERR, U64(0x201)), 1, Direction.REQUESTS,
     "SET_VRING_ERR: reserved bits 0x200 set in 0x201"),
    ("backend req fd missing", encode(Request.SET_BACKEND_REQ_FD), 0, Direction.REQUESTS,
     "SET_BACKEND_REQ_FD carries 0 fds, takes exactly 1"),
    ("add mem reg two fds", encode(Request.ADD_MEM_REG, SingleMemoryRegion(REGION)), 2, Direction.REQUESTS,
     "ADD_MEM_REG carries 2 fds, takes exactly 1"),
    ("rem mem reg two fds", encode(Request.REM_MEM_REG, SingleMemoryRegion(REGION)), 2, Direction.REQUESTS,
     "REM_MEM_REG carries 2 fds, takes at most 1"),
    ("too many regions", hdr(5, 1, 8 + 32 * 9) + struct.pack("=II", 9, 0) + bytes(32 * 9), 8, Direction.REQUESTS,
     "SET_MEM_TABLE: 9 regions (at most 8)"),
    ("zero regions", hdr(5, 1, 8) + struct.pack("=II", 0, 0), 0, Direction.REQUESTS, "SET_MEM_TABLE: 0 regions (at least 1)"),
    ("regions/fds mismatch", encode(Request.SET_MEM_TABLE, MemoryTable((REGION, REGION2))), 1, Direction.REQUESTS,
     "SET_MEM_TABLE: 2 regions but 1 fd"),
    ("table size mismatch", hdr(5, 1, 8 + 64) + struct.pack("=II", 1, 0) + bytes(64), 1, Direction.REQUESTS,
     "SET_MEM_TABLE: body is 72 bytes, expected 40 for 1 regions"),
    ("table too short", hdr(5, 1, 4) + bytes(4), 0, Direction.REQUESTS,
     "SET_MEM_TABLE: body is 4 bytes, shorter than its 8-byte region count"),
    ("config too big", hdr(25, 1, 12 + 257) + struct.pack("=III", 0, 257, 0) + bytes(257), 0, Direction.REQUESTS,
     "SET_CONFIG: config size 257 (at most 256)"),
    ("config size mismatch", hdr(24, 1, 12 + 8) + struct.pack("=III", 0, 16, 0) + bytes(8), 0, Direction.REQUESTS,
     "GET_CONFIG: body is 20 bytes, expected 28 (12 + config size 16)"),
    ("huge body", hdr(19, 1, 0xFFFFFFF0), 0, Direction.REQUESTS, f"SEND_RARP: body is 4294967280 bytes (at most {MAX_BODY_SIZE})"),
    ("reply without REPLY flag", hdr(1, 1, 8) + bytes(8), 0, Direction.REPLIES, "reply to GET_FEATURES: REPLY flag missing in flags 0x1"),
    ("reply with NEED_REPLY", hdr(1, 0xD, 8) + bytes(8), 0, Direction.REPLIES,
     "reply to GET_FEATURES: NEED_REPLY flag set on a reply (flags 0xd)"),
    ("ack wrong size", hdr(5, 5, 4) + bytes(4), 0, Direction.REPLIES, "reply to SET_MEM_TABLE: body is 4 bytes, expected 8"),
    ("unknown backend request", hdr(77, 1, 0), 0, Direction.BACKEND_REQUESTS, "unknown back-end request 77"),
    ("backend ack with fd", hdr(2, 5, 8) + bytes(8), 1, Direction.BACKEND_REPLIES,
     "reply to back-end CONFIG_CHANGE_MSG carries 1 fd, takes none"),
]


@pytest.mark.parametrize("label,data,nfds,direction,error", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed(label, data, nfds, direction, error):
    with no_fd_leak():
        fds = new_fds(nfds)
        decoder = MessageDecoder(direction)
        decoder.feed(data, fds)
        with pytest.raises(ProtocolError) as info:
            decoder.next_message()
        assert error in str(info.value)
        assert not any(is_open(fd) for fd in fds)
        # poisoned: every later call raises, and fds fed now are closed too
        with pytest.raises(ProtocolError):
            decoder.next_message()
        (late,) = new_fds(1)
        with pytest.raises(ProtocolError):
            decoder.feed(encode(Request.SET_VRING_CALL, VringFd(0)), [late])
        assert not is_open(late)


def test_error_before_body_arrives_closes_fds():
    # The header alone is enough to refuse a wrong fixed size; fds fed with it go.
    with no_fd_leak():
        fds = new_fds(2)
        decoder = MessageDecoder.for_requests()
        decoder.feed(hdr(8, 1, 4000), fds)
        with pytest.raises(ProtocolError, match="SET_VRING_NUM: body is 4000 bytes, expected 8"):
            decoder.next_message()
        assert not any(is_open(fd) for fd in fds)


def test_fds_in_the_middle_of_a_message():
    with no_fd_leak():
        (fd,) = new_fds(1)
        data = encode(Request.SET_VRING_NUM, VringState(0, 64))
        decoder = MessageDecoder.for_requests()
        decoder.feed(data[:5])
        decoder.feed(data[5:], [fd])
        with pytest.raises(ProtocolError, match="SET_VRING_NUM: 1 fd arrived with bytes 5..19 of the message, not with its first byte"):
            decoder.next_message()
        assert not is_open(fd)


def test_too_many_fds_in_one_chunk():
    with no_fd_leak():
        fds = new_fds(9)
        decoder = MessageDecoder.for_requests()
        with pytest.raises(ProtocolError, match="9 fds arrived with one chunk"):
            decoder.feed(encode(Request.SET_OWNER), fds)
        assert not any(is_open(fd) for fd in fds)


def test_rejected_message_closes_fds_buffered_for_later_messages():
    with no_fd_leak():
        (fd,) = new_fds(1)
        decoder = MessageDecoder.for_requests()
        decoder.feed(hdr(99, 1, 0) + encode(Request.SET_VRING_CALL, VringFd(0)), [fd])
        with pytest.raises(ProtocolError, match="unknown request 99"):
            decoder.next_message()
        assert not is_open(fd)


def test_close_closes_held_fds():
    with no_fd_leak():
        fds = new_fds(2)
        decoder = MessageDecoder.for_requests()
        data = encode(Request.SET_MEM_TABLE, MemoryTable((REGION, REGION2)))
        decoder.feed(data[:20], fds)  # not whole yet: the decoder holds the fds
        assert decoder.next_message() is None
        assert all(is_open(fd) for fd in fds)
        decoder.close()
        decoder.close()
        assert not any(is_open(fd) for fd in fds)
        with pytest.raises(LocalProtocolError):
            decoder.next_message()


def test_fds_without_data_is_local_misuse():
    with no_fd_leak():
        fds = new_fds(1)
        decoder = MessageDecoder.for_requests()
        with pytest.raises(LocalProtocolError):
            decoder.feed(b"", fds)
        assert not is_open(fds[0])


def test_encode_rejects_values_that_do_not_fit():
    with pytest.raises(LocalProtocolError):
        encode(Request.SET_FEATURES, U64(1 << 64))
    with pytest.raises(LocalProtocolError):
        encode(Request.SET_VRING_KICK, VringFd(256))
    with pytest.raises(LocalProtocolError):
        ConfigSpace(0, 16, 0, bytes(8))
    with pytest.raises(LocalProtocolError):
        encode(Request.SET_OWNER, "not a payload")  # type: ignore[arg-type]


def test_fd_message_sharing_a_sendmsg_with_the_next_message_is_explained():
    with no_fd_leak():
        (fd,) = new_fds(1)
        decoder = MessageDecoder.for_requests()
        decoder.feed(encode(Request.SET_VRING_CALL, VringFd(0)) + encode(Request.SET_OWNER), [fd])
        with pytest.raises(ProtocolError, match="send each fd-carrying message with its own sendmsg"):
            decoder.next_message()
        assert not is_open(fd)
