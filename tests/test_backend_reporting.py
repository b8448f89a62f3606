"""Free page reporting and page poison, against the Linux-like model guest.

What is freed is read from the memfd itself (its holes and allocated
blocks), what is kept from the per-page canary; every report buffer must
come back (the guest blocks on it), used length 0.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

from backend_support import MiB, PAGE, log_text, wait_until
from vhostballoon.device.features import parse_feature_spec
from vhostballoon.device.hugepages import FlushPolicy, HugePolicy
from vhostballoon.server.daemon import run_backend
from vhostballoon.server.service import BalloonService
from vhostballoon.testing import QueueRole, model_guest

GUEST = 128 * MiB
BLOCK = 512  # pages in a 2 MiB block, x86's pageblock: what Linux reports


@pytest.fixture
async def backend(nursery, socket_path, logs):
    """The back-end with the 'eager' huge page policy: ballooned pages are
    freed at once whatever the host's shmem THP setting is, so the holes
    these tests count do not depend on it."""
    service = BalloonService(flush_policy=FlushPolicy(HugePolicy.EAGER))
    return await nursery.start(partial(run_backend, socket_path, service=service))


def pages_of(ranges) -> set[int]:
    """PFNs of (gpa, length) byte ranges."""
    return {pfn for gpa, length in ranges for pfn in range(gpa // PAGE, (gpa + length) // PAGE)}


async def test_reports_free_exactly_the_valid_ranges_and_every_buffer_comes_back(backend, logs):
    service = backend.service
    async with model_guest(backend.socket_path, ram_size=GUEST, order="sequential") as guest:
        ram, driver = guest.ram, guest.driver
        # Some pages in the balloon first, so that a report can overlap it.
        service.set_target(GUEST - 1 * MiB)
        await guest.wait_for_target(MiB // PAGE)
        ballooned = set(driver.balloon_pfns)
        assert ram.host_holes() == ballooned
        free = driver.free_blocks(BLOCK)
        blocks = [(first * PAGE, n * PAGE) for first, n in free]
        # The sequential guest balloons its lowest pages: block 1 holds them.
        assert ballooned <= set(range(BLOCK, 2 * BLOCK)) and blocks[0][0] == 4 * MiB
        in_balloon = (BLOCK * PAGE, 2 * MiB)
        assert blocks[2][0] == 8 * MiB and blocks[3][0] == 10 * MiB
        valid = [
            blocks[0],  # 2 MiB, naturally aligned: what Linux sends
            (8 * MiB, 4 * MiB),  # a larger buddy block
            (blocks[5][0] + 8 * PAGE, 3 * PAGE),  # legal but unusual: freed, logged
        ]
        hostile = [
            (GUEST + 2 * MiB, 2 * MiB),  # out of guest memory
            (GUEST - 1 * MiB, 2 * MiB),  # runs past the end of guest memory
            (blocks[6][0] + 512, 2 * MiB),  # address not 4 KiB aligned
            (blocks[7][0], 2 * MiB + 100),  # length not 4 KiB aligned
            (blocks[8][0], 0),  # zero length
            (blocks[9][0], 2 * MiB),  # these two overlap each other
            (blocks[9][0] + 1 * MiB, 2 * MiB),
            in_balloon,  # covers ballooned pages
        ]
        written = await driver.send_report(valid[:1] + hostile[:4] + valid[1:] + hostile[4:])
        assert written == 0  # returned, nothing written into it

        # Exactly the valid ranges are holes now (plus the balloon); every
        # other guest page still holds its canary.
        assert ram.host_holes() == ballooned | pages_of(valid)
        keep = sorted(set(driver.guest_owned_pfns()) - pages_of(valid))
        assert ram.check_canary(keep) == []

        info = service.query()
        # A guest that does not poison free pages drops PAGE_POISON (virtballoon_validate).
        assert "balloon:page_poison" not in info["features"] and info["poison-val"] == 0
        assert info["report-buffers"] == 1 and info["report-entries"] == len(valid) + len(hostile)
        assert info["report-freed-bytes"] == sum(n for _, n in valid)
        assert info["report-freed-bytes-measured"] == sum(n for _, n in valid)
        assert info["report-invalid-entries"] == len(hostile)
        assert info["report-invalid"] == {
            "outside-memory": 2, "misaligned": 2, "zero-length": 1, "overlapping": 2, "in-balloon": 1,
        }
        assert info["report-invalid-bytes"] == sum(n for _, n in hostile)
        assert info["reported-bytes"] == sum(n for _, n in valid + hostile)
        assert info["report-skipped-bytes"] == 0 and info["report-unnatural-entries"] == 1
        assert info["broken-queues"] == {}
        warnings = log_text([e for e in logs if e.get("log_level") == "warning"])
        assert "invalid free page report entries" in warnings and "count=8" in warnings

        # The queue goes on: Linux-style reports of 32 entries each come back too.
        more = driver.free_blocks(BLOCK)[10:50]
        assert await driver.report_in_buffers(more) == 2
        assert ram.host_holes() >= pages_of((f * PAGE, n * PAGE) for f, n in more)
        assert service.query()["report-buffers"] == 3
        # The balloon still works, and the reported pages are the guest's to use.
        service.set_target(GUEST)
        await guest.wait_for_target(0)
        ram.touch()
        assert ram.check_canary() == []


async def test_a_device_readable_report_breaks_only_the_reporting_queue(backend):
    service = backend.service
    async with model_guest(backend.socket_path, ram_size=GUEST) as guest:
        vq = guest.driver.queue(QueueRole.REPORTING)
        gpa = guest.driver.free_blocks(BLOCK)[0][0] * PAGE
        vq.add_buffer([(gpa, 2 * MiB)])  # device-readable: not a report
        guest.driver.kick(QueueRole.REPORTING)
        broken = await wait_until(lambda: service.query()["broken-queues"], what="the reporting queue to break")
        assert list(broken) == [vq.index] and "device-readable" in broken[vq.index]
        assert guest.ram.host_holes() == set()
        service.set_target(GUEST - 2 * MiB)  # the balloon is not affected
        await guest.wait_for_target(2 * MiB // PAGE)
        assert guest.ram.host_holes() == set(guest.driver.balloon_pfns)


async def test_a_poisoning_guest_keeps_its_reported_pages(backend, logs):
    service = backend.service
    async with model_guest(backend.socket_path, ram_size=GUEST, poison_val=0xAAAAAAAA) as guest:
        ram, driver = guest.ram, guest.driver
        info = service.query()
        assert "balloon:page_poison" in info["features"] and "balloon:reporting" in info["features"]
        assert info["poison-val"] == 0xAAAAAAAA
        reported = driver.free_blocks(BLOCK)[:40]
        await driver.report_in_buffers(reported)
        # Nothing reported is discarded: a freed page would read back as
        # zeros, not as the guest's poison.
        assert ram.host_holes() == set()
        assert ram.check_canary() == []
        info = service.query()
        assert info["report-freed-bytes"] == 0
        assert info["report-skipped-bytes"] == info["reported-bytes"] == 40 * 2 * MiB
        assert info["report-skipped"] == {"poison": 40 * 2 * MiB}
        assert "poison_val=0xaaaaaaaa reported_pages=kept" in log_text(logs)
        # Inflated pages are discarded as usual: the guest poisons pages it frees.
        service.set_target(GUEST - 4 * MiB)
        await guest.wait_for_target(4 * MiB // PAGE)
        assert ram.host_holes() == set(driver.balloon_pfns) and len(ram.host_holes()) == 4 * MiB // PAGE


async def test_without_poison_offered_a_poisoning_guest_does_not_report(nursery, socket_path):
    service = BalloonService(features=parse_feature_spec("-poison"))
    backend = await nursery.start(partial(run_backend, socket_path, service=service))
    async with model_guest(backend.socket_path, ram_size=GUEST, poison_val=0xAAAAAAAA) as guest:
        # virtballoon_validate: a guest that poisons must be able to say so,
        # or it turns reporting off; the queues pack down accordingly.
        assert guest.driver.roles == [QueueRole.INFLATE, QueueRole.DEFLATE, QueueRole.STATS]
        info = service.query()
        assert info["queues"] == ["inflate", "deflate", "stats"]
        assert info["offered-queues"] == ["inflate", "deflate", "stats", "reporting", "range-inflate", "range-deflate"]


async def test_memory_table_change_keeps_rings_where_they_were(backend):
    """ADD_MEM_REG while queues run: the rings are set up again but carry on
    at their position (a reset to the original base would replay old
    buffers, and the guest would see its used ring go backwards)."""
    service = backend.service
    async with model_guest(backend.socket_path, ram_size=GUEST, order="sequential") as guest:
        service.set_target(GUEST - 2 * MiB)
        await guest.wait_for_target(2 * MiB // PAGE)
        await guest.driver.report_free_pages(guest.driver.free_blocks(BLOCK)[:2])
        # A second memory region appears (QEMU: memory hotplug).
        from vhostballoon.testing import GuestRAM
        from vhostballoon.testing.wire import MemoryRegion, Request, SingleMemoryRegion

        with GuestRAM(4 * MiB, reserved=PAGE) as extra:
            region = MemoryRegion(gpa=GUEST * 2, size=extra.size, uaddr=0x7E00_0000_0000, mmap_offset=0)
            await guest.frontend.request(Request.ADD_MEM_REG, SingleMemoryRegion(region=region), fds=[extra.fd],
                                         need_reply=True)
            # Guest RAM is 4 MiB larger now: the target is again 4 MiB below it.
            service.set_target(GUEST)
            await guest.wait_for_target(4 * MiB // PAGE)
            await guest.driver.report_free_pages(guest.driver.free_blocks(BLOCK)[:2])
            await trio.sleep(0.05)
            info = service.query()
            assert info["broken-queues"] == {} and info["repeated-pfns"] == 0
            assert info["report-buffers"] == 2 and len(info["regions"]) == 2
