"""A back-end killed with SIGKILL and restarted under a running guest carries on.

Everything is real: the daemon is its own process (``python -m
vhostballoon``), killed with SIGKILL; guest RAM is a memfd with transparent
huge pages (a tmpfs mounted huge=always: see thp_tmpfs); the model guest and
its front-end keep running across the kill and reconnect to the new daemon
as QEMU's vhost-user reconnect does (same memfd, rings where they are, same
kick and call eventfds).  What is checked is what the host holds: the
memfd's holes and allocated blocks, and each page's canary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from backend_support import MiB, PAGE
from vhostballoon.testing import BalloonDriver, Frontend, GuestRAM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "faults"))
from _common import ControlClient, daemon_process, wait_until  # noqa: E402

RAM = 256 * MiB


@pytest.fixture
def thp_tmpfs(sock_dir):
    """A private tmpfs mounted huge=always: its files get transparent huge
    pages whatever the machine-wide shmem_enabled says (unless deny or force),
    which other test runs on a shared machine switch back and forth; the
    back-end sees "tmpfs ... huge=always" and tracks 2 MiB huge pages."""
    where = os.path.join(sock_dir, "thp")
    os.mkdir(where)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "huge=always,size=1G", "vb-thp", where],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs with huge=always: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=False)


def pages(nbytes: int) -> int:
    return nbytes // PAGE


@asynccontextmanager
async def running_guest(socket_path: str, ram: GuestRAM, *, seed: int):
    """A model guest that outlives its back-end (config access survives the
    loss, buffers wait for the next back-end).  Yields (frontend, driver, nursery)."""
    frontend = await Frontend.connect(socket_path)
    frontend.survive_backend_loss = True
    try:
        await frontend.initialize()
        driver = BalloonDriver(ram, frontend, seed=seed, buffer_timeout=60.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(frontend.serve_backend_channel)
            await driver.probe()
            await nursery.start(driver.run)
            yield frontend, driver, nursery
            nursery.cancel_scope.cancel()
    finally:
        await frontend.aclose()


@dataclass
class Survivor:
    """A guest that outlives its daemons (see running_guest), and what
    starts the next daemon with the same arguments."""

    sock_dir: str
    state_dir: str
    args: tuple[str, ...]  # every daemon's: the same state dir and policy
    ram: GuestRAM
    frontend: Frontend
    driver: BalloonDriver
    nursery: trio.Nursery

    def daemon(self, log_name: str):
        return daemon_process(self.sock_dir, *self.args, log_name=log_name)

    async def reconnect(self, daemon) -> None:
        """The front-end comes back on ``daemon`` as QEMU's reconnect does."""
        await self.frontend.reconnect(daemon.socket_path, self.driver.ram, self.driver.queues)
        self.nursery.start_soon(self.frontend.serve_backend_channel)


@asynccontextmanager
async def ballooned_on_first_daemon(sock_dir: str, ram_dir: str, *, snapshot_interval: int, ram_seed: int,
                                    guest_seed: int):
    """Where each restart test begins: guest RAM on the huge-page tmpfs
    ``ram_dir``, the first daemon (state dir ``sock_dir/state``, policy
    whole, a snapshot every ``snapshot_interval`` s) and a guest on it that
    has put 64 MiB into the balloon, the daemon caught up.  Yields (the
    guest, the first daemon, its query-balloon then)."""
    state_dir = os.path.join(sock_dir, "state")
    args = ("--state-dir", state_dir, "--huge-policy", "whole", "--snapshot-interval", str(snapshot_interval))
    ram = GuestRAM(RAM, seed=ram_seed, directory=ram_dir)
    try:
        ram.touch()
        async with daemon_process(sock_dir, *args, log_name="first.log") as first:
            async with running_guest(first.socket_path, ram, seed=guest_seed) as (frontend, driver, nursery):
                guest = Survivor(sock_dir, state_dir, args, ram, frontend, driver, nursery)
                await command(first, "balloon", value=RAM - 64 * MiB)
                await driver.wait_for_target(pages(64 * MiB))
                yield guest, first, await wait_until_quiet(first)
    finally:
        ram.close()


async def query(daemon) -> dict:
    control = await ControlClient.connect(daemon.control_path)
    try:
        return (await control.execute("query-balloon"))["return"]
    finally:
        await control.aclose()


async def command(daemon, name: str, **arguments) -> dict:
    control = await ControlClient.connect(daemon.control_path)
    try:
        reply = await control.execute(name, **arguments)
        assert "return" in reply, reply
        return reply["return"]
    finally:
        await control.aclose()


async def flush_and_wait(daemon) -> dict:
    """Free the pending pages now (policy eager) and wait until they are
    freed (they leave pending-bytes before the discard thread is done)."""
    before = await query(daemon)
    await command(daemon, "set-huge-policy", policy="eager")
    with trio.fail_after(30):
        while True:
            info = await query(daemon)
            if info["pending-bytes"] == 0 and (
                info["discarded-bytes"] - before["discarded-bytes"] >= before["pending-bytes"]
            ):
                return info
            await trio.sleep(0.02)


def snapshot(state_dir: str) -> dict:
    with open(os.path.join(state_dir, "pages.json")) as f:
        return json.load(f)


async def test_sigkill_restart_brings_back_target_and_pending_pages(sock_dir, thp_tmpfs):
    # A snapshot only at session start: what follows lives in the journal alone.
    async with ballooned_on_first_daemon(sock_dir, thp_tmpfs, snapshot_interval=3600, ram_seed=0xB0B,
                                         guest_seed=3) as (guest, first, before):
        ram, driver = guest.ram, guest.driver
        # -- 1: at rest, pending pages held back (policy whole), SIGKILL
        target = RAM - 64 * MiB
        assert before["pending-bytes"] > 8 * MiB, before  # random order: most huge pages partial
        allocated = ram.allocated_bytes()
        first.kill()
        await first.wait()

        async with guest.daemon("second.log") as second:
            await guest.reconnect(second)
            after = await query(second)
            assert after["target"] == target
            assert after["actual"] == target
            assert after["ballooned-bytes"] == before["ballooned-bytes"] == 64 * MiB
            assert after["pending-bytes"] == before["pending-bytes"]
            assert "page state restored from the state directory" in second.log()
            # The pending pages are really freed by the new daemon, by exactly their amount.
            flushed = await flush_and_wait(second)
            freed = allocated - ram.allocated_bytes()
            assert before["pending-bytes"] <= freed <= before["pending-bytes"] + HUGE_SLACK, (
                freed, {k: v for k, v in flushed.items() if "byte" in k or "split" in k})
            assert ram.host_holes() == set(driver.balloon_pfns)
            assert ram.check_canary(driver.guest_owned_pfns()) == []

            # -- 2: SIGKILL in the middle of an inflate: the balloon reaches its target
            await command(second, "set-huge-policy", policy="whole")
            target = RAM - 128 * MiB
            await command(second, "balloon", value=target)
            at = driver.inflate_buffers
            await wait_until(lambda: driver.inflate_buffers >= at + 40, timeout=30, what="40 inflate buffers")
            second.kill()
            await second.wait()

        async with guest.daemon("third.log") as third:
            await guest.reconnect(third)
            assert await driver.wait_for_target(pages(128 * MiB), timeout=60) == pages(128 * MiB)
            await wait_until_quiet(third)
            info = await flush_and_wait(third)
            assert info["target"] == target and info["actual"] == target
            assert info["ballooned-bytes"] == 128 * MiB
            # Every page of the balloon is freed (no pending page was
            # forgotten) and nothing else is (no guest page lost).
            assert ram.host_holes() == set(driver.balloon_pfns)
            assert ram.check_canary(driver.guest_owned_pfns()) == []


HUGE_SLACK = 2 * MiB  # a huge page's worth: the guest's own rings and buffers move a little


async def wait_until_quiet(daemon) -> dict:
    """query-balloon once the back-end has caught up with the guest (actual written)."""
    with trio.fail_after(10):
        while True:
            info = await query(daemon)
            if info["actual"] is not None and info["actual-pages"] * PAGE == info["ballooned-bytes"]:
                return info
            await trio.sleep(0.02)


async def test_page_deflated_after_the_last_snapshot_is_never_freed(sock_dir, thp_tmpfs):
    """The snapshot on disk says a page is pending; the guest takes it back
    (and writes to it); SIGKILL before the next snapshot.  The restarted
    back-end must not free that page."""
    async with ballooned_on_first_daemon(sock_dir, thp_tmpfs, snapshot_interval=2, ram_seed=0xCAFE,
                                         guest_seed=4) as (guest, first, _):
        ram, driver, state_dir = guest.ram, guest.driver, guest.state_dir
        # Wait for the periodic snapshot that has the whole balloon.
        reached = time.time()
        await wait_until(lambda: snapshot(state_dir)["written_at"] > reached, timeout=10,
                         what="a periodic snapshot")
        saved = snapshot(state_dir)
        # Now the guest takes back its newest 2 MiB (Linux: LIFO) and uses it.
        taken_back = list(driver.balloon_pfns[-pages(2 * MiB):])
        await command(first, "balloon", value=RAM - 62 * MiB)
        await driver.wait_for_target(pages(62 * MiB))
        first.kill()
        await first.wait()
        assert snapshot(state_dir)["epoch"] == saved["epoch"], "a snapshot came in between: retry"
        assert pending_in(saved, taken_back), "the stale snapshot must hold some of those pages as pending"
        assert ram.check_canary(taken_back) == []

        async with guest.daemon("second.log") as second:
            await guest.reconnect(second)
            info = await flush_and_wait(second)  # every pending page is freed now
            assert ram.check_canary(taken_back) == []  # the guest's data is intact
            assert info["ballooned-bytes"] == 62 * MiB
            assert ram.check_canary(driver.guest_owned_pfns()) == []
            assert ram.host_holes() == set(driver.balloon_pfns)


def pending_in(doc: dict, pfns: list[int]) -> list[int]:
    """Those of pfns that the snapshot holds as pending (one region at gpa 0)."""
    import base64
    import zlib

    bitmap = zlib.decompress(base64.b64decode(doc["regions"][0]["pending_bitmap"]))
    return [p for p in pfns if bitmap[p // 8] >> (p % 8) & 1]
