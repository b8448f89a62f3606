#!/usr/bin/env python3
"""Fault: freeing memory is slow, while the guest and the operator wait.

A guest vCPU that reads the balloon's config traps into QEMU, which waits for
the back-end's GET_CONFIG reply with its big lock held: a back-end that
answers only after its discard finishes stalls the guest.  So does an
operator's ``query-balloon``.  Two phases, each against a back-end in this
process, with GET_CONFIG (on the front-end socket) and query-balloon (on the
control socket) sent every few milliseconds throughout:

  real      the guest hands over big buffers of randomly ordered pages
            (--buffer-pfns each; Linux sends 256, the device takes up to
            65536), so each discard punches tens of thousands of scattered
            holes: real fallocate work, timed.
  injected  every discard is made --inject-ms slower (a sleep inside the C
            core's discard call, in whichever thread runs it: a slow host), with the huge-page
            policy at eager so every buffer discards; the guest balloons
            normally meanwhile.

Checked: discards as slow as intended happened; the p99 latency of the
GET_CONFIGs and query-balloons that overlapped them is below --bound-ms
(default 50 ms: 100x an idle round trip, and far below anything a guest
notices as a stall); the balloon is right and every kept page intact.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import asynccontextmanager, contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import trio  # noqa: E402

from _common import (  # noqa: E402
    PAGE,
    Checks,
    ControlClient,
    MiB,
    backend_in_process,
    captured_logs,
    guest_on,
    log_text,
    ms,
    pages,
    parser,
    percentile,
    run_script,
    scratch_dir,
    size_arg,
    wait_until,
)
from vhostballoon.native import fault_discard, fault_discard_log  # noqa: E402
from vhostballoon.testing import GuestRAM  # noqa: E402

PROBE_EVERY = 0.002  # seconds between two GET_CONFIGs
QUERY_EVERY = 0.005  # seconds between two query-balloons
MIN_DURING = 5  # probes that must overlap slow discards for the latency figure to mean something


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ram", type=size_arg, default="1G", help="guest RAM of the real phase (default 1G)")
    p.add_argument("--buffer-pfns", type=int, default=65536, help="PFNs per buffer in the real phase (default 65536)")
    p.add_argument("--buffers", type=int, default=2, help="buffers in the real phase (default 2)")
    p.add_argument("--inject-ms", type=float, default=300.0, help="delay added to each discard in the injected phase")
    p.add_argument("--inject-balloon", type=size_arg, default="8M", help="how much the injected phase balloons")
    p.add_argument("--bound-ms", type=float, default=50.0, help="p99 latency bound (default 50)")
    p.add_argument("--slow-ms", type=float, default=None,
                   help="a discard at least this long counts as slow (default: half of --inject-ms, 20 ms in the real phase)")
    return p


class DiscardLog(list):
    """The discards run so far, as (start, end, bytes); refreshed from the
    C core's fault log on each read of ``update()``."""

    def update(self) -> DiscardLog:
        self[:] = fault_discard_log()
        return self


@contextmanager
def timed_discards(delay: float = 0.0):
    """Every discard the back-end runs, as (start, end, bytes); each made
    ``delay`` seconds slower (a sleep inside the C core's vb_discard_ranges,
    in whichever thread runs it: a slow host)."""
    intervals = DiscardLog()
    fault_discard(delay, record=True)
    try:
        yield intervals
    finally:
        intervals.update()
        fault_discard()


class Probes:
    """GET_CONFIG and query-balloon sent in a loop; (sent, answered) of each.

    ``stop()`` ends both loops between two requests, never inside one: a
    request cancelled after it was sent would leave its reply to be taken
    for the reply of the next one."""

    def __init__(self) -> None:
        self.config: list[tuple[float, float]] = []
        self.query: list[tuple[float, float]] = []
        self._stop = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run_config(self, frontend) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            data = await frontend.get_config()
            assert len(data) == 16
            self.config.append((t0, time.monotonic()))
            await trio.sleep(PROBE_EVERY)

    async def run_query(self, control: ControlClient) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            reply = await control.execute("query-balloon")
            assert "return" in reply, reply
            self.query.append((t0, time.monotonic()))
            await trio.sleep(QUERY_EVERY)

    @asynccontextmanager
    async def running(self, frontend, control_path: str):
        """Both loops (query-balloon on a control connection of its own)
        while the block runs; stopped when it ends."""
        control = await ControlClient.connect(control_path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.run_config, frontend)
                nursery.start_soon(self.run_query, control)
                yield
                self.stop()
        finally:
            await control.aclose()


def overlapping(samples, intervals, slow: float) -> list[float]:
    """Latencies of the samples that were in flight while a slow discard ran."""
    slow_ones = [(a, b) for a, b, _ in intervals if b - a >= slow]
    return [t1 - t0 for t0, t1 in samples if any(t0 < b and a < t1 for a, b in slow_ones)]


def judge(phase: str, checks: Checks, probes: Probes, intervals, slow: float, bound: float) -> None:
    durations = [b - a for a, b, _ in intervals]
    slow_count = sum(d >= slow for d in durations)
    checks.did(f"{phase}: {len(intervals)} discards, {slow_count} of them >= {ms(slow)}, longest "
               f"{ms(max(durations, default=0))} ({max((n for *_, n in intervals), default=0) // MiB} MiB in the largest)")
    checks.check(f"{phase}: slow discards happened", slow_count >= 1, f"{slow_count} >= {ms(slow)}")
    for name, samples in (("GET_CONFIG", probes.config), ("query-balloon", probes.query)):
        during = overlapping(samples, intervals, slow)
        # Answers keep coming while a discard runs (none would if it blocked the event loop).
        if not checks.check(f"{phase}: {name} kept being answered during slow discards", len(during) >= MIN_DURING,
                            f"{len(during)} of {len(samples)} overlapped them (at least {MIN_DURING} expected)"):
            continue
        p99 = percentile(during, 0.99)
        checks.check(f"{phase}: {name} p99 latency during slow discards < {ms(bound)}", p99 < bound,
                     f"{len(during)} answered during them: p50 {ms(percentile(during, 0.5))}, p99 {ms(p99)}, "
                     f"max {ms(max(during))}")


@asynccontextmanager
async def phase(name: str, args, checks: Checks, ram_size: int, *, slow: float, delay: float = 0.0,
                huge_policy: str | None = None, **ram_options):
    """What both phases share: a back-end in this process whose discards are
    timed (each made ``delay`` s slower), under ``huge_policy`` if given; a
    guest on touched GuestRAM(ram_size, **ram_options); Probes for the block
    to run with ``probes.running()``.  Yields (backend, guest, probes).
    Afterwards the probes are judged against the discards that ran (a
    discard of at least ``slow`` s counts as slow), and no session may have
    crashed."""
    probes = Probes()
    with scratch_dir() as sock_dir, captured_logs() as logs, timed_discards(delay) as intervals:
        async with backend_in_process(sock_dir) as backend:
            if huge_policy is not None:
                backend.service.set_huge_policy(huge_policy)
            ram = GuestRAM(ram_size, **ram_options)
            try:
                ram.touch()
                async with guest_on(backend.socket_path, ram) as guest:
                    yield backend, guest, probes
                    await guest.frontend.stop()
            finally:
                ram.close()
        judge(name, checks, probes, intervals.update(), slow, args.bound_ms / 1000)
        checks.check(f"{name}: no session crashed", "session failed" not in log_text(logs))


async def real_phase(args, checks: Checks) -> None:
    per_buffer, nbuffers = args.buffer_pfns, args.buffers
    slow = (args.slow_ms if args.slow_ms is not None else 20.0) / 1000
    reserved = max(2 * MiB, -(-(4 * per_buffer * nbuffers + MiB) // MiB) * MiB)
    async with phase("real", args, checks, args.ram, slow=slow, reserved=reserved) as (backend, guest, probes):
        ram, driver = guest.ram, guest.driver
        owned = driver.guest_owned_pfns()
        if per_buffer * nbuffers > len(owned):
            raise ValueError(f"{nbuffers} buffers of {per_buffer} PFNs need more than the "
                             f"{len(owned)} pages a {args.ram // MiB} MiB guest can give")
        handed_over = owned[: per_buffer * nbuffers]
        pfn_gpa = ram.alloc_reserved(4 * len(handed_over), align=PAGE)
        ram.write(pfn_gpa, handed_over.tobytes())
        vq = driver.queue("inflate")
        used_before = vq.used_idx()
        async with probes.running(guest.frontend, backend.control_path):
            await trio.sleep(0.02)  # a few idle samples first
            for n in range(nbuffers):
                vq.add_buffer([(pfn_gpa + 4 * per_buffer * n, 4 * per_buffer)])
            driver.kick("inflate")
            checks.did(f"real: {nbuffers} buffers of {per_buffer} random PFNs "
                       f"({nbuffers * per_buffer * PAGE // MiB} MiB) handed over at once")
            await wait_until(lambda: (vq.used_idx() - used_before) & 0xFFFF == nbuffers,
                             timeout=60, what="the buffers to come back")
            await trio.sleep(0.05)
        vq.get_used()
        info = backend.service.query()
        checks.check("real: every page handed over is in the balloon",
                     info["ballooned-bytes"] == len(handed_over) * PAGE,
                     f"ballooned-bytes {info['ballooned-bytes']}")
        kept = sorted(set(driver.guest_owned_pfns()) - set(handed_over))
        damaged = ram.check_canary(kept)
        checks.check("real: every kept page intact", damaged == [], f"{len(damaged)} damaged")


async def injected_phase(args, checks: Checks) -> None:
    delay = args.inject_ms / 1000
    slow = (args.slow_ms / 1000) if args.slow_ms is not None else delay / 2
    ram_size = max(args.inject_balloon * 2, 32 * MiB)
    # Policy eager: every buffer is discarded at once, one slow discard each.
    async with phase("injected", args, checks, ram_size, slow=slow, delay=delay,
                     huge_policy="eager") as (backend, guest, probes):
        async with probes.running(guest.frontend, backend.control_path):
            started = time.monotonic()
            backend.service.set_target(ram_size - args.inject_balloon)
            reached = await guest.driver.wait_for_target(pages(args.inject_balloon), timeout=120)
            took = time.monotonic() - started
        checks.did(f"injected: every discard {ms(delay)} slower; the guest ballooned "
                   f"{args.inject_balloon // MiB} MiB in {took:.2f} s")
        checks.check("injected: the guest reached its target", reached == pages(args.inject_balloon))
        damaged = guest.guest_owned_intact()
        checks.check("injected: every guest-owned page intact", damaged == [], f"{len(damaged)} damaged")


async def scenario(args, checks: Checks) -> None:
    if args.buffers > 0:
        await real_phase(args, checks)
    if args.inject_ms > 0:
        await injected_phase(args, checks)


def main(argv: list[str] | None = None) -> int:
    return run_script("slow_discard: GET_CONFIG and query-balloon answer during slow discards",
                      scenario, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
