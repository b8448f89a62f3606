"""The back-end against a real QEMU 10.2 and the stock Linux virtio_balloon driver."""

from __future__ import annotations

import signal

import trio

from vhostballoon.device.features import DEFAULT_FEATURES, feature_names
from vhostballoon.testing.qemu import balloon_guest

MiB = 1 << 20
GiB = 1 << 30
PAGE_KB = 4


def sysfs_bits(features: str) -> int:
    """/sys/bus/virtio/devices/*/features: one character per bit, bit 0 first."""
    return sum(1 << i for i, c in enumerate(features) if c == "1")


def balloon_pages(vmstat: dict[str, int]) -> int:
    return vmstat["balloon_inflate"] - vmstat["balloon_deflate"]


async def test_probe_driver_binds_with_exactly_the_offered_features(tmp_path, backend):
    async with balloon_guest(tmp_path, backend.socket_path) as guest:
        balloons = [d for d in await guest.devices() if d["device"] == "0x0005"]
        assert len(balloons) == 1, balloons
        dev = balloons[0]
        assert dev["driver"] == "virtio_balloon"
        assert int(dev["status"], 16) & 0x4, f"DRIVER_OK not set: status {dev['status']}"
        guest_bits = sysfs_bits(dev["features"])
        info = await backend.query()
        # The guest negotiated nothing the back-end did not offer, and the
        # back-end saw exactly what the guest negotiated.
        assert guest_bits & ~DEFAULT_FEATURES == 0, feature_names(guest_bits & ~DEFAULT_FEATURES)
        assert feature_names(guest_bits) == info["features"]
        for name in ("must_tell_host", "stats_vq", "deflate_on_oom", "reporting"):
            assert f"balloon:{name}" in info["features"], info["features"]
        assert "ring:version_1" in info["features"]
        # The Debian guest neither poisons nor zeroes free pages (no
        # page_poison=1, no init_on_free), so virtballoon_validate drops
        # PAGE_POISON even though it is offered, and keeps REPORTING.
        assert "balloon:page_poison" not in info["features"]
        assert info["queues"] == ["inflate", "deflate", "stats", "reporting"]
        log = backend.log()
        for index, role in enumerate(info["queues"]):
            assert f"queue={index} role={role}" in log, f"no 'queue started' line for queue {index} ({role})"


async def test_balloon_to_512m_frees_host_memory_and_gives_it_back(tmp_path, backend_factory):
    # Free page reporting off: it would give the unfilled 800 MiB back by
    # itself (test_qemu_reporting.py), and this test measures the balloon.
    backend = backend_factory("vb", "--features=-reporting")
    async with balloon_guest(tmp_path, backend.socket_path) as guest:
        assert (await guest.run("fill 800", timeout=120)).rc == 0
        await guest.run("unfill")
        mem0, vm0 = await guest.meminfo(), await guest.vmstat()
        host0 = guest.host_allocated()
        assert host0 > 800 * MiB, f"the guest's 800 MiB fill should be backed on the host: {host0}"

        await backend.execute("balloon", value=512 * MiB)
        info = await backend.wait_for(lambda i: i["actual"] == 512 * MiB, 90, "guest at 512 MiB")
        mem1, vm1 = await guest.meminfo(), await guest.vmstat()
        host1 = guest.host_allocated()

        assert balloon_pages(vm1) - balloon_pages(vm0) == 512 * MiB // 4096
        if "balloon:deflate_on_oom" in info["features"]:
            # Linux leaves ballooned pages in MemTotal when DEFLATE_ON_OOM is
            # negotiated (virtio_balloon.c skips adjust_managed_page_count):
            # they leave MemFree instead.
            assert mem1["MemTotal"] == mem0["MemTotal"]
            dropped_kb = mem0["MemFree"] - mem1["MemFree"]
            assert 480 * 1024 <= dropped_kb <= 560 * 1024, f"MemFree dropped {dropped_kb} kB for a 512 MiB balloon"
        else:
            assert mem0["MemTotal"] - mem1["MemTotal"] == 512 * MiB // 1024
        assert host0 - host1 >= 480 * MiB, f"host memory dropped only {(host0 - host1) / MiB:.1f} MiB"
        assert info["ballooned-bytes"] == 512 * MiB
        assert info["freed-bytes-measured"] >= 480 * MiB

        await backend.execute("balloon", value=1 * GiB)
        info = await backend.wait_for(lambda i: i["actual"] == 1 * GiB, 90, "guest back at 1 GiB")
        mem2, vm2 = await guest.meminfo(), await guest.vmstat()
        assert balloon_pages(vm2) == balloon_pages(vm0)
        assert mem2["MemTotal"] == mem0["MemTotal"]
        assert info["ballooned-bytes"] == 0
        # The guest can use its memory again: writing 600 MiB succeeds.
        assert (await guest.run("fill 600", timeout=120)).rc == 0


async def test_target_survives_backend_restart_with_a_fresh_qemu(tmp_path, backend_factory):
    """QEMU 10.2.2's generic vhost-user device cannot reconnect to a restarted
    back-end (see test_qemu_reconnect.py), so the supported recovery is
    a fresh QEMU; the operator's target must still hold."""
    backend = backend_factory()
    async with balloon_guest(tmp_path, backend.socket_path, "first") as guest:
        await backend.execute("balloon", value=768 * MiB)
        await backend.wait_for(lambda i: i["actual"] == 768 * MiB, 90, "first guest at 768 MiB")
        assert backend.kill(signal.SIGKILL) == -signal.SIGKILL
        # QEMU itself keeps running; its balloon device is dead until QEMU restarts.
        await trio.sleep(1)
        assert guest.process.poll() is None

    restarted = backend_factory()  # same socket path, same state directory
    info = await restarted.query()
    assert info["target"] == 768 * MiB and not info["connected"]
    assert "target restored" in restarted.log()
    async with balloon_guest(tmp_path, restarted.socket_path, "second") as guest:
        # The new guest balloons to the kept target by itself, no new command.
        await restarted.wait_for(lambda i: i["actual"] == 768 * MiB, 90, "second guest at the kept 768 MiB")
        assert balloon_pages(await guest.vmstat()) == 256 * MiB // 4096


async def test_frontend_killed_mid_inflate_backend_stays_up_and_serves_next(tmp_path, backend):
    fds_before = await backend.settled_fd_count()
    async with balloon_guest(tmp_path, backend.socket_path, "first") as guest:
        await backend.execute("balloon", value=256 * MiB)
        # Kill QEMU once the inflate is under way but far from done.
        await backend.wait_for(lambda i: (i.get("actual-pages") or 0) > 2048, 60, "inflate under way")
        info = await backend.query()
        assert info["actual"] > 256 * MiB, "inflate finished before QEMU could be killed"
        guest.process.send_signal(signal.SIGKILL)
        await guest.process.wait()
    await backend.wait_for(lambda i: not i["connected"], 20, "the back-end to notice QEMU is gone")
    assert backend.alive
    await backend.assert_fd_count(fds_before)

    async with balloon_guest(tmp_path, backend.socket_path, "second") as guest:
        await backend.wait_for(lambda i: i["actual"] == 256 * MiB, 120, "next guest at the target")
        assert balloon_pages(await guest.vmstat()) == 768 * MiB // 4096
    await backend.wait_for(lambda i: not i["connected"], 20, "second QEMU gone")
    await backend.assert_fd_count(fds_before)


async def test_guest_reboot_starts_a_fresh_balloon_and_frees_its_pages(tmp_path, backend_factory):
    """QEMU never sends RESET_DEVICE on a guest reboot: the rings stop and the
    new driver's start at 0. Pages the new driver inflates must be freed even
    when they were in the old balloon (reporting off, to measure the balloon)."""
    backend = backend_factory("vb", "--features=-reporting")
    async with balloon_guest(tmp_path, backend.socket_path) as guest:
        await backend.execute("balloon", value=768 * MiB)
        await backend.wait_for(lambda i: i["actual"] == 768 * MiB, 90, "guest at 768 MiB")
        before = await backend.query()
        discarded_before = before["discarded-bytes"]

        await guest.process.stdin.send_all(b"sh reboot -f\n")
        await guest.wait_for(r"^@@VB READY", 90)
        # The rebooted guest's driver balloons to the kept target by itself.
        info = await backend.wait_for(
            lambda i: i["actual"] == 768 * MiB and i["ballooned-bytes"] == 256 * MiB
            and i["discarded-bytes"] - discarded_before >= 256 * MiB,
            90, "rebooted guest at 768 MiB, its 256 MiB balloon discarded anew",
        )
        assert "guest driver restarted" in backend.log()
        assert balloon_pages(await guest.vmstat()) == 256 * MiB // 4096
        # The new driver gives mostly the same PFNs as the old one did (same
        # kernel, same boot): had the back-end kept the old balloon, it would
        # count them as repeated and free nothing: every page of the new
        # balloon must reach fallocate again (waited for above). (The host's total is no measure
        # here: how much the reboot itself touches varies by tens of MiB.)
        assert info["repeated-pfns"] == 0, info
        assert guest.host_allocated() <= 768 * MiB
