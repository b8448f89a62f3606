"""Free page reporting, page poison and guest statistics with a real QEMU 10.2
and the stock Linux 6.1 virtio_balloon driver.

The host's own figure is the memfd behind guest RAM (its allocated blocks);
the guest's are /proc/meminfo and its console.  Each test prints what it
measured (pytest -s shows it).
"""

from __future__ import annotations

import time

import trio

from vhostballoon.testing.qemu import balloon_guest

MiB = 1 << 20
REPORT_DEADLINE = 20.0  # seconds: Linux reports 2 s after a free, 32 blocks per buffer
POISON = 0xAAAAAAAA  # include/linux/poison.h PAGE_POISON 0xaa, in each byte of poison_val


async def wait_host_drop(guest, full: int, want: int, deadline: float) -> tuple[int, float]:
    """Poll the host's bytes behind guest RAM until they are ``want`` below
    ``full`` or the deadline passes; returns (largest drop seen, seconds)."""
    start = time.monotonic()
    best = 0
    while time.monotonic() - start < deadline:
        best = max(best, full - guest.host_allocated())
        if best >= want:
            break
        await trio.sleep(0.25)
    return best, time.monotonic() - start


async def test_reporting_gives_back_what_the_guest_wrote_and_freed(tmp_path, backend):
    async with balloon_guest(tmp_path, backend.socket_path) as guest:
        info = await backend.query()
        assert "balloon:reporting" in info["features"] and info["queues"][-1] == "reporting"
        assert (await guest.run("fill 800", timeout=120)).rc == 0
        full = guest.host_allocated()
        assert full > 800 * MiB, f"the guest's 800 MiB should be backed on the host: {full / MiB:.0f} MiB"
        before = await backend.query()

        unfill_started = time.monotonic()
        assert (await guest.run("unfill")).rc == 0
        dropped, waited = await wait_host_drop(guest, full, 700 * MiB, REPORT_DEADLINE)
        waited_total = time.monotonic() - unfill_started
        after = await backend.query()
        freed = after["report-freed-bytes"] - before["report-freed-bytes"]
        print(
            f"\nreporting: host memory behind the guest dropped {dropped / MiB:.0f} MiB "
            f"{waited_total:.1f} s after unfill began; report-freed-bytes +{freed / MiB:.0f} MiB in "
            f"{after['report-buffers'] - before['report-buffers']} buffers"
        )
        assert dropped >= 700 * MiB, (
            f"host memory dropped only {dropped / MiB:.0f} MiB within {REPORT_DEADLINE:.0f} s of unfill; "
            f"back-end: {after}"
        )
        assert freed >= 700 * MiB
        assert after["report-invalid-entries"] == 0 and after["report-skipped-bytes"] == 0
        assert after["broken-queues"] == {}
        # The reported memory is the guest's to use again.
        assert (await guest.run("fill 600", timeout=120)).rc == 0
        assert guest.host_allocated() > full - 300 * MiB


async def test_a_poisoning_guest_reports_but_nothing_is_discarded(tmp_path, backend):
    async with balloon_guest(tmp_path, backend.socket_path, append="page_poison=1") as guest:
        # Debian's 6.1 kernel has CONFIG_PAGE_POISONING=y; page_poison=1 turns
        # it on and takes precedence over init_on_alloc.
        cmdline = (await guest.run("sh cat /proc/cmdline")).lines
        assert any("page_poison=1" in line for line in cmdline), cmdline
        dmesg = "\n".join((await guest.run("sh dmesg | grep -i -e poison -e 'mem auto-init'")).lines)
        assert "PAGE_POISONING is on" in dmesg, dmesg
        info = await backend.query()
        # The guest kept PAGE_POISON (it poisons) and so kept REPORTING, and
        # told the back-end its poison value.
        assert "balloon:page_poison" in info["features"] and "balloon:reporting" in info["features"]
        assert info["poison-val"] == POISON

        assert (await guest.run("fill 800", timeout=180)).rc == 0
        full = guest.host_allocated()
        assert (await guest.run("unfill", timeout=120)).rc == 0
        # Wait until the guest has reported the freed memory, then check the
        # host still holds it.
        info = await backend.wait_for(
            lambda i: i["report-skipped-bytes"] >= 700 * MiB, 30, "the guest to report its freed 800 MiB"
        )
        print(
            f"\npoison: {info['report-skipped-bytes'] / MiB:.0f} MiB reported and kept "
            f"({info['report-buffers']} buffers), host {guest.host_allocated() / MiB:.0f} MiB of {full / MiB:.0f}"
        )
        assert info["report-freed-bytes"] == 0
        assert info["report-skipped"] == {"poison": info["report-skipped-bytes"]}
        assert info["report-skipped-bytes"] == info["reported-bytes"]
        assert guest.host_allocated() >= full - 16 * MiB, "reported pages were discarded despite poisoning"

        # The guest allocates the reported pages again and checks their
        # poison: no corruption, and it works as before.
        assert (await guest.run("fill 800", timeout=180)).rc == 0
        assert (await guest.run("unfill", timeout=120)).rc == 0
        corrupt = await guest.run("sh dmesg | grep -c 'memory corruption'")
        assert corrupt.lines == ["0"], corrupt.lines
        assert (await guest.run("mem")).rc == 0


async def test_guest_statistics_appear_and_follow_the_guest(tmp_path, backend_factory):
    interval = 2.0
    backend = backend_factory("vb", "--stats-interval", str(interval))
    async with balloon_guest(tmp_path, backend.socket_path) as guest:
        ready = time.monotonic()
        # The primed buffer is decoded when the queue starts; fresh numbers
        # every interval after that.
        info = await backend.wait_for(
            lambda i: i["guest-stats"]["updates"] >= 2, 2 * interval + 1, "two stats updates"
        )
        seen_after = time.monotonic() - ready
        mem = await guest.meminfo()
        stats = info["guest-stats"]["stats"]
        assert stats["stat-total-memory"] == mem["MemTotal"] * 1024
        assert set(stats) >= {"stat-free-memory", "stat-available-memory", "stat-disk-caches", "stat-minor-faults"}
        free_before = stats["stat-free-memory"]

        assert (await guest.run("fill 200", timeout=60)).rc == 0
        filled = time.monotonic()
        info = await backend.wait_for(
            lambda i: free_before - i["guest-stats"]["stats"]["stat-free-memory"] >= 180 * MiB,
            2 * interval + 1,
            "stat-free-memory to drop by the 200 MiB the guest wrote",
        )
        followed_after = time.monotonic() - filled
        stats_query = await backend.execute("query-stats")
        assert stats_query["stats-interval"] == interval and stats_query["age-seconds"] <= interval + 1
        print(
            f"\nstats: {info['guest-stats']['updates']} updates; first fresh ones {seen_after:.1f} s after the guest "
            f"was ready; stat-free-memory {free_before / MiB:.0f} -> "
            f"{info['guest-stats']['stats']['stat-free-memory'] / MiB:.0f} MiB {followed_after:.1f} s after fill 200; "
            f"tags: {sorted(stats)}"
        )
