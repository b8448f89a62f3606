#!/usr/bin/env python3
"""Canary: a long mixed run, after which every page the guest still owns holds
exactly what it last wrote, and the host memory freed is exactly the pages in
the balloon plus the pages the guest reported.

The back-end is a real daemon process (``python -m vhostballoon`` with a state
directory).  The guest is the testing front-end and the Linux-like model
driver on a real memfd that outlives every connection, as the guest's RAM
outlives QEMU's connection to its back-end.  Every guest page carries a
pattern: the model's canary at offset 0 (``seed << 32 | pfn``) and, at offsets
8 and 4088, ``generation << 32 | pfn`` and its complement, where the
generation goes up each time the guest writes the page anew.

Operations, chosen at random (``--seed``) until ``--duration`` runs out:

Pages go into the balloon in ``--order``; reporting takes free 2 MiB blocks.

  target      the operator sets a new target (control socket): the guest
              inflates or deflates to it (256 PFNs per buffer, random pages,
              zeroed first as a Debian guest does with init_on_alloc)
  oom         the guest takes up to 256 pages back by itself (deflate on OOM)
  report      the guest frees some 2 MiB blocks and reports them (free page
              reporting); their content is gone from then on
  write       the guest writes a new generation into random pages it owns
              (reported pages among them are used again)
  reconnect   the front-end goes away at a quiet moment (with QEMU's stop
              messages or without a word) and a new one connects; the guest
              keeps its balloon, the back-end serves the new connection
  restart     the same, and the back-end daemon itself is stopped (SIGTERM)
              and started again on the same paths and state directory

After every operation, and at the end (after ballooning back to full size):

  - every page the guest owns (not in the balloon, not reported since it
    last wrote it) is backed on the host and holds its pattern;
  - every page in the balloon and every reported page is a hole in the memfd;
  - with ``--thp`` only: a given-away page may be backed again, zero-filled,
    when the guest writes a neighbour in a 2 MiB range the host had freed
    whole (the kernel faults in a whole huge page); such pages are counted
    and printed, and must read as zeros, never as the guest's old data;
  - the memfd's allocated bytes (st_blocks * 512) are exactly the owned pages
    plus what the rings and buffers use, so the bytes the host freed are
    exactly (pages in the balloon + reported pages) * 4096.

Reconnects happen between operations, never with a buffer in flight: a
buffer dropped mid-way is QEMU's to replay (inflight tracking, not modelled
here); ``scripts/faults/frontend_gone.py`` covers drops at any moment.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from array import array
from collections import Counter
from contextlib import AsyncExitStack

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults"))

import trio  # noqa: E402

from _common import (  # noqa: E402
    MiB,
    PAGE,
    Checks,
    ControlClient,
    daemon_process,
    guest_on,
    parser,
    run_script,
    scratch_dir,
    size_arg,
    wait_until,
)
from vhostballoon.testing import GuestRAM, PfnOrder  # noqa: E402

QWORDS_PER_PAGE = PAGE // 8
MASK64 = (1 << 64) - 1
REPORT_BLOCK = 512  # pages per reported block: x86's pageblock, 2 MiB (mm/page_reporting.c)
MAX_BALLOON_SHARE = 0.9  # the operator never asks for more than this share of the guest's pages
SETTLE_TIMEOUT = 15.0  # seconds for the back-end to free what it was handed (THP flushes included)
RESERVED = 16 * MiB  # room for the rings and buffers of every reconnect (each probe takes ~90 KiB)
OPS = {  # operation: weight
    "target": 40,
    "oom": 8,
    "report": 18,
    "write": 16,
    "reconnect": 12,
    "restart": 6,
}


def build_parser():
    p = parser(__doc__)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of random operations (default 60)")
    p.add_argument("--ram", type=size_arg, default="256M", help="guest RAM (default 256M)")
    p.add_argument("--order", choices=[o.value for o in PfnOrder], default="linux",
                   help="which pages the guest balloons first (default linux: runs from the top of memory "
                        "down, which leaves whole 2 MiB blocks free to report; random leaves hardly any)")
    p.add_argument("--sandbox", action="store_true", help="run the daemon with --sandbox (seccomp allow-list)")
    p.add_argument("--thp", action="store_true",
                   help="madvise guest RAM for huge pages, as QEMU does (needs shmem_enabled advise or always)")
    return p


class GuestPages:
    """What the guest wrote where, and which pages it reported since."""

    def __init__(self, ram: GuestRAM) -> None:
        self.ram = ram
        self.generation = array("I", bytes(4 * ram.num_pages))
        self.reported = bytearray(ram.num_pages)  # 1: reported and not written since
        self._qwords = memoryview(ram.mem).cast("Q")

    def close(self) -> None:
        self._qwords.release()

    @staticmethod
    def pattern(pfn: int, generation: int) -> int:
        return (generation << 32) | pfn

    def write(self, pfns) -> None:
        """The guest writes a new generation into these pages."""
        q = self._qwords
        generation = self.generation
        reported = self.reported
        canary = self.ram.seed << 32
        for pfn in pfns:
            g = generation[pfn] + 1
            generation[pfn] = g
            reported[pfn] = 0
            value = (g << 32) | pfn
            base = pfn * QWORDS_PER_PAGE
            q[base] = canary | pfn
            q[base + 1] = value
            q[base + QWORDS_PER_PAGE - 1] = ~value & MASK64

    def damaged(self, pfns, holes: bytearray) -> list[int]:
        """Pages among ``pfns`` that are gone or do not hold their pattern.
        Holes are never read (a read would allocate them again)."""
        q = self._qwords
        generation = self.generation
        canary = self.ram.seed << 32
        bad = []
        for pfn in pfns:
            base = pfn * QWORDS_PER_PAGE
            value = (generation[pfn] << 32) | pfn
            if (
                holes[pfn]
                or q[base] != canary | pfn
                or q[base + 1] != value
                or q[base + QWORDS_PER_PAGE - 1] != ~value & MASK64
            ):
                bad.append(pfn)
        return bad

    def zero_filled(self, pfns) -> list[int]:
        """Backed pages among ``pfns`` that hold nothing at all where a
        pattern would be: filled anew by the host kernel, never the guest's
        old data.  Only call on pages that are not holes."""
        q = self._qwords
        last = QWORDS_PER_PAGE - 1
        return [pfn for pfn in pfns
                if not (q[pfn * QWORDS_PER_PAGE] or q[pfn * QWORDS_PER_PAGE + 1] or q[pfn * QWORDS_PER_PAGE + last])]

    def deflated_damaged(self, pfns, holes: bytearray) -> list[int]:
        """Pages just taken back from the balloon: the driver wrote their
        canary after the device returned the deflate buffer; they must be
        backed and hold it (the rest of the page is the guest's to write)."""
        q = self._qwords
        canary = self.ram.seed << 32
        return [pfn for pfn in pfns if holes[pfn] or q[pfn * QWORDS_PER_PAGE] != canary | pfn]


class Canary:
    def __init__(self, args, checks: Checks, sock_dir: str) -> None:
        self.args = args
        self.checks = checks
        self.sock_dir = sock_dir
        self.state_dir = os.path.join(sock_dir, "state")
        self.rng = random.Random(args.seed)
        self.ram = GuestRAM(args.ram, reserved=RESERVED, seed=self.rng.randrange(1, 1 << 32),
                            huge_pages=args.thp)
        self.pages = GuestPages(self.ram)
        self.guest_pfns = self.ram.guest_pfns()
        self.max_balloon = int(len(self.guest_pfns) * MAX_BALLOON_SHARE)
        self.daemon = None
        self.daemon_stack: AsyncExitStack | None = None
        self.guest = None
        self.guest_stack: AsyncExitStack | None = None
        self.target_pages = 0  # what the operator asked for, in balloon pages
        self.ops: Counter[str] = Counter()
        self.pages_checked = 0
        self.verifications = 0
        self.lost = 0
        self.freed_mismatches = 0
        self.most_refilled = 0  # THP: given-away pages the host kernel backed again (zero-filled)
        self.most_freed = 0  # the most host memory freed at one check, bytes
        self.most_reported = 0  # the most reported pages at one check
        self.daemons = 0
        self.last_figures: dict = {}

    # -- the back-end and the guest's connection ----------------------------------------

    async def start_daemon(self) -> None:
        self.daemon_stack = AsyncExitStack()
        self.daemon = await self.daemon_stack.enter_async_context(
            daemon_process(self.sock_dir, "--state-dir", self.state_dir, "--flush-after", "1",
                           "--stats-interval", "1", *(["--sandbox"] if self.args.sandbox else []),
                           log_name=f"daemon-{self.daemons}.log"))
        self.daemons += 1

    async def execute(self, command: str, **arguments) -> dict:
        """One control command on its own connection (a client that stays
        connected gets every BALLOON_CHANGE event and must read them)."""
        control = await ControlClient.connect(self.daemon.control_path)
        try:
            return await control.execute(command, **arguments)
        finally:
            await control.aclose()

    async def stop_daemon(self) -> int:
        """SIGTERM, as an operator or systemd stops it; returns its exit status."""
        self.daemon.process.send_signal(signal.SIGTERM)
        status = await self.daemon.wait(timeout=20)
        log = self.daemon.log()
        await self.daemon_stack.aclose()
        self.checks.check(f"daemon {self.daemons - 1} exited cleanly on SIGTERM, no session crashed",
                          status == 0 and "session failed" not in log, f"exit status {status}")
        return status

    async def connect_guest(self, previous_driver=None) -> None:
        self.guest_stack = AsyncExitStack()
        self.guest = await self.guest_stack.enter_async_context(
            guest_on(self.daemon.socket_path, self.ram, seed=self.rng.randrange(1 << 31),
                     order=self.args.order, touch_on_inflate=True, keep_balloon_of=previous_driver))
        driver = self.guest.driver
        if previous_driver is not None:
            # A new back-end session knows nothing of the balloon: the guest
            # says how big it is (QEMU would restore config space likewise).
            await driver.update_balloon_size()
        await driver.wait_for_target(timeout=60)

    async def drop_guest(self, clean: bool):
        """The front-end goes away: with QEMU's stop messages or without a word."""
        driver = self.guest.driver
        if clean:
            await self.guest.frontend.stop()
        await self.guest_stack.aclose()
        self.guest = None
        return driver

    # -- operations ---------------------------------------------------------------

    async def op_target(self) -> str:
        driver = self.guest.driver
        while (pages := self.rng.randint(0, self.max_balloon)) == self.target_pages:
            pass
        before = driver.actual_pages
        self.target_pages = pages
        reply = await self.execute("balloon", value=self.args.ram - pages * PAGE)
        if reply != {"return": {}}:
            raise RuntimeError(f"balloon command refused: {reply}")
        await driver.wait_for_target(pages, timeout=120)
        return f"target {pages} pages: balloon {before} -> {driver.actual_pages}"

    async def op_oom(self) -> str:
        driver = self.guest.driver
        if driver.actual_pages == 0:
            return "oom: balloon empty, nothing to take"
        want = self.rng.randint(1, 256)
        got = await driver.oom_deflate(want)
        return f"oom: guest took {got} pages back (balloon now {driver.actual_pages}, target {driver.target_pages})"

    async def op_report(self) -> str:
        driver = self.guest.driver
        reported = self.pages.reported
        blocks = [(first, n) for first, n in driver.free_blocks(REPORT_BLOCK) if not all(reported[first:first + n])]
        if not blocks:
            return "report: no free 2 MiB block"
        chosen = sorted(self.rng.sample(blocks, self.rng.randint(1, min(64, len(blocks)))))
        buffers = await driver.report_in_buffers(chosen)
        for first, n in chosen:
            reported[first:first + n] = b"\x01" * n
        return f"report: {len(chosen)} blocks of 2 MiB in {buffers} buffers"

    async def op_write(self) -> str:
        balloon = self.guest.driver.balloon_bitmap
        candidates = self.rng.sample(self.guest_pfns, min(len(self.guest_pfns), self.rng.randint(1, 8192)))
        pfns = [pfn for pfn in candidates if not balloon[pfn]]
        reused = sum(self.pages.reported[pfn] for pfn in pfns)
        self.pages.write(pfns)
        return f"write: new generation in {len(pfns)} pages ({reused} of them reported before)"

    async def op_reconnect(self) -> str:
        clean = self.rng.random() < 0.5
        served = None
        driver = await self.drop_guest(clean)
        await self.connect_guest(driver)
        served = (await self.execute("query-balloon"))["return"]["sessions-served"]
        return f"reconnect ({'stop messages' if clean else 'connection dropped'}): session {served}, balloon {driver.actual_pages}"

    async def op_restart(self) -> str:
        clean = self.rng.random() < 0.5
        driver = await self.drop_guest(clean)
        await self.stop_daemon()
        await self.start_daemon()
        reply = await self.execute("query-balloon")
        kept = reply["return"]["target"]
        self.checks.check("a restarted daemon kept the operator's target", kept == self.args.ram - self.target_pages * PAGE
                          or (self.target_pages == 0 and kept in (None, self.args.ram)),
                          f"target {kept}")
        await self.connect_guest(driver)
        return f"restart: daemon {self.daemons - 1} took over, balloon {self.guest.driver.actual_pages}"

    # -- the checks -------------------------------------------------------------

    def page_sets(self):
        balloon = self.guest.driver.balloon_bitmap
        reported = self.pages.reported
        in_balloon = [pfn for pfn in self.guest_pfns if balloon[pfn]]
        in_report = [pfn for pfn in self.guest_pfns if reported[pfn] and not balloon[pfn]]
        owned = [pfn for pfn in self.guest_pfns if not balloon[pfn] and not reported[pfn]]
        return in_balloon, in_report, owned

    async def verify(self, what: str, balloon_before: bytearray) -> None:
        """The pages the guest took back since ``balloon_before`` get a new
        generation (the guest uses them); then every page is checked."""
        ram = self.ram
        balloon_now = self.guest.driver.balloon_bitmap
        moved = [pfn for pfn in self.guest_pfns if balloon_before[pfn] != balloon_now[pfn]]
        deflated = [pfn for pfn in moved if not balloon_now[pfn]]
        for pfn in moved:  # into the balloon or back out: no longer a reported free page
            self.pages.reported[pfn] = 0
        in_balloon, in_report, owned = self.page_sets()
        to_free = in_balloon + in_report

        def all_freed():
            holes = ram.hole_bitmap()
            backed = [pfn for pfn in to_free if not holes[pfn]]
            if backed and not (self.args.thp and len(self.pages.zero_filled(backed)) == len(backed)):
                return None
            return holes

        try:
            holes = await wait_until(all_freed, timeout=SETTLE_TIMEOUT, what="the back-end's frees")
        except TimeoutError:
            holes = ram.hole_bitmap()
        bad_deflated = self.pages.deflated_damaged(deflated, holes)
        self.pages.write(deflated)  # the guest uses them again
        bad = self.pages.damaged(owned, holes)
        self.pages_checked += len(owned)
        self.verifications += 1
        not_freed = [pfn for pfn in to_free if not holes[pfn]]
        # With THP, a guest write into a 2 MiB range the host had freed as a
        # whole (a reported block, a fully ballooned huge page) faults in a
        # whole new huge page: the host kernel backs the given-away pages
        # around it again, zero-filled.  Not the back-end's doing, and never
        # the guest's old data (an unfreed page still holds its pattern).
        refilled = self.pages.zero_filled(not_freed) if self.args.thp else []
        if refilled:
            refilled_set = set(refilled)
            not_freed = [pfn for pfn in not_freed if pfn not in refilled_set]
        self.most_refilled = max(self.most_refilled, len(refilled))
        reserved_backed = sum(1 for pfn in range(ram.reserved_pages) if not holes[pfn])
        allocated = ram.allocated_bytes()
        freed = len(self.guest_pfns) * PAGE - (allocated - reserved_backed * PAGE)
        expected = (len(to_free) - len(refilled)) * PAGE
        lost = len(set(bad) | set(bad_deflated))
        self.lost += lost
        self.most_freed = max(self.most_freed, freed)
        self.most_reported = max(self.most_reported, len(in_report))
        self.last_figures = dict(owned=len(owned), balloon=len(in_balloon), reported=len(in_report),
                                 freed=freed, expected=expected)
        self.freed_mismatches += freed != expected
        ok = not bad and not bad_deflated and not not_freed and freed == expected
        detail = (f"{len(owned)} owned pages checked, {len(deflated)} taken back; "
                  f"host freed {freed} B = balloon {len(in_balloon)} + reported {len(in_report)} pages "
                  f"({expected} B)" + (f" - {len(refilled)} refilled by THP faults" if refilled else ""))
        if not ok:
            detail += (f"; DAMAGED {len(bad)} owned {[hex(p) for p in bad[:4]]}, {len(bad_deflated)} taken back "
                       f"{[hex(p) for p in bad_deflated[:4]]}; NOT FREED {len(not_freed)} "
                       f"{[hex(p) for p in not_freed[:4]]}; freed - expected = {freed - expected} B")
        self.checks.check(f"after {what}", ok, detail)

    # -- the run ----------------------------------------------------------------

    async def run(self) -> None:
        args, checks = self.args, self.checks
        names, weights = zip(*OPS.items())
        ram = self.ram
        self.pages.write(self.guest_pfns)
        checks.did(f"guest RAM {args.ram // MiB} MiB memfd ({len(self.guest_pfns)} guest pages, "
                   f"{RESERVED // MiB} MiB for rings), every page written; THP madvise {'on' if args.thp else 'off'}")
        await self.start_daemon()
        checks.did(f"daemon pid {self.daemon.pid} on {self.daemon.socket_path}, state dir {self.state_dir}"
                   + (", seccomp sandbox" if args.sandbox else ""))
        await self.connect_guest()
        start = time.monotonic()
        deadline = start + args.duration
        step = 0
        while time.monotonic() < deadline:
            name = self.rng.choices(names, weights)[0]
            before = bytearray(self.guest.driver.balloon_bitmap)
            text = await getattr(self, f"op_{name}")()
            self.ops[name] += 1
            step += 1
            await self.verify(f"op {step}: {text}", before)
        # The end: everything back to the guest, and checked once more.
        before = bytearray(self.guest.driver.balloon_bitmap)
        self.target_pages = 0
        await self.execute("balloon", value=args.ram)
        await self.guest.driver.wait_for_target(0, timeout=120)
        await self.verify("the end: balloon emptied (target = all of RAM)", before)
        info = (await self.execute("query-balloon"))["return"]
        await self.drop_guest(clean=True)
        await self.stop_daemon()
        elapsed = time.monotonic() - start
        figures = self.last_figures
        checks.did(f"{sum(self.ops.values())} operations in {elapsed:.1f} s: "
                   + ", ".join(f"{n} {name}" for name, n in sorted(self.ops.items())))
        checks.did(f"{self.verifications} verifications, {self.pages_checked} pages checked "
                   f"({self.pages_checked * PAGE // MiB} MiB), {self.daemons} daemons, "
                   f"last daemon's counters: pages inflated {info.get('pages-inflated')}, "
                   f"deflated {info.get('pages-deflated')}")
        checks.check("lost: 0 (no guest page ever lost its content or its memory)", self.lost == 0,
                     f"lost: {self.lost}")
        print(f"canary: seed {args.seed}, {elapsed:.1f} s, {sum(self.ops.values())} ops, "
              f"{self.verifications} checks, {self.pages_checked} pages checked; host bytes freed = "
              f"(balloon + reported) * 4096 at {self.verifications - self.freed_mismatches} of {self.verifications} "
              f"checks (most freed {self.most_freed // MiB} MiB, most reported {self.most_reported * PAGE // MiB} MiB; "
              f"at the end {figures['freed']} B freed vs {figures['expected']} B expected"
              + (f"; THP: at most {self.most_refilled} given-away pages backed again by huge page faults"
                 if self.args.thp else "") + f"); lost: {self.lost}",
              flush=True)

    async def aclose(self) -> None:
        if self.guest_stack is not None:
            await self.guest_stack.aclose()
        if self.daemon_stack is not None:
            await self.daemon_stack.aclose()
        self.pages.close()
        self.ram.close()


async def scenario(args, checks: Checks) -> None:
    with scratch_dir() as sock_dir:
        canary = Canary(args, checks, sock_dir)
        try:
            await canary.run()
        finally:
            with trio.CancelScope(shield=True):
                await canary.aclose()


def main(argv: list[str] | None = None) -> int:
    return run_script("canary: a long mixed run, every page checked", scenario, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
