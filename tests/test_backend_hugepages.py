"""Huge pages through the whole back-end: the model guest's RAM is a real
THP-backed memfd (shmem_enabled=advise + MADV_HUGEPAGE, as QEMU madvises guest
RAM), the back-end detects it and applies the huge page policy."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio

from backend_support import PAGE, MiB, meminfo, vmstat, wait_until
from vhostballoon.server.control import execute_line
from vhostballoon.testing import model_guest

GUEST = 256 * MiB
TARGET = 128 * MiB  # so 128 MiB go into the balloon
HUGE = 2 * MiB


def _require_thp_backed(before_shmem_huge: int) -> None:
    gained = meminfo("ShmemHugePages") - before_shmem_huge
    if gained < GUEST // 2:
        pytest.skip(f"THP not available: touching a {GUEST >> 20} MiB madvised memfd gave only {gained >> 20} MiB of ShmemHugePages")


@asynccontextmanager
async def _ballooned_thp_guest(service, socket_path, order: str):
    """A model guest on THP-backed RAM (the test is skipped where THP does
    not back it) that has put TARGET into the balloon, under the policy the
    service has.  Yields (guest, its allocated bytes before the balloon, the
    thp_split_page count before the balloon)."""
    huge0 = meminfo("ShmemHugePages")
    async with model_guest(socket_path, ram_size=GUEST, huge_pages=True, order=order) as guest:
        _require_thp_backed(huge0)
        splits0 = vmstat("thp_split_page")
        before = guest.ram.allocated_bytes()
        service.set_target(GUEST - TARGET)
        await guest.wait_for_target(TARGET // PAGE, timeout=60)
        yield guest, before, splits0


async def test_linux_order_frees_whole_huge_pages_with_no_split(backend, socket_path, shmem_thp_advise):
    service = backend.service
    service.set_huge_policy("whole")
    async with _ballooned_thp_guest(service, socket_path, "linux") as (guest, before, splits0):
        info = service.query()
        freed = before - guest.ram.allocated_bytes()

        assert info["regions"][0]["backing"] == "shmem" and info["regions"][0]["huge-page-size"] == HUGE
        assert info["huge-page-policy"] == "whole"
        assert info["thp-splits"] == 0 and vmstat("thp_split_page") == splits0
        # Everything ballooned is either freed as whole huge pages or pending.
        assert freed + info["pending-bytes"] == TARGET
        assert info["huge-pages-freed-whole"] * HUGE == freed
        assert freed >= TARGET - 8 * HUGE, f"descending runs should complete most huge pages: freed {freed >> 20} MiB"


async def test_random_order_whole_keeps_partial_huge_pages_then_runtime_eager_frees_them(
    backend, socket_path, shmem_thp_advise
):
    service = backend.service
    service.set_huge_policy("whole")
    async with _ballooned_thp_guest(service, socket_path, "random") as (guest, before, splits0):
        info = service.query()
        # Random pages hardly ever complete a huge page: under "whole" they wait.
        assert info["thp-splits"] == 0 and vmstat("thp_split_page") == splits0
        assert info["pending-bytes"] + info["huge-pages-freed-whole"] * HUGE == TARGET
        assert info["pending-bytes"] > TARGET // 2
        assert before - guest.ram.allocated_bytes() == info["huge-pages-freed-whole"] * HUGE

        # The operator switches to eager over the control socket: the pending
        # pages are freed now, splitting the huge pages they sit in.
        reply = execute_line(service, b'{"execute": "set-huge-policy", "arguments": {"policy": "eager"}}')
        assert reply["return"]["huge-page-policy"] == "eager"
        # The memfd's blocks drop while the discard thread runs; the counters
        # are recorded when it returns: wait for those.
        await wait_until(lambda: service.query()["freed-shmem-bytes"] == TARGET, what="pending pages freed")
        assert before - guest.ram.allocated_bytes() == TARGET
        info = service.query()
        assert info["pending-bytes"] == 0
        assert info["thp-splits"] > 0
        assert not guest.ram.check_canary(guest.driver.guest_owned_pfns())


async def test_auto_frees_partial_huge_pages_once_the_guest_is_at_target(backend, socket_path, shmem_thp_advise):
    service = backend.service
    assert service.flush_policy.mode.value == "auto"
    async with _ballooned_thp_guest(service, socket_path, "random") as (guest, before, _):
        # The operator's target is met in bytes of host memory, shortly after.
        await wait_until(lambda: service.query()["freed-shmem-bytes"] == TARGET, timeout=5, what="all ballooned bytes freed")
        assert before - guest.ram.allocated_bytes() == TARGET
        info = service.query()
        assert info["pending-bytes"] == 0
        assert info["freed-shmem-bytes"] == TARGET


async def test_deflated_pages_are_never_freed_by_a_later_flush(backend, socket_path, shmem_thp_advise):
    """Deflate is sacred: pages pending under "whole" that the guest takes
    back must stay out of any later flush."""
    service = backend.service
    service.set_huge_policy("whole")
    async with _ballooned_thp_guest(service, socket_path, "random") as (guest, _, _):
        pending = service.query()["pending-bytes"]
        assert pending > 0
        allocated_at_target = guest.ram.allocated_bytes()

        service.set_target(GUEST)  # give everything back
        await guest.wait_for_target(0, timeout=60)
        assert service.query()["pending-bytes"] == 0

        service.set_huge_policy("eager")  # a flush now must find nothing to free
        await trio.sleep(0.2)  # the policy change's flush runs in the session's nursery
        info = service.query()
        assert info["pending-bytes"] == 0
        # Deflated pages were written again by the guest; nothing was punched.
        assert guest.ram.allocated_bytes() >= allocated_at_target
        # Every page is the guest's again and holds the canary it wrote after
        # taking it back: a page freed after its deflate would be a hole here.
        assert not guest.ram.check_canary(guest.driver.guest_owned_pfns())


def test_set_huge_policy_rejects_bad_arguments(tmp_path):
    from vhostballoon.server.service import BalloonService

    service = BalloonService()
    for line, fragment in [
        (b'{"execute": "set-huge-policy", "arguments": {"policy": "sometimes"}}', "'sometimes'"),
        (b'{"execute": "set-huge-policy", "arguments": {}}', "takes 'policy'"),
        (b'{"execute": "set-huge-policy", "arguments": {"policy": "auto", "flush-bytes": -1}}', "-1"),
        (b'{"execute": "set-huge-policy", "arguments": {"policy": "auto", "flush-after": "soon"}}', "'soon'"),
    ]:
        reply = execute_line(service, line)
        assert fragment in reply["error"]["desc"], reply
    assert service.flush_policy.mode.value == "auto"
    ok = execute_line(service, b'{"execute": "set-huge-policy", "arguments": {"policy": "whole", "flush-after": 2}}')
    assert ok["return"] == {"huge-page-policy": "whole", "flush-bytes": 1 << 30, "flush-after": 2}
    assert execute_line(service, b'{"execute": "query-balloon"}')["return"]["huge-page-policy"] == "whole"


async def test_ctl_huge_policy_changes_the_running_backend(backend):
    import sys

    result = await trio.run_process(
        [sys.executable, "-m", "vhostballoon.ctl", "--control-socket", backend.control_path,
         "huge-policy", "eager", "--flush-bytes", "16M"],
        capture_stdout=True, capture_stderr=True,
    )
    assert b"huge-page-policy" in result.stdout and b"eager" in result.stdout
    assert backend.service.flush_policy.mode.value == "eager"
    assert backend.service.flush_policy.flush_bytes == 16 << 20
