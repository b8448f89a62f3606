"""Range ballooning (protocol/range-balloon.md) through the whole back-end:
the model guest negotiates VIRTIO_BALLOON_F_RANGES and balloons by ranges,
2 MiB blocks first; the back-end serves both range queues with its C
threads (EXTENTS sink), frees whole huge pages in one call and never frees
what the guest did not give or took back."""

from __future__ import annotations

import pytest

from backend_support import PAGE, MiB, log_text, meminfo, vmstat, wait_pending_freed
from vhostballoon.device.features import BalloonFeature, parse_feature_spec
from vhostballoon.server.service import BalloonService
from vhostballoon.testing import LINUX_FEATURES, RANGE_FEATURES, QueueRole, model_guest

GUEST = 128 * MiB
HUGE = 2 * MiB
BLOCK = HUGE // PAGE
NUM_VQS = 7  # every queue, range queues included


def ranged_guest(backend, **kwargs):
    return model_guest(backend.socket_path, ram_size=GUEST, features=RANGE_FEATURES, num_vqs=NUM_VQS, **kwargs)


async def test_the_range_guest_gets_two_range_queues_packed_after_the_others(backend):
    async with ranged_guest(backend) as guest:
        assert guest.driver.roles == [QueueRole.INFLATE, QueueRole.DEFLATE, QueueRole.STATS, QueueRole.REPORTING,
                                      QueueRole.RANGE_INFLATE, QueueRole.RANGE_DEFLATE]
        info = backend.service.query()
        assert info["queues"] == ["inflate", "deflate", "stats", "reporting", "range-inflate", "range-deflate"]
        assert "balloon:ranges" in info["features"]


async def test_a_stock_guest_ignores_the_offer_and_balloons_by_pfn(backend):
    async with model_guest(backend.socket_path, ram_size=GUEST, features=LINUX_FEATURES) as guest:
        backend.service.set_target(GUEST - 8 * MiB)
        await guest.wait_for_target(8 * MiB // PAGE)
        info = backend.service.query()
        assert "balloon:ranges" not in info["features"]
        assert info["pages-inflated"] == 8 * MiB // PAGE and info["pages-inflated-by-range"] == 0
        assert guest.ram.host_holes() == set(guest.driver.balloon_pfns)


async def test_ranges_balloon_in_2mib_blocks_and_free_exactly_those_pages(backend):
    service = backend.service
    async with ranged_guest(backend) as guest:
        ram, driver = guest.ram, guest.driver
        service.set_target(GUEST - 64 * MiB - 3 * PAGE)  # 32 blocks and 3 pages
        await guest.wait_for_target(64 * MiB // PAGE + 3)
        await wait_pending_freed(service)
        info = service.query()
        assert info["ballooned-bytes"] == 64 * MiB + 3 * PAGE
        assert info["pages-inflated-by-range"] == 64 * MiB // PAGE + 3 and info["pages-ballooned-by-range"] == 64 * MiB // PAGE + 3
        assert info["ranges-by-order"] == {"9": 32, "0": 3}
        assert info["inflate-buffers"] == 0 and info["range-inflate-buffers"] >= 1
        assert info["ranges-refused"] == 0 and info["repeated-pfns"] == 0
        assert ram.host_holes() == set(driver.balloon_pfns)
        assert ram.check_canary(sorted(driver.guest_owned_pfns())) == []

        # Back up by 1 MiB + 3 pages: the three 4 KiB pages first (lowest
        # order), then half a block (the block is split).
        service.set_target(GUEST - 63 * MiB)
        await guest.wait_for_target(63 * MiB // PAGE)
        info = service.query()
        assert info["ballooned-bytes"] == 63 * MiB
        assert info["pages-deflated-by-range"] == 1 * MiB // PAGE + 3
        assert ram.host_holes() == set(driver.balloon_pfns)
        assert ram.check_canary(sorted(driver.guest_owned_pfns())) == []

        service.set_target(GUEST)
        await guest.wait_for_target(0)
        assert service.query()["ballooned-bytes"] == 0
        assert ram.check_canary(sorted(driver.guest_owned_pfns())) == []


async def test_range_queues_off_by_feature_spec(nursery, socket_path):
    from functools import partial

    from vhostballoon.server.daemon import run_backend

    service = BalloonService(features=parse_feature_spec("-ranges"))
    backend = await nursery.start(partial(run_backend, socket_path, service=service))
    assert not service.features & BalloonFeature.RANGES
    async with model_guest(backend.socket_path, ram_size=GUEST, features=RANGE_FEATURES) as guest:
        assert QueueRole.RANGE_INFLATE not in guest.driver.roles  # not offered, so not negotiated
        service.set_target(GUEST - 4 * MiB)
        await guest.wait_for_target(4 * MiB // PAGE)
        assert service.query()["pages-inflated-by-range"] == 0


async def test_whole_huge_pages_go_in_one_call_each_and_none_splits(backend, socket_path, shmem_thp_advise):
    """THP-backed guest RAM: the range guest's 2 MiB blocks are whole huge
    pages (by file offset): each is freed whole, under the strictest
    policy, with no split."""
    service = backend.service
    service.set_huge_policy("whole")
    huge0 = meminfo("ShmemHugePages")
    async with ranged_guest(backend, huge_pages=True) as guest:
        if meminfo("ShmemHugePages") - huge0 < GUEST // 2:
            pytest.skip("THP not available: the madvised memfd did not get huge pages")
        splits0 = vmstat("thp_split_page")
        before = guest.ram.allocated_bytes()
        service.set_target(GUEST - 64 * MiB)
        await guest.wait_for_target(64 * MiB // PAGE)
        info = service.query()
        assert info["thp-splits"] == 0 and vmstat("thp_split_page") == splits0
        assert info["pending-bytes"] == 0
        assert info["huge-pages-freed-whole"] == 32
        assert before - guest.ram.allocated_bytes() == 64 * MiB
        assert guest.ram.host_holes() == set(guest.driver.balloon_pfns)


async def test_a_page_given_by_pfn_can_be_taken_back_by_range(backend, logs):
    async with ranged_guest(backend) as guest:
        driver, ram = guest.driver, guest.ram
        block = driver.free_blocks(BLOCK)[0][0]
        await driver.send_pfns("inflate", range(block, block + 16))
        await wait_pending_freed(backend.service)
        assert ram.host_holes() == set(range(block, block + 16))
        ram.touch(range(block, block + 16))  # (a guest would only after the deflate: checks nothing is freed later)
        await driver.send_ranges("range-deflate", [(block * PAGE, 16 * PAGE)])
        info = backend.service.query()
        assert info["pages-deflated"] == 16 and info["ballooned-bytes"] == 0
        await wait_pending_freed(backend.service)
        assert ram.check_canary(list(range(block, block + 16))) == []
        assert "ranges refused" not in log_text(logs)
