#!/usr/bin/env python3
"""Fault: the host refuses to free guest memory.

Two real refusals, no mocks, each against a fresh back-end in this process:

  refused      guest RAM is a memfd that gets F_SEAL_FUTURE_WRITE after the
               back-end mapped it: fallocate(PUNCH_HOLE) then fails with
               EPERM, and so does madvise(MADV_REMOVE).  Expected: the
               back-end says so once (one error line, two syscalls in all,
               not one per buffer), counts the bytes it could not free,
               keeps serving: the guest reaches its target and deflates
               back, no queue breaks, every page intact.
  fallback     a second region is a MAP_SHARED /dev/zero mapping (hot-added
               with ADD_MEM_REG): fallocate on a character device fails
               (ENODEV/EOPNOTSUPP), MADV_REMOVE on the mapping works.
               Expected: the back-end falls back to madvise without an
               error, and the memory of that mapping really goes (its Rss).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    PAGE,
    Checks,
    MiB,
    backend_in_process,
    captured_logs,
    guest_on,
    log_text,
    pages,
    parser,
    run_script,
    scratch_dir,
    size_arg,
    wait_until,
)
from vhostballoon.testing import GuestRAM  # noqa: E402
from vhostballoon.testing.wire import MemoryRegion, Request, SingleMemoryRegion  # noqa: E402

F_SEAL_FUTURE_WRITE = 0x0010  # linux/include/uapi/linux/fcntl.h (not in Python's fcntl)
FAILURE_LOG = "host memory of this region cannot be freed"
HUGE = 2 * MiB  # whole 2 MiB blocks are freed at once whatever the huge-page policy


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ram", type=size_arg, default="256M", help="guest RAM (default 256M)")
    p.add_argument("--balloon", type=size_arg, default=None, help="how much to balloon (default: a quarter of RAM)")
    return p


def sealable_ram(size: int) -> GuestRAM:
    """GuestRAM whose memfd accepts seals (GuestRAM makes it without MFD_ALLOW_SEALING)."""
    real = os.memfd_create

    def allow_sealing(name, flags=os.MFD_CLOEXEC):
        return real(name, flags | os.MFD_ALLOW_SEALING)

    with mock.patch.object(os, "memfd_create", allow_sealing):
        return GuestRAM(size)


def mapping_rss(address: int) -> int:
    """Rss in bytes of the mapping of this process that starts at ``address``."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == address
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no mapping at {address:#x}")


async def refused(args, checks: Checks) -> None:
    balloon = args.balloon or (args.ram // 4) & ~(MiB - 1)
    with scratch_dir() as sock_dir, captured_logs() as logs:
        async with backend_in_process(sock_dir) as backend:
            service = backend.service
            # Every buffer is discarded as it comes (no huge-page deferral), so
            # there are many failing discards to say something about.
            service.set_huge_policy("eager")
            ram = sealable_ram(args.ram)
            try:
                ram.touch()
                async with guest_on(backend.socket_path, ram) as guest:
                    fcntl.fcntl(ram.fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
                    checks.did("refused: guest RAM memfd sealed F_SEAL_FUTURE_WRITE after the back-end mapped it")
                    allocated = ram.allocated_bytes()
                    service.set_target(args.ram - balloon)
                    reached = await guest.driver.wait_for_target(pages(balloon), timeout=60)
                    checks.check("refused: the guest reached its target all the same", reached == pages(balloon),
                                 f"{reached} pages in the balloon, {guest.driver.inflate_buffers} buffers, "
                                 "each discarded at once (huge-page policy eager)")
                    info = await wait_until(
                        lambda: (q := service.query())["discard-failed-bytes"] >= balloon and q,
                        timeout=15, what="every ballooned byte to be tried",
                    )
                    checks.check("refused: the bytes it could not free are counted",
                                 info["discard-failed-bytes"] == balloon and info["discarded-bytes"] == 0,
                                 f"discard-failed-bytes {info['discard-failed-bytes']}, "
                                 f"discarded-bytes {info['discarded-bytes']}")
                    checks.check("refused: the refusing region is not retried (2 syscalls in all)",
                                 info["discard-syscalls"] == 2, f"discard-syscalls {info['discard-syscalls']}")
                    failures = [e for e in logs if FAILURE_LOG in e.get("event", "")]
                    checks.check("refused: the back-end said so once", len(failures) == 1,
                                 f"{len(failures)} error lines" + (f", errno {failures[0].get('errno')} "
                                                                   f"({failures[0].get('error')})" if failures else ""))
                    checks.check("refused: ... naming EPERM",
                                 bool(failures) and failures[0].get("errno") == errno.EPERM)
                    checks.check("refused: the host still holds the memory (nothing pretended)",
                                 ram.allocated_bytes() >= allocated, f"{ram.allocated_bytes() // MiB} MiB allocated")
                    checks.check("refused: no queue broke and the session goes on",
                                 info["broken-queues"] == {} and info["connected"], str(info["broken-queues"]))
                    service.set_target(args.ram)
                    await guest.driver.wait_for_target(0, timeout=60)
                    damaged = ram.check_canary()
                    checks.check("refused: deflated back to full size, every page intact", damaged == [],
                                 f"{len(damaged)} damaged")
                    await guest.frontend.stop()
            finally:
                ram.close()
        checks.check("refused: no session crashed", "session failed" not in log_text(logs))


async def fallback(args, checks: Checks) -> None:
    ram_size = min(args.ram, 64 * MiB)
    zero_size = 2 * HUGE
    with scratch_dir() as sock_dir, captured_logs() as logs:
        async with backend_in_process(sock_dir) as backend:
            service = backend.service
            ram = GuestRAM(ram_size)
            try:
                async with guest_on(backend.socket_path, ram) as guest:
                    zero = os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)
                    try:
                        region = MemoryRegion(gpa=ram_size, size=zero_size, uaddr=ram.uaddr + ram_size, mmap_offset=0)
                        await guest.frontend.request(Request.ADD_MEM_REG, SingleMemoryRegion(region),
                                                     fds=[zero], need_reply=True)
                    finally:
                        os.close(zero)
                    memory = service.session.memory
                    index = next(r.index for r in memory.regions if r.gpa == ram_size)
                    host = memory.host_address(index)
                    # Give the back-end's view of the region real pages to free.
                    ctypes.memset(host, 0xA5, HUGE)
                    rss_before = mapping_rss(host)
                    first_pfn = ram_size // PAGE
                    block = list(range(first_pfn, first_pfn + HUGE // PAGE))
                    for start in range(0, len(block), 256):
                        await guest.driver.send_pfns("inflate", block[start : start + 256])
                    checks.did(f"fallback: /dev/zero region of {zero_size // MiB} MiB hot-added at gpa {ram_size:#x}; "
                               f"{HUGE // MiB} MiB of it written, then ballooned")
                    info = service.query()
                    r = memory.regions[index]
                    rss_after = mapping_rss(host)
                    checks.check("fallback: the region is freed with madvise(MADV_REMOVE)",
                                 r.discard_method == "madvise" and r.discard_errno == 0,
                                 f"method {r.discard_method}, errno {r.discard_errno}")
                    checks.check("fallback: nothing counted as failed, the bytes counted as freed",
                                 info["discard-failed-bytes"] == 0 and info["discarded-bytes"] >= HUGE,
                                 f"discarded-bytes {info['discarded-bytes']}, failed {info['discard-failed-bytes']}")
                    checks.check("fallback: the mapping's memory really went", rss_before - rss_after >= HUGE - PAGE,
                                 f"Rss {rss_before // 1024} KiB -> {rss_after // 1024} KiB")
                    checks.check("fallback: the guest RAM region still uses fallocate",
                                 memory.regions[0].discard_method in ("fallocate", "untried"),
                                 memory.regions[0].discard_method)
                    await guest.frontend.stop()
            finally:
                ram.close()
        checks.check("fallback: no error logged", not [e for e in logs if e.get("log_level") == "error"],
                     log_text(e for e in logs if e.get("log_level") == "error")[:200])


async def scenario(args, checks: Checks) -> None:
    await refused(args, checks)
    await fallback(args, checks)


def main(argv: list[str] | None = None) -> int:
    return run_script("discard_fails: fallocate and MADV_REMOVE refused, or fallocate only",
                      scenario, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
