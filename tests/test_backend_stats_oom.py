"""Guest statistics and deflate-on-OOM, against the Linux-like model guest."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from backend_support import MiB, PAGE, wait_until
from vhostballoon.device.hugepages import FlushPolicy, HugePolicy
from vhostballoon.server.daemon import run_backend
from vhostballoon.server.service import BalloonService
from vhostballoon.testing import model_guest

GUEST = 64 * MiB
INTERVAL = 0.05  # seconds: fast enough for a unit test, a real guest gets 5


async def start_backend(nursery, socket_path, **options):
    service = BalloonService(flush_policy=FlushPolicy(HugePolicy.EAGER), **options)
    return await nursery.start(partial(run_backend, socket_path, service=service))


def stats(service) -> dict:
    return service.query()["guest-stats"]


async def test_statistics_arrive_at_start_and_refresh_every_interval(nursery, socket_path):
    backend = await start_backend(nursery, socket_path, stats_interval=INTERVAL)
    service = backend.service
    async with model_guest(backend.socket_path, ram_size=GUEST) as guest:
        driver = guest.driver
        driver.extra_stats = {10: 7, 99: 5}  # OOM_KILL (Linux 6.12) and a tag nobody named yet
        await wait_until(lambda: stats(service)["updates"] >= 3, what="three stats updates")
        got = stats(service)
        assert got["stats"]["stat-total-memory"] == GUEST
        assert got["stats"]["stat-free-memory"] == driver.free_pages * PAGE
        assert got["stats"]["stat-oom-kills"] == 7 and got["stats"]["stat-tag-99"] == 5
        assert 0 <= got["age-seconds"] < 1 and got["stats-interval"] == INTERVAL and got["bad-buffers"] == 0

        # The guest's memory changes: the figures follow within a few intervals.
        service.set_target(GUEST - 8 * MiB)
        await guest.wait_for_target(8 * MiB // PAGE)
        await wait_until(
            lambda: stats(service)["stats"]["stat-total-memory"] == GUEST - 8 * MiB,
            timeout=5, what="stat-total-memory to drop by the balloon",
        )

        # Off: the guest's buffer stays with the device, no more updates.
        service.set_stats_interval(0)
        await trio.sleep(3 * INTERVAL)
        frozen = stats(service)["updates"]
        await trio.sleep(5 * INTERVAL)
        assert stats(service)["updates"] == frozen
        # On again: fresh numbers at once.
        service.set_stats_interval(60)
        await wait_until(lambda: stats(service)["updates"] > frozen, timeout=2, what="an update when turned on")


async def test_the_primed_buffer_is_decoded_and_held_without_polling(nursery, socket_path):
    backend = await start_backend(nursery, socket_path, stats_interval=0)
    service = backend.service
    async with model_guest(backend.socket_path, ram_size=GUEST) as guest:
        # Linux primes the stats queue before DRIVER_OK; QEMU drops that kick.
        await wait_until(lambda: stats(service)["updates"] == 1, what="the primed stats buffer")
        await trio.sleep(0.1)
        assert guest.driver.stats_buffers == 0  # held: never returned, so never refilled
        query = service.query_stats()
        assert query["connected"] and query["negotiated"]
        assert query["stats"]["stat-total-memory"] == GUEST and query["stats-interval"] == 0


async def test_deflate_on_oom_moves_actual_and_events_without_a_target_change(nursery, socket_path, logs):
    backend = await start_backend(nursery, socket_path)
    service = backend.service
    send, events = service.subscribe()
    async with model_guest(backend.socket_path, ram_size=GUEST) as guest:
        driver, ram = guest.driver, guest.ram
        target = GUEST - 8 * MiB
        service.set_target(target)
        await guest.wait_for_target(8 * MiB // PAGE)
        # Drain the events of the inflate, up to the one at the target (the
        # guest's writes of actual are published in batches, in order).
        while (await events.receive())["data"]["actual"] != target:
            pass
        changes_before = guest.frontend.config_change_msgs
        deflated_pfns = driver.balloon_pfns[-256:]  # LIFO: the newest pages go first

        assert await driver.oom_deflate() == 256  # Linux: VIRTIO_BALLOON_OOM_NR_PAGES
        event = await events.receive()
        assert event["event"] == "BALLOON_CHANGE" and event["data"]["actual"] == target + 256 * PAGE
        info = service.query()
        assert info["actual"] == target + 256 * PAGE
        assert info["target"] == target and info["num-pages"] == 8 * MiB // PAGE
        assert info["ballooned-bytes"] == 8 * MiB - 256 * PAGE
        assert info["pages-deflated-unasked"] == 256
        assert "deflated its balloon below the target on its own" in str(logs)
        # The guest uses its pages again (the model rewrote their canary)...
        assert ram.check_canary(deflated_pfns) == []
        holes = ram.hole_bitmap()
        assert {p for p in ram.guest_pfns() if holes[p]} == set(driver.balloon_pfns)
        # ...and nobody makes it inflate again: no config change, actual stays.
        await trio.sleep(0.2)
        assert guest.frontend.config_change_msgs == changes_before
        assert driver.actual_pages == 8 * MiB // PAGE - 256

        # A second OOM, then the operator's next target: the guest follows it.
        await driver.oom_deflate(512)
        assert service.query()["pages-deflated-unasked"] == 768
        service.set_target(target - 4 * MiB)
        await guest.wait_for_target(12 * MiB // PAGE)
        assert service.query()["actual"] == target - 4 * MiB
    service.unsubscribe(send)


@pytest.mark.parametrize("interval", [-1, float("nan"), "5", True, None])
def test_stats_interval_must_be_seconds(interval):
    from vhostballoon.server.service import CommandError

    service = BalloonService()
    with pytest.raises(CommandError, match="stats interval must be a number of seconds"):
        service.set_stats_interval(interval)
    assert service.stats_interval == 5.0
