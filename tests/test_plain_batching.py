"""Plain shmem (no huge pages possible) is freed across buffers in 2 MiB blocks.

A block is freed with one call when its last page arrives, whatever the
order; the pages of partial blocks are freed before the guest gets back the
buffer that brings the balloon to its target, or once the inflate queue has
been quiet for 10 ms (csrc/serve.c).  Real memfds (shmem THP off, as the
suite's conftest pins it), the back-end in this process, the Linux-like
model guest over a real socket."""

from __future__ import annotations

import trio

from backend_support import MiB, PAGE, SMALL_GUEST, wait_pending_freed, wait_until
from vhostballoon.testing import model_guest

BLOCK = 2 * MiB


async def test_random_order_is_freed_in_blocks_and_all_of_it_at_the_target(backend):
    service = backend.service
    target = 64 * MiB
    async with model_guest(backend.socket_path, ram_size=SMALL_GUEST, order="random") as guest:
        q0 = service.query()
        service.set_target(SMALL_GUEST - target)
        await guest.wait_for_target(target // PAGE)
        # At once, no waiting: the buffer that reached the target came back
        # only after the partial blocks were freed.
        info = service.query()
        assert info["pending-bytes"] == 0
        assert guest.ram.host_holes() == set(guest.driver.balloon_pfns)
        assert guest.ram.check_canary(guest.driver.guest_owned_pfns()) == []
        # Freed as coalesced as the whole balloon allows (each maximal run of
        # ballooned pages, cut at most at block edges), not buffer by buffer
        # (256 scattered pages each: nearly a call per page).
        calls = info["discard-syscalls"] - q0["discard-syscalls"]
        pfns = sorted(guest.driver.balloon_pfns)
        runs = 1 + sum(1 for a, b in zip(pfns, pfns[1:]) if b != a + 1)
        blocks = len({pfn * PAGE // BLOCK for pfn in pfns})
        assert calls <= runs + blocks
        assert calls < 0.9 * len(pfns)
        assert info["regions"][0]["huge-page-size"] == PAGE and info["regions"][0]["tracking-block"] == BLOCK


async def test_pages_of_a_partial_block_are_freed_once_the_queue_is_quiet(backend):
    service = backend.service
    async with model_guest(backend.socket_path, ram_size=SMALL_GUEST) as guest:
        ram, driver = guest.ram, guest.driver
        # Three pages of one block, no target (the operator asked nothing).
        first = next(pfn for pfn in driver.guest_owned_pfns() if pfn % (BLOCK // PAGE) == 0)
        pages = [first + 3, first + 100, first + 511]
        await driver.send_pfns("inflate", pages)
        assert service.query()["pending-bytes"] == 3 * PAGE  # kept: the block may still complete
        assert not ram.host_holes() & set(pages)
        await wait_until(lambda: service.query()["discarded-bytes"] == 3 * PAGE, timeout=2,
                         what="the idle flush")
        assert service.query()["pending-bytes"] == 0
        assert ram.host_holes() == set(pages)


async def test_a_page_taken_back_while_pending_is_never_freed(backend):
    """The guest deflates one of its pending pages before the queue goes
    quiet, as the Linux driver would (it inflates, then deflates, one buffer
    at a time), and uses it again: that page left the tracker with its
    deflate, so the flush of the rest never frees it.  (Should the machine
    stall past the 10 ms and the flush come first, the page was still in the
    balloon then: freeing it was right, and the checks below hold too.)"""
    service = backend.service
    async with model_guest(backend.socket_path, ram_size=SMALL_GUEST) as guest:
        ram, driver = guest.ram, guest.driver
        first = next(pfn for pfn in driver.guest_owned_pfns() if pfn % (BLOCK // PAGE) == 0)
        given, taken_back = [first + 7, first + 8, first + 9], first + 8
        await driver.send_pfns("inflate", given)
        await driver.send_pfns("deflate", [taken_back])
        ram.touch([taken_back])  # the guest writes its page again (canary)
        await wait_pending_freed(service)
        await trio.sleep(0.05)
        assert ram.check_canary([taken_back]) == []
        assert ram.host_holes() == set(given) - {taken_back}
