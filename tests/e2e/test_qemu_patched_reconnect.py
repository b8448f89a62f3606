"""The back-end restarted under a running guest, with QEMU 10.2.2 patched by
protocol/qemu/0001-vhost-user-base-reconnect-to-a-restarted-back-end.patch.

Everything is real: QEMU (built by the rig with the patch, see the
``patched_qemu`` fixture), the Linux 6.1 guest and its virtio_balloon driver,
the daemon in its own process killed with SIGKILL (or stopped with SIGTERM)
and started again with the same arguments.  The chardev reconnects
(``reconnect-ms=1000``) and the device is on QEMU's command line, which
stock QEMU 10.2.2 refuses (test_qemu_reconnect.py pins that).

What is checked is what the guest and the host see: the guest's balloon
(``/proc/vmstat`` balloon_inflate - balloon_deflate), the memfd's allocated
blocks behind guest RAM, a canary file the guest wrote before the first
kill (its md5), and the back-end's query-balloon figures.

Buffers in flight: when a back-end dies, QEMU rewinds each ring to its used
index, so the new back-end is served again every buffer the old one had
taken and not returned.  To have a buffer in exactly that state, the test
holds the back-end with gdb at ``vb_vq_push_used`` (the batch is already in
the page state and the journal, its buffer not yet back in the used ring)
and kills it there with SIGKILL.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from contextlib import asynccontextmanager

import pytest
import trio

from vhostballoon.testing.qemu import QemuGuest, balloon_vhost_user_args

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
RECONNECT_MS = 1000
CANARY_MIB = 32
PFNS_PER_BUFFER = 256  # Linux virtio_balloon VIRTIO_BALLOON_ARRAY_PFNS_MAX


def balloon_pages(vmstat: dict[str, int]) -> int:
    return vmstat["balloon_inflate"] - vmstat["balloon_deflate"]


@asynccontextmanager
async def patched_guest(workdir, backend, qemu):
    """A 1 GiB guest on the patched QEMU, the balloon on QEMU's command line
    behind a reconnecting chardev."""
    guest = await QemuGuest.start(
        workdir, balloon_vhost_user_args(backend.socket_path, reconnect_ms=RECONNECT_MS), qemu_bin=qemu
    )
    try:
        yield guest
    finally:
        await guest.kill()


async def write_canary(guest) -> str:
    """The guest writes random bytes to a file in its tmpfs; returns their md5."""
    result = await guest.run(
        f"sh dd if=/dev/urandom of=/fill/canary bs=1M count={CANARY_MIB} 2>/dev/null; md5sum /fill/canary",
        timeout=120,
    )
    return md5_of(result)


async def canary_md5(guest) -> str:
    return md5_of(await guest.run("sh md5sum /fill/canary", timeout=60))


def md5_of(result) -> str:
    assert result.rc == 0, result.lines
    found = [m.group(0) for line in result.lines for m in [re.match(r"^[0-9a-f]{32}\b", line)] if m]
    assert len(found) == 1, result.lines
    return found[0]


def qemu_messages(guest) -> list[str]:
    """What QEMU itself printed (its stderr shares the console stream)."""
    return [line for line in guest.console if "qemu-system-x86_64" in line or line.startswith("vhost")]


async def wait_reconnected(backend, timeout: float = 20.0) -> dict:
    """QEMU reconnected (within reconnect-ms) and restarted the balloon's rings."""
    return await backend.wait_for(
        lambda i: i["connected"] and "inflate" in (i.get("queues") or []), timeout, "QEMU to reconnect and restart the rings"
    )


def hold_at_buffer_return(backend, workdir) -> subprocess.Popen:
    """Attach gdb to the back-end: the next time a queue thread is about to
    return buffers to the guest (``vb_vq_push_used``: the batch is already in
    the page state and the journal), the back-end stops there, held.
    Returns once the breakpoint is armed; the back-end runs on meanwhile."""
    gdb = subprocess.Popen(
        ["gdb", "-nx", "-batch", "-p", str(backend.process.pid),
         "-ex", "handle all nostop noprint pass",
         "-ex", "break vb_vq_push_used",
         "-ex", "echo @@ARMED\\n",
         "-ex", "continue",
         "-ex", "bt 2",
         "-ex", "echo @@HELD\\n",
         # keep the back-end stopped until the test kills it
         "-ex", "python import time; time.sleep(600)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir,
    )
    gdb.seen = read_until(gdb, "@@ARMED")
    return gdb


def read_until(gdb: subprocess.Popen, marker: str) -> list[str]:
    seen = []
    for line in gdb.stdout:
        seen.append(line)
        if marker in line:
            return seen
    gdb.kill()
    gdb.wait()
    raise AssertionError(f"gdb ended before {marker}: {''.join(seen)[-3000:]}")


def kill_while_held(gdb: subprocess.Popen, backend) -> str:
    """Wait until gdb holds the back-end at vb_vq_push_used, then SIGKILL
    the back-end there (then gdb, which lets the kernel report the exit)."""
    held = "".join(read_until(gdb, "@@HELD"))
    assert "vb_vq_push_used" in held, held[-3000:]
    backend.process.send_signal(signal.SIGKILL)
    gdb.kill()
    gdb.wait()
    assert backend.process.wait(timeout=20) == -signal.SIGKILL
    return held


async def test_sigkill_mid_inflate_backend_restarts_under_the_running_guest(tmp_path, backend_factory, patched_qemu):
    """The issue's scenario: 768 MiB, SIGKILL in the middle of an inflate
    toward 512 MiB, start again with the same arguments, no reboot."""
    # Reporting off so that the host's figure measures the balloon alone.
    args = ("--features=-reporting", "--stats-interval", "1")
    backend = backend_factory("vb", *args)
    async with patched_guest(tmp_path, backend, patched_qemu) as guest:
        # Memory the guest touched is backed on the host; the balloon will
        # take some of it.
        assert (await guest.run("fill 600", timeout=120)).rc == 0
        assert (await guest.run("unfill")).rc == 0
        canary = await write_canary(guest)
        host_full = guest.host_allocated()
        assert host_full > 600 * MiB, host_full

        await backend.execute("balloon", value=768 * MiB)
        await backend.wait_for(lambda i: i["actual"] == 768 * MiB, 60, "guest at 768 MiB")
        assert balloon_pages(await guest.vmstat()) == 256 * MiB // PAGE

        await backend.execute("balloon", value=512 * MiB)
        await backend.wait_for(lambda i: i["actual"] <= 768 * MiB - 16 * MiB, 60, "inflate toward 512 MiB under way")
        assert backend.kill(signal.SIGKILL) == -signal.SIGKILL
        killed_at = time.monotonic()

        # QEMU and the guest live on; the guest's inflate waits for its
        # buffer. QEMU retries every reconnect-ms meanwhile.
        await trio.sleep(2.5 * RECONNECT_MS / 1000)
        assert guest.process.poll() is None
        pages_at_kill = balloon_pages(await guest.vmstat())
        assert 256 * MiB // PAGE < pages_at_kill < 512 * MiB // PAGE, "not killed in the middle of the inflate"

        restart = time.monotonic()
        restarted = backend_factory("vb", *args)  # same arguments, same socket and state directory
        assert (await restarted.query())["target"] == 512 * MiB  # the kept target
        await wait_reconnected(restarted)
        reconnected_after = time.monotonic() - restart
        await restarted.wait_for(
            lambda i: (i.get("actual-pages") or 0) > pages_at_kill, 30, "the guest ballooning again"
        )
        ballooning_after = time.monotonic() - restart
        info = await restarted.wait_for(lambda i: i["actual"] == 512 * MiB, 90, "guest at 512 MiB")
        at_target_after = time.monotonic() - restart

        assert guest.process.poll() is None
        assert balloon_pages(await guest.vmstat()) == 512 * MiB // PAGE
        assert info["ballooned-bytes"] == 512 * MiB
        assert info["invalid-pfns"] == 0 and info["broken-queues"] == {}
        assert "page state restored from the state directory" in restarted.log()
        # The host memory behind the 131072 ballooned pages is freed: the
        # guest touched most of its RAM, and what is left is at most the
        # half the guest still has.
        host = guest.host_allocated()
        assert host <= 512 * MiB, f"host holds {host / MiB:.0f} MiB behind a guest with 512 MiB ballooned"
        assert host_full - host >= 400 * MiB
        assert await canary_md5(guest) == canary

        # Statistics flow again on the new back-end (the buffer the old one
        # held is served to it again).
        stats = await restarted.wait_for(lambda i: i["guest-stats"]["updates"] >= 2, 10, "two stats updates")
        mem = await guest.meminfo()
        assert stats["guest-stats"]["stats"]["stat-total-memory"] == mem["MemTotal"] * 1024

        # Deflating to 1 GiB gives everything back, and the guest can use it.
        await restarted.execute("balloon", value=1 * GiB)
        info = await restarted.wait_for(lambda i: i["actual"] == 1 * GiB, 90, "guest back at 1 GiB")
        assert balloon_pages(await guest.vmstat()) == 0
        assert info["ballooned-bytes"] == 0
        assert (await guest.run("fill 700", timeout=120)).rc == 0
        assert guest.host_allocated() >= 700 * MiB
        assert await canary_md5(guest) == canary
        assert guest.process.poll() is None

        messages = qemu_messages(guest)
        print(
            f"\nrestart under a running guest: killed with {pages_at_kill} of 131072 pages ballooned; "
            f"QEMU reconnected {reconnected_after:.2f} s after the back-end was started again "
            f"({restart - killed_at:.1f} s after the kill), the guest ballooned again after "
            f"{ballooning_after:.2f} s and reached 512 MiB after {at_target_after:.2f} s; host "
            f"{host / MiB:.0f} MiB at 512 MiB ballooned; QEMU printed: {messages}"
        )
        assert not any("Assertion" in m for m in messages), messages


async def test_sigterm_restart_then_balloon_and_free_page_reporting_work(tmp_path, backend_factory, patched_qemu):
    backend = backend_factory("vb")  # every feature, free page reporting included
    async with patched_guest(tmp_path, backend, patched_qemu) as guest:
        canary = await write_canary(guest)
        await backend.execute("balloon", value=768 * MiB)
        await backend.wait_for(lambda i: i["actual"] == 768 * MiB, 60, "guest at 768 MiB")

        assert backend.kill(signal.SIGTERM) == 0  # the clean shutdown path
        restarted = backend_factory("vb")
        info = await wait_reconnected(restarted)
        assert info["target"] == 768 * MiB
        assert "balloon:reporting" in info["features"] and info["queues"][-1] == "reporting"
        info = await restarted.wait_for(
            lambda i: i["actual"] == 768 * MiB and i["ballooned-bytes"] == 256 * MiB, 20, "the kept balloon"
        )
        assert balloon_pages(await guest.vmstat()) == 256 * MiB // PAGE

        # Free page reporting on the new back-end: what the guest writes
        # and frees goes back to the host.
        assert (await guest.run("fill 500", timeout=120)).rc == 0
        full = guest.host_allocated()
        assert (await guest.run("unfill")).rc == 0
        # Linux reports freed memory in 2 MiB blocks, 2 s after the free,
        # 32 blocks per buffer.
        with trio.move_on_after(30):
            while full - guest.host_allocated() < 400 * MiB:
                await trio.sleep(0.25)
        dropped = full - guest.host_allocated()
        info = await restarted.query()
        assert dropped >= 400 * MiB, f"host memory dropped {dropped / MiB:.0f} MiB after unfill; back-end: {info}"
        assert info["report-freed-bytes"] >= 400 * MiB
        assert info["report-invalid-entries"] == 0

        # The balloon too.
        await restarted.execute("balloon", value=512 * MiB)
        info = await restarted.wait_for(lambda i: i["actual"] == 512 * MiB, 60, "guest at 512 MiB")
        assert balloon_pages(await guest.vmstat()) == 512 * MiB // PAGE
        assert info["ballooned-bytes"] == 512 * MiB and info["repeated-pfns"] == 0
        await restarted.execute("balloon", value=1 * GiB)
        await restarted.wait_for(lambda i: i["actual"] == 1 * GiB, 60, "guest back at 1 GiB")
        assert balloon_pages(await guest.vmstat()) == 0
        assert await canary_md5(guest) == canary
        assert guest.process.poll() is None


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed: it holds a buffer in the back-end")
async def test_three_restarts_in_a_row_with_buffers_in_flight(tmp_path, backend_factory, patched_qemu):
    """Killed with an inflate buffer taken and not returned, then with a
    deflate buffer taken and not returned, then idle: three restarts under
    one guest.  A repeated inflate changes nothing; a repeated deflate
    frees nothing."""
    # Reporting off and no stats requests: the only queue threads returning
    # buffers while gdb waits are the inflate and deflate ones.  Snapshots
    # every 0.2 s: the page state is a fresh snapshot by the time a kill
    # comes, so a new back-end has no inflate of the old one to replay.
    args = ("--features=-reporting", "--stats-interval", "0", "--snapshot-interval", "0.2")
    backend = backend_factory("vb", *args)
    async with patched_guest(tmp_path, backend, patched_qemu) as guest:
        canary = await write_canary(guest)
        await backend.execute("balloon", value=768 * MiB)
        await backend.wait_for(lambda i: i["actual"] == 768 * MiB, 60, "guest at 768 MiB")
        await trio.sleep(1)

        # 1. An inflate buffer in flight.
        gdb = await trio.to_thread.run_sync(hold_at_buffer_return, backend, tmp_path)
        await backend.execute("balloon", value=512 * MiB)
        await trio.to_thread.run_sync(kill_while_held, gdb, backend)
        # Linux counts a page in vmstat when it enqueues it, before it
        # sends the buffer: one buffer on top of 768 MiB, waiting.
        assert balloon_pages(await guest.vmstat()) == 256 * MiB // PAGE + PFNS_PER_BUFFER
        first = backend_factory("vb", *args)
        await wait_reconnected(first)
        info = await first.wait_for(lambda i: i["actual"] == 512 * MiB, 90, "guest at 512 MiB")
        # QEMU served the held buffer again; its pages were already in the
        # restored balloon: repeated, counted once, not freed again.
        assert info["repeated-pfns"] == PFNS_PER_BUFFER, info
        assert info["ballooned-bytes"] == 512 * MiB
        assert info["pages-inflated"] == (256 * MiB // PAGE) - PFNS_PER_BUFFER
        assert balloon_pages(await guest.vmstat()) == 512 * MiB // PAGE
        assert "pfns already in that state" in first.log()
        await trio.sleep(1)

        # 2. A deflate buffer in flight.
        gdb = await trio.to_thread.run_sync(hold_at_buffer_return, first, tmp_path)
        await first.execute("balloon", value=1 * GiB)
        await trio.to_thread.run_sync(kill_while_held, gdb, first)
        # (dequeued and counted before the buffer is sent; the pages go
        # back to the guest's allocator only when the buffer comes back)
        assert balloon_pages(await guest.vmstat()) == 512 * MiB // PAGE - PFNS_PER_BUFFER
        second = backend_factory("vb", *args)
        await wait_reconnected(second)
        info = await second.wait_for(lambda i: i["actual"] == 1 * GiB, 90, "guest back at 1 GiB")
        # The held buffer's pages were already deflated in the restored
        # state: served again, they change nothing, and this back-end never
        # freed a byte (no inflate happened on it).
        assert info["repeated-pfns"] == PFNS_PER_BUFFER, info
        assert info["pages-deflated"] == (512 * MiB // PAGE) - PFNS_PER_BUFFER
        assert info["discarded-bytes"] == 0 and info["freed-bytes-measured"] == 0, info
        assert info["ballooned-bytes"] == 0
        assert balloon_pages(await guest.vmstat()) == 0
        assert "pfns deflated that were not ballooned" in second.log()
        # The guest uses all it got back; nothing frees it behind its back.
        assert (await guest.run("fill 700", timeout=120)).rc == 0
        filled = guest.host_allocated()
        assert filled >= 700 * MiB
        await trio.sleep(6)  # longer than --flush-after: a stale pending page would be freed by now
        assert guest.host_allocated() >= filled - 4 * MiB
        assert (await second.query())["discarded-bytes"] == 0
        assert await canary_md5(guest) == canary
        assert (await guest.run("unfill")).rc == 0

        # 3. Idle, SIGKILL once more: the balloon still works.
        assert second.kill(signal.SIGKILL) == -signal.SIGKILL
        third = backend_factory("vb", *args)
        await wait_reconnected(third)
        await third.execute("balloon", value=768 * MiB)
        info = await third.wait_for(lambda i: i["actual"] == 768 * MiB, 60, "guest at 768 MiB")
        assert balloon_pages(await guest.vmstat()) == 256 * MiB // PAGE
        assert info["ballooned-bytes"] == 256 * MiB and info["repeated-pfns"] == 0
        assert await canary_md5(guest) == canary
        assert guest.process.poll() is None
        print(f"\nthree restarts: QEMU printed {qemu_messages(guest)}")
