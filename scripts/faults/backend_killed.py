#!/usr/bin/env python3
"""Fault: the back-end process is SIGKILLed in the middle of an inflate.

The daemon runs as a real process (``python -m vhostballoon --socket-path
... --state-dir ...``).  A model guest connects, the operator sets a target
over the control socket, and at a random moment of the inflate the daemon
gets SIGKILL: no clean-up of any kind, its socket files stay behind.

Checked: up to the kill, nothing was freed beyond the pages the guest handed
over and every page the guest owns is intact.  A new daemon starts on the
same paths (the stale socket files do not stop it) and restores the
operator's target from the state directory; a new VM's guest (fresh RAM, as
after a QEMU restart) connects and reaches that target with no new command,
and the host memory is really freed.  The killed daemon's page state (its
ballooned and pending pages) belongs to the old VM's memory: the new daemon
must see that (another memfd) and ignore it, never apply it to the new VM.

The other restart, the same VM reconnecting to the new daemon (QEMU's
vhost-user reconnect), where the page state IS brought back, is
tests/test_persist_restart.py.
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import trio  # noqa: E402

from _common import (  # noqa: E402
    Checks,
    ControlClient,
    MiB,
    daemon_process,
    guest_on,
    host_holes,
    pages,
    parser,
    run_script,
    scratch_dir,
    size_arg,
    wait_until,
)
from vhostballoon.testing import GuestRAM  # noqa: E402


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ram", type=size_arg, default="512M", help="guest RAM (default 512M)")
    p.add_argument("--balloon", type=size_arg, default=None,
                   help="how much the operator balloons (default: half the RAM)")
    return p


async def scenario(args, checks: Checks) -> None:
    rng = random.Random(args.seed)
    ram_size = args.ram
    balloon = args.balloon or (ram_size // 2) & ~(MiB - 1)
    target = ram_size - balloon
    with scratch_dir() as sock_dir:
        state_dir = os.path.join(sock_dir, "state")
        daemon_args = ("--state-dir", state_dir)

        # -- 1: the first daemon, killed mid-inflate --------------------------------
        old_ram = GuestRAM(ram_size, seed=0x01D)
        try:
            old_ram.touch()
            async with daemon_process(sock_dir, *daemon_args, log_name="first.log") as first:
                checks.did(f"daemon pid {first.pid} on {first.socket_path}, state dir {state_dir}")
                async with guest_on(first.socket_path, old_ram, seed=rng.randrange(1 << 31),
                                    backend_may_die=True, buffer_timeout=5.0) as guest:
                    driver = guest.driver
                    control = await ControlClient.connect(first.control_path)
                    reply = await control.execute("balloon", value=target)
                    checks.check("the operator's balloon command was accepted", reply == {"return": {}}, str(reply))
                    kill_at = rng.randint(1, max(1, pages(balloon) // 256 - 1))
                    await wait_until(lambda: driver.inflate_buffers >= kill_at, timeout=60,
                                     what=f"{kill_at} inflate buffers")
                    await trio.sleep(rng.uniform(0, 0.002))
                    first.kill()
                    status = await first.wait()
                    await control.aclose()
                    handed_over = set(driver.balloon_pfns)
                    checks.did(f"SIGKILL after {driver.inflate_buffers} inflate buffers "
                               f"({len(handed_over)} pages handed over, exit status {status})")
                    holes = host_holes(old_ram)
                    damaged = guest.guest_owned_intact()
                    checks.check("before the kill: no guest-owned page was touched", damaged == [],
                                 f"{len(damaged)} damaged")
                    checks.check("before the kill: nothing freed beyond the pages handed over",
                                 holes <= handed_over, f"{len(holes - handed_over)} beyond")
            stale = [p for p in (first.socket_path, first.control_path) if os.path.exists(p)]
            checks.did(f"left behind by the killed daemon: {', '.join(os.path.basename(p) for p in stale) or 'nothing'}")
        finally:
            old_ram.close()

        # -- 2: a new daemon, a new VM --------------------------------------------------
        started = time.monotonic()
        new_ram = GuestRAM(ram_size, seed=0x2EE)
        try:
            new_ram.touch()
            async with daemon_process(sock_dir, *daemon_args, log_name="second.log") as second:
                checks.check("a new daemon starts on the same paths (stale sockets replaced)", True,
                             f"pid {second.pid}, listening after {time.monotonic() - started:.2f} s")
                control = await ControlClient.connect(second.control_path)
                try:
                    query = (await control.execute("query-balloon"))["return"]
                    checks.check("the operator's target was restored from the state directory",
                                 query["target"] == target, f"target {query['target']} (set {target})")
                    before = new_ram.allocated_bytes()
                    async with guest_on(second.socket_path, new_ram, seed=rng.randrange(1 << 31)) as guest:
                        t0 = time.monotonic()
                        reached = await guest.driver.wait_for_target(pages(balloon), timeout=60)
                        took = time.monotonic() - t0
                        checks.check("the new guest reached the kept target with no new command",
                                     reached == pages(balloon), f"{reached} pages in the balloon after {took:.2f} s")
                        freed = await wait_until(
                            lambda: before - new_ram.allocated_bytes() >= balloon - MiB and before - new_ram.allocated_bytes(),
                            timeout=15, what="the host to free the new guest's balloon",
                        )
                        checks.check("the host freed the new guest's balloon", freed >= balloon - MiB,
                                     f"{freed // MiB} of {balloon // MiB} MiB")
                        damaged = guest.guest_owned_intact()
                        checks.check("the new guest's own pages are intact", damaged == [], f"{len(damaged)} damaged")
                        query = (await control.execute("query-balloon"))["return"]
                        checks.check("query-balloon reports the new guest at the target",
                                     query["actual"] == target and query["connected"],
                                     f"actual {query['actual']}, sessions served {query['sessions-served']}")
                finally:
                    await control.aclose()
            log = second.log()
            checks.check("the new daemon logged that it restored the target",
                         "target restored from the state directory" in log)
            checks.check("the new daemon ignored the old VM's page state (another guest memory)",
                         "page state belongs to other guest memory: ignored" in log
                         and "page state restored" not in log)
        finally:
            new_ram.close()

        # -- what is (not) recovered ------------------------------------------------------
        lost = len(handed_over - holes)
        checks.did(f"recovered: the operator's target ({target} bytes); "
                   f"the new guest ballooned {balloon // MiB} MiB from it")
        checks.did(f"not applied, by design: the old VM's page state ({lost} of its {len(handed_over)} pages "
                   "were not freed at the kill; that VM and its memory are gone with it)")


def main(argv: list[str] | None = None) -> int:
    return run_script("backend_killed: SIGKILL mid-inflate, restart, target restored",
                      scenario, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
