"""The C reader of the front-end's socket (csrc/front.c): the guest's per-buffer
GET_CONFIG and SET_CONFIG answered in C, everything else by the session, and
the two indistinguishable on the wire.

Real back-ends in this process, a real unix socket; one back-end answers
config messages in C (the default), the other sends every message through
the Python session (``BalloonService(fast_config=False)``)."""

from __future__ import annotations

import os
import struct
from contextlib import asynccontextmanager
from functools import partial

import trio
from hypothesis import given
from hypothesis import strategies as st

from backend_support import MiB, PAGE, log_text, wait_no_session, wait_until
from vhostballoon.device.balloon import BalloonDevice, plain_actual_step
from vhostballoon.device.features import DEFAULT_FEATURES
from vhostballoon.native import GuestMemory
from vhostballoon.server.daemon import run_backend
from vhostballoon.server.service import BalloonService
from vhostballoon.testing import model_guest
from vhostballoon.testing.fds import fd_count
from vhostballoon.testing.frontend import Frontend
from vhostballoon.vhost_user.codec import ConfigSpace, Empty, encode
from vhostballoon.vhost_user.constants import Request

ZERO = bytes(16)


def config(num_pages: int = 0, actual: int = 0, poison: int = 0) -> bytes:
    return struct.pack("<IIII", num_pages, actual, 0, poison)


def get_config(*, need_reply: bool = False, offset: int = 0, size: int = 16) -> bytes:
    return encode(Request.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)), need_reply=need_reply)


def set_config(data: bytes, *, need_reply: bool = True) -> bytes:
    return encode(Request.SET_CONFIG, ConfigSpace(0, len(data), 0, data), need_reply=need_reply)


# Pipelined in one write: C answers the leading run of config messages, the
# session the rest (a partial read, then GET_FEATURES).
SCRIPT = [
    (get_config(), 1),
    (set_config(config(actual=5)), 1),  # NEED_REPLY: acked
    (get_config(), 1),  # sees actual 5
    (set_config(config(num_pages=99, actual=7), need_reply=False), 0),  # num_pages of a driver write ignored
    (get_config(need_reply=True), 1),
    (get_config(offset=4, size=4), 1),  # not the whole config: the session's
    (encode(Request.GET_FEATURES, Empty()), 1),
]


async def start(nursery, path: str, fast: bool):
    return await nursery.start(partial(run_backend, path, service=BalloonService(fast_config=fast)))


@asynccontextmanager
async def connected(backend):
    """A front-end through QEMU's start-up messages, its session running."""
    async with await Frontend.connect(backend.socket_path) as frontend:
        await frontend.initialize()
        await wait_until(lambda: backend.service.session is not None, what="the session")
        yield frontend


async def replies_to_script(path: str) -> list[tuple]:
    async with await Frontend.connect(path) as frontend:
        await frontend.initialize()
        await frontend.send_raw(b"".join(data for data, _ in SCRIPT))
        replies = []
        for _ in range(sum(n for _, n in SCRIPT)):
            with trio.fail_after(5):
                m = await frontend.recv_reply()
            replies.append((m.request, m.flags, m.size, m.payload))
        return replies


async def test_config_replies_are_the_same_in_c_and_in_the_session(nursery, tmp_path, logs):
    fast = await start(nursery, str(tmp_path / "fast.sock"), True)
    slow = await start(nursery, str(tmp_path / "slow.sock"), False)
    got_fast = await replies_to_script(fast.socket_path)
    got_slow = await replies_to_script(slow.socket_path)
    assert got_fast == got_slow
    assert [r[0] for r in got_fast] == [
        Request.GET_CONFIG, Request.SET_CONFIG, Request.GET_CONFIG, Request.GET_CONFIG,
        Request.GET_CONFIG, Request.GET_FEATURES,
    ]
    assert got_fast[0][3].data == config()
    assert got_fast[2][3].data == config(actual=5)
    assert got_fast[3][3].data == config(actual=7)  # num_pages stays the device's
    assert got_fast[4][3].data == struct.pack("<I", 7)


async def test_c_answers_the_config_messages_and_the_session_sees_their_writes(nursery, socket_path, logs):
    backend = await start(nursery, socket_path, True)
    service = backend.service
    async with connected(backend) as frontend:
        before = service.query()
        for actual in (3, 9, 4):
            await frontend.set_config(config(actual=actual))
            assert await frontend.get_config() == config(actual=actual)
        after = service.query()  # replays what the thread took first
        assert after["config-reads-in-c"] - before["config-reads-in-c"] == 3
        assert after["config-writes-in-c"] - before["config-writes-in-c"] == 3
        assert after["chunks-to-session"] == before["chunks-to-session"]
        assert after["actual-pages"] == 4


async def test_a_config_message_split_across_writes_goes_to_the_session_then_c_again(nursery, socket_path):
    backend = await start(nursery, socket_path, True)
    service = backend.service
    async with connected(backend) as frontend:
        q0 = service.query()
        message = get_config()
        await frontend.send_raw(message[:5])
        await trio.sleep(0.05)  # two reads, not one
        await frontend.send_raw(message[5:])
        with trio.fail_after(5):
            reply = await frontend.recv_reply()
        assert reply.request == Request.GET_CONFIG and reply.payload.data == config()
        q1 = service.query()
        assert q1["config-reads-in-c"] == q0["config-reads-in-c"]  # the session answered it
        assert q1["chunks-to-session"] == q0["chunks-to-session"] + 2
        assert await frontend.get_config() == config()  # at a boundary again: C answers
        assert service.query()["config-reads-in-c"] == q0["config-reads-in-c"] + 1


async def test_a_config_message_with_an_fd_is_refused_by_the_session(nursery, socket_path, logs):
    backend = await start(nursery, socket_path, True)
    fds_before = fd_count()
    frontend = await Frontend.connect(backend.socket_path)
    try:
        await frontend.initialize()
        r, w = os.pipe()
        try:
            await frontend.send_raw(get_config(), fds=[r])
        finally:
            os.close(r)
            os.close(w)
        await wait_no_session(backend.service)
    finally:
        await frontend.aclose()
    assert "GET_CONFIG carries 1 fd, takes none" in log_text(logs)
    await wait_until(lambda: fd_count() == fds_before, what="every fd closed")


async def test_a_ballooning_guest_is_served_config_in_c(nursery, socket_path):
    backend = await start(nursery, socket_path, True)
    service = backend.service
    target = 64 * MiB
    async with model_guest(backend.socket_path, ram_size=128 * MiB) as guest:
        q0 = service.query()
        service.set_target(target)  # num_pages reaches the thread at once
        await guest.wait_for_target(target // PAGE)
        q1 = service.query()
        buffers = target // PAGE // 256
        # The Linux driver reads num_pages before and writes actual after each buffer.
        assert q1["config-reads-in-c"] - q0["config-reads-in-c"] >= buffers
        assert q1["config-writes-in-c"] - q0["config-writes-in-c"] >= buffers
        assert q1["chunks-to-session"] - q0["chunks-to-session"] <= 2
        assert q1["actual"] == 128 * MiB - target and q1["actual-pages"] == target // PAGE


@given(
    old=st.integers(0, 1 << 20), new=st.integers(0, 1 << 20), num_pages=st.integers(0, 1 << 20),
)
def test_a_plain_step_of_actual_changes_only_actual(old, new, num_pages):
    """What the session skips when it replays a batch of writes (all but
    the last, at the target, or deflate-on-OOM) must be exactly a write
    that moves actual and nothing else."""
    device = BalloonDevice(GuestMemory(), DEFAULT_FEATURES)
    device.config.actual, device.config.num_pages = old, num_pages
    write = device.write_config(4, struct.pack("<I", new))
    if plain_actual_step(old, new, num_pages):
        assert device.counters.pages_deflated_unasked == 0
        assert write.new_actual != num_pages and device.config.actual == new
    else:
        assert device.counters.pages_deflated_unasked > 0 or new == num_pages


async def test_a_write_that_changes_poison_val_goes_to_the_session(nursery, socket_path, logs):
    backend = await start(nursery, socket_path, True)
    service = backend.service
    async with connected(backend) as frontend:
        q0 = service.query()
        await frontend.set_config(config(actual=2, poison=0xAA))  # the session logs it
        await frontend.set_config(config(actual=3, poison=0xAA))  # same poison: C takes it
        assert await frontend.get_config() == config(actual=3, poison=0xAA)
        q1 = service.query()
        assert q1["chunks-to-session"] == q0["chunks-to-session"] + 1
        assert q1["config-writes-in-c"] == q0["config-writes-in-c"] + 1
        assert q1["poison-val"] == 0xAA and q1["actual-pages"] == 3
    assert "guest page poison value" in log_text(logs)


async def test_a_front_end_that_leaves_with_a_reply_unread_ends_the_session_cleanly(nursery, socket_path, logs):
    """Closing a unix socket with data unread makes the peer's next read fail
    (ECONNRESET): the reader thread hands that to the session, which ends,
    closes everything and serves the next front-end."""
    backend = await start(nursery, socket_path, True)
    fds_before = fd_count()
    frontend = await Frontend.connect(backend.socket_path)
    await frontend.initialize()
    await wait_until(lambda: backend.service.session is not None, what="the session")
    await frontend.send_raw(get_config())  # answered by C; never read
    await wait_until(lambda: backend.service.query()["config-reads-in-c"] == 1, what="the reply")
    await frontend.aclose()
    await wait_no_session(backend.service)
    assert "front-end connection failed" in log_text(logs) and "Connection reset by peer" in log_text(logs)
    await wait_until(lambda: fd_count() == fds_before, what="every fd closed")
    async with connected(backend) as again:
        assert await again.get_config() == config()
