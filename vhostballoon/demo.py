"""``vhostballoon demo``: the back-end, the built-in QEMU-like front-end and a
Linux-like model guest on a memfd, in one process. It balloons the guest to
half its memory and back, then has the guest report a quarter of its memory
free, and shows the host's own figures: the allocated blocks of the memfd
that backs guest RAM (``st_blocks * 512``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import trio

from .logs import configure_logging
from .native import PAGE_SIZE
from .server.daemon import run_backend
from .sizes import format_size, parse_size
from .testing import model_guest

PROGRESS_INTERVAL = 0.1


def _line(text: str, *, final: bool, tty: bool) -> None:
    if tty:
        sys.stdout.write("\r\033[K" + text + ("\n" if final else ""))
    elif final:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _follow(service, guest, ram, goal_pages: int, label: str, tty: bool) -> float:
    """Show progress until the guest's balloon holds goal_pages; returns seconds."""
    start = time.monotonic()
    last_print = 0.0
    with trio.fail_after(300):
        while True:
            actual = guest.actual_pages
            host = ram.allocated_bytes()
            text = (
                f"  {label}: balloon {format_size(actual * PAGE_SIZE):>10}"
                f"   host holds {format_size(host):>10} of {format_size(ram.size)}"
            )
            done = actual == goal_pages and guest.driver.idle
            now = time.monotonic()
            if done or now - last_print > 1.0 or tty:
                _line(text, final=done, tty=tty)
                last_print = now
            if done:
                return now - start
            await trio.sleep(PROGRESS_INTERVAL)


async def _demo(size: int, order: str) -> int:
    tty = sys.stdout.isatty()
    with tempfile.TemporaryDirectory(prefix="vhostballoon-demo-") as tmp:
        socket_path = os.path.join(tmp, "vb.sock")
        async with trio.open_nursery() as nursery:
            backend = await nursery.start(lambda task_status: run_backend(socket_path, task_status=task_status))
            service = backend.service
            print(f"back-end listening on {socket_path} (control: {backend.control_path})")
            print(f"model guest: {format_size(size)} of RAM on a memfd, every page written (touched)")
            async with model_guest(socket_path, ram_size=size, order=order) as guest:
                ram = guest.ram
                before = ram.allocated_bytes()
                print(f"host memory behind the guest: {format_size(before)} ({before} bytes)\n")

                half = size // 2
                print(f"balloon {format_size(size)} -> {format_size(half)}  (QMP-style: balloon value={half})")
                service.set_target(half)
                seconds = await _follow(service, guest, ram, (size - half) // PAGE_SIZE, "inflate", tty)
                during = ram.allocated_bytes()
                info = service.query()
                print(
                    f"  reached in {seconds:.2f} s: host memory {format_size(before)} -> {format_size(during)}"
                    f", freed {format_size(before - during)} ({before - during} bytes)"
                )
                print(
                    f"  back-end: {info['inflate-buffers']} buffers, {info['discard-syscalls']} discard calls"
                    f" for {info['pages-inflated']} pages\n"
                )

                print(f"balloon {format_size(half)} -> {format_size(size)}  (give it all back)")
                service.set_target(size)
                seconds = await _follow(service, guest, ram, 0, "deflate", tty)
                bad = guest.ram.check_canary(guest.driver.guest_owned_pfns())
                after = ram.allocated_bytes()
                print(f"  reached in {seconds:.2f} s; the guest wrote to its pages again: host holds {format_size(after)}")
                print(
                    "  pages the guest kept all along: canary intact on every one"
                    if not bad
                    else f"  CANARY BROKEN on {len(bad)} pages (first pfn {bad[0]:#x})"
                )

                # Free page reporting: what users mostly run a balloon for.
                blocks = guest.driver.free_blocks()[: size // 4 // (2 << 20)]
                reported = sum(n for _, n in blocks) * PAGE_SIZE
                print(f"\nfree page reporting: the guest reports {format_size(reported)} it no longer uses"
                      " (2 MiB blocks, 32 per buffer)")
                start = time.monotonic()
                await guest.driver.report_in_buffers(blocks)
                seconds = time.monotonic() - start
                reported_after = ram.allocated_bytes()
                info = service.query()
                print(
                    f"  {info['report-buffers']} buffer(s) in {seconds:.2f} s: host memory {format_size(after)}"
                    f" -> {format_size(reported_after)}, freed {format_size(after - reported_after)}"
                )
            nursery.cancel_scope.cancel()
    return 1 if bad else 0


def run_demo(args: argparse.Namespace) -> int:
    configure_logging("console", args.log_level)
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        print(f"vhostballoon demo: {exc}", file=sys.stderr)
        return 2
    if size < 64 << 20 or size % (2 << 20):
        print("vhostballoon demo: --size must be a multiple of 2 MiB and at least 64M", file=sys.stderr)
        return 2
    return trio.run(_demo, size, args.order)
