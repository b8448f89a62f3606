#!/usr/bin/env python3
"""Fault: a front-end floods kicks.

The daemon runs as a real process, so that its own CPU time can be read.  A
separate flooder process gets the guest's kick eventfds (SCM_RIGHTS is not
needed: it inherits them) and writes them in a tight loop, every queue at
once, hundreds of thousands of kicks a second:

  while inflating   the operator sets a target at the start of the flood;
                    the guest balloons through it
  with no buffers   the guest is idle, every kick is a re-kick of a ring
                    with nothing new in it

Checked: the guest reaches its target during the flood and GET_CONFIG stays
fast; the daemon's CPU stays within one core during the flood and drops to
idle as soon as it stops (a back-end that does not drain its kick eventfd
spins forever); the kick counters are drained; re-kicks with nothing new
produce no used entries and no interrupts; no error is logged; the daemon
still answers and the guest deflates back afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import trio  # noqa: E402

from _common import (  # noqa: E402
    Checks,
    ControlClient,
    MiB,
    daemon_process,
    eventfd_count,
    guest_on,
    ms,
    pages,
    parser,
    percentile,
    run_script,
    scratch_dir,
    size_arg,
)
from vhostballoon.testing import GuestRAM  # noqa: E402

# The flooder: writes 1 to every fd given, round and round, for a while;
# prints how many writes it made.
FLOODER = """
import os, sys, time
seconds, fds = float(sys.argv[1]), [int(a) for a in sys.argv[2:]]
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    for _ in range(64):
        for fd in fds:
            try:
                os.eventfd_write(fd, 1)
            except BlockingIOError:
                pass
        n += len(fds)
print(n)
"""
IDLE_WINDOW = 1.0  # seconds of watching the daemon's CPU once a flood is over
IDLE_CPU_MAX = 0.10  # of one core: a daemon waiting for work uses next to nothing
FLOOD_CPU_MAX = 1.05  # of one core: the event loop is one thread (discards run beside it, briefly)


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ram", type=size_arg, default="512M", help="guest RAM (default 512M)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each flood (default 3)")
    p.add_argument("--min-kicks", type=int, default=10000, help="kicks a flood must reach (default 10000)")
    p.add_argument("--bound-ms", type=float, default=50.0, help="GET_CONFIG p95 bound during the flood")
    return p


async def flood(kick_fds: list[int], seconds: float) -> trio.Process:
    """Starts the flooder on ``kick_fds`` (it inherits them) for ``seconds``."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", FLOODER, str(seconds), *map(str, kick_fds)],
        stdout=subprocess.PIPE, pass_fds=kick_fds,
    )
    return process


async def flood_result(process) -> int:
    """Waits for the flooder; returns how many kicks it wrote."""
    output = b""
    while chunk := await process.stdout.receive_some(64):
        output += chunk
    await process.wait()
    return int(output.decode().strip() or 0)


async def idle_cpu(daemon, window: float = IDLE_WINDOW) -> float:
    """The daemon's CPU use over ``window`` seconds, in cores."""
    c0, t0 = daemon.cpu_seconds(), time.monotonic()
    await trio.sleep(window)
    return (daemon.cpu_seconds() - c0) / (time.monotonic() - t0)


async def scenario(args, checks: Checks) -> None:
    balloon = (args.ram // 4) & ~(MiB - 1)
    with scratch_dir() as sock_dir:
        async with daemon_process(sock_dir, "--state-dir", "none") as daemon:
            ram = GuestRAM(args.ram)
            try:
                ram.touch()
                async with guest_on(daemon.socket_path, ram) as guest:
                    driver, frontend = guest.driver, guest.frontend
                    kick_fds = [frontend.kick_fd(vq.index) for vq in driver.queues]
                    control = await ControlClient.connect(daemon.control_path)
                    try:
                        checks.did(f"daemon pid {daemon.pid}; {len(kick_fds)} queues' kick eventfds flooded "
                                   f"by a separate process for {args.seconds} s, twice")

                        # -- 1: flood while inflating ----------------------------------------
                        latencies: list[float] = []
                        cpu0, t0 = daemon.cpu_seconds(), time.monotonic()
                        flooder = await flood(kick_fds, args.seconds)
                        reply = await control.execute("balloon", value=args.ram - balloon)
                        # The probe stops between two requests, never inside one: a GET_CONFIG
                        # cancelled after it was sent would leave its reply for the next
                        # request on the socket.
                        stop = trio.Event()
                        async with trio.open_nursery() as nursery:

                            async def probe() -> None:
                                while not stop.is_set():
                                    s = time.monotonic()
                                    await frontend.get_config()
                                    latencies.append(time.monotonic() - s)
                                    await trio.sleep(0.005)

                            nursery.start_soon(probe)
                            reached = await driver.wait_for_target(pages(balloon), timeout=60)
                            reached_after = time.monotonic() - t0
                            kicks = await flood_result(flooder)
                            stop.set()
                        cpu = (daemon.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                        checks.did(f"flood 1: {kicks} kicks in {args.seconds} s while inflating "
                                   f"{balloon // MiB} MiB ({reply})")
                        checks.check("flood 1: the flood was a flood", kicks >= args.min_kicks,
                                     f"{kicks} kicks (at least {args.min_kicks})")
                        checks.check("flood 1: the guest reached its target during the flood",
                                     reached == pages(balloon) and reached_after < args.seconds + 30,
                                     f"after {reached_after:.2f} s")
                        # p95, not p99: with ~100 samples p99 is the single worst
                        # one, and one scheduler hiccup on a loaded 2-core machine
                        # (seen: 75 ms once in CI) is not the daemon starving.
                        checks.check(f"flood 1: GET_CONFIG p95 < {ms(args.bound_ms / 1000)} during the flood",
                                     latencies and percentile(latencies, 0.95) < args.bound_ms / 1000,
                                     f"{len(latencies)} samples, p95 {ms(percentile(latencies, 0.95))}, "
                                     f"p99 {ms(percentile(latencies, 0.99))}, "
                                     f"max {ms(max(latencies))}" if latencies else "no samples")
                        checks.check("flood 1: daemon CPU within one core", cpu <= FLOOD_CPU_MAX,
                                     f"{cpu:.2f} cores ({cpu / max(kicks, 1) * args.seconds * 1e6:.2f} us per kick)")
                        idle = await idle_cpu(daemon)
                        checks.check("flood 1: daemon idle once the flood stopped", idle <= IDLE_CPU_MAX,
                                     f"{idle:.3f} cores over {IDLE_WINDOW} s")
                        served = [fd for fd, vq in zip(kick_fds, driver.queues) if vq.index in (0, 1)]
                        left = {fd: eventfd_count(fd) for fd in served}
                        checks.check("flood 1: the served queues' kick counters were drained",
                                     not any(left.values()), f"counters {list(left.values())}")

                        # -- 2: re-kicks with no new buffers ---------------------------------------
                        # The stats queue is left out: the back-end returns its buffer on a
                        # timer of its own (stats interval), kicks or not.
                        quiet = [vq for vq, role in zip(driver.queues, driver.roles) if role.value != "stats"]
                        used_before = [vq.used_idx() for vq in quiet]
                        calls_before = [eventfd_count(frontend.call_fd(vq.index)) for vq in quiet]
                        cpu0, t0 = daemon.cpu_seconds(), time.monotonic()
                        kicks = await flood_result(await flood(kick_fds, args.seconds))
                        cpu = (daemon.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                        used_after = [vq.used_idx() for vq in quiet]
                        calls_after = [eventfd_count(frontend.call_fd(vq.index)) for vq in quiet]
                        checks.did(f"flood 2: {kicks} re-kicks with no new buffers "
                                   f"(watching queues {[vq.index for vq in quiet]})")
                        checks.check("flood 2: no used entry appeared", used_after == used_before,
                                     f"used idx {used_before} -> {used_after}")
                        checks.check("flood 2: no interrupt was sent", calls_after == calls_before,
                                     f"call counters {calls_before} -> {calls_after}")
                        checks.check("flood 2: daemon CPU within one core", cpu <= FLOOD_CPU_MAX, f"{cpu:.2f} cores")
                        idle = await idle_cpu(daemon)
                        checks.check("flood 2: daemon idle once the flood stopped", idle <= IDLE_CPU_MAX,
                                     f"{idle:.3f} cores over {IDLE_WINDOW} s")

                        # -- afterwards: business as usual --------------------------------------------
                        info = (await control.execute("query-balloon"))["return"]
                        checks.check("afterwards: no queue is broken, the guest is still connected",
                                     info["broken-queues"] == {} and info["connected"], str(info["broken-queues"]))
                        await control.execute("balloon", value=args.ram)
                        try:
                            await driver.wait_for_target(0, timeout=20)
                        except trio.TooSlowError:
                            info = (await control.execute("query-balloon"))["return"]
                            raise AssertionError(
                                f"deflate did not happen: driver actual {driver.actual_pages} target {driver.target_pages} "
                                f"idle {driver.idle} config changes {driver.config_changes}; front-end got "
                                f"{frontend.config_change_msgs} CONFIG_CHANGE_MSGs (error {frontend.backend_channel_error}); "
                                f"back-end num-pages {info['num-pages']} actual-pages {info['actual-pages']}"
                            ) from None
                        damaged = ram.check_canary()
                        checks.check("afterwards: deflated back, every page intact", damaged == [],
                                     f"{len(damaged)} damaged")
                        await frontend.stop()
                    finally:
                        await control.aclose()
            finally:
                ram.close()
            bad = [e for e in daemon.log_entries() if e.get("level") in ("error", "critical", "unparsed")]
            checks.check("the daemon logged no error", not bad, str(bad[:2]))


def main(argv: list[str] | None = None) -> int:
    return run_script("kick_flood: kick eventfds written in a tight loop", scenario, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
