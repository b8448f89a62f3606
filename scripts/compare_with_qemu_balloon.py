#!/usr/bin/env python3
"""Side by side: QEMU's own virtio-balloon and vhostballoon, same guest, same scenario.

    .venv/bin/python scripts/compare_with_qemu_balloon.py [--runs 3] [--json FILE]
        [--memory 1024] [--fill 800] [--target 512] [--workdir DIR]

Each run boots the test guest (1 GiB, memfd share=on, TCG) twice, one QEMU at
a time: once with ``-device virtio-balloon-pci`` driven by QMP ``balloon`` /
``query-balloon``, once with ``vhost-user-test-device-pci`` and the
vhostballoon daemon (its own process) driven through its control socket.
Scenario, identical for both:

1. boot; ``fill 800`` then ``unfill`` in the guest, so the host backs ~800 MiB
   of guest RAM that the guest no longer uses;
2. record the host's allocated bytes (the memfd's ``st_blocks * 512``);
3. ``balloon`` to 512 MiB and time from the command until ``actual`` equals
   the target (polled every 50 ms on one open connection);
4. host memory freed = allocated before - allocated when the target is
   reached (and again 1 s later, for anything freed lazily);
5. ``balloon`` back to 1 GiB and time the deflate the same way.

Free page reporting is off on both devices (QEMU's ``free-page-reporting=off``,
vhostballoon's ``--features=-reporting``), so the figures compare the balloon
alone: with reporting on, the unfilled 800 MiB would be given back before
the balloon starts. The table shows the medians
of the runs that succeeded; ratio = vhostballoon / qemu. A failed run is
reported and the next one goes on. Exit status 0 when both columns have at
least one successful run, 1 otherwise.

These are TCG figures on a shared 2-core machine: other QEMUs running at the
same time slow both columns (the load average is printed with each run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import trio

from vhostballoon.ctl import ControlClient
from vhostballoon.testing.qemu import (
    QemuGuest,
    balloon_builtin_args,
    balloon_vhost_user_args,
    provisioning_problem,
)

MiB = 1 << 20
POLL = 0.05
VARIANTS = ("qemu", "vhostballoon")
TITLES = {"qemu": "qemu virtio-balloon", "vhostballoon": "vhostballoon"}

# (key, label, unit scale, format, kind): kind "time" gets a ratio.
FIGURES = [
    ("allocated_before", "host allocated before (MiB)", MiB, "{:.0f}", "size"),
    ("inflate_s", "inflate {mem}->{target} MiB (s)", 1, "{:.2f}", "time"),
    ("freed_at_target", "host freed at target (MiB)", MiB, "{:.0f}", "size"),
    ("freed_settled", "host freed 1 s later (MiB)", MiB, "{:.0f}", "size"),
    ("deflate_s", "deflate {target}->{mem} MiB (s)", 1, "{:.2f}", "time"),
]


class RunFailed(Exception):
    pass


# -- the two ways to drive the balloon ------------------------------------------------


class QmpBalloon:
    """QEMU's own balloon, over one open QMP connection."""

    def __init__(self, session) -> None:
        self.session = session

    async def set_target(self, value: int) -> None:
        await self.session.execute("balloon", value=value)

    async def actual(self) -> int | None:
        return (await self.session.execute("query-balloon"))["actual"]


class ControlBalloon:
    """vhostballoon, over one open control-socket connection."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client

    async def set_target(self, value: int) -> None:
        await trio.to_thread.run_sync(lambda: self.client.execute("balloon", value=value))

    async def actual(self) -> int | None:
        return (await trio.to_thread.run_sync(lambda: self.client.execute("query-balloon")))["actual"]


class Daemon:
    """The vhostballoon daemon as its own process."""

    def __init__(self, workdir: Path) -> None:
        self.socket_path = str(workdir / "vb.sock")
        self.control_path = self.socket_path + ".ctl"
        self.log_path = workdir / "backend.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "vhostballoon", "--socket-path", self.socket_path, "--state-dir", "none",
                 "--features=-reporting"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"the back-end did not start: {self.log_path.read_text(errors='replace')[-1000:]}")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.control_path)
                return
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- one run of the scenario ------------------------------------------------------------


async def wait_actual(balloon, target: int, timeout: float) -> float:
    """Poll ``actual`` every 50 ms; the monotonic time it was first seen at target."""
    last = None
    with trio.move_on_after(timeout):
        while True:
            last = await balloon.actual()
            if last == target:
                return time.monotonic()
            await trio.sleep(POLL)
    raise RunFailed(f"actual did not reach {target // MiB} MiB within {timeout:g} s (last: {last})")


async def scenario(guest: QemuGuest, balloon, args) -> dict:
    mem, target = args.memory * MiB, args.target * MiB
    result = await guest.run(f"fill {args.fill}", timeout=180)
    if result.rc != 0:
        raise RunFailed(f"fill {args.fill} failed in the guest (rc {result.rc}): {result.lines}")
    await guest.run("unfill", timeout=60)
    await wait_actual(balloon, mem, 30)  # the device is up and the balloon empty
    before = guest.host_allocated()
    others = other_qemus(guest.process.pid)

    t0 = time.monotonic()
    await balloon.set_target(target)
    t1 = await wait_actual(balloon, target, args.timeout)
    at_target = guest.host_allocated()
    await trio.sleep(1.0)
    settled = guest.host_allocated()

    t2 = time.monotonic()
    await balloon.set_target(mem)
    t3 = await wait_actual(balloon, mem, args.timeout)
    return {
        "allocated_before": before,
        "inflate_s": t1 - t0,
        "freed_at_target": before - at_target,
        "freed_settled": before - settled,
        "deflate_s": t3 - t2,
        "allocated_after_deflate": guest.host_allocated(),
        "other_qemus": max(others, other_qemus(guest.process.pid)),
        "load": os.getloadavg()[0],
    }


async def run_qemu(workdir: Path, args) -> dict:
    guest = await QemuGuest.start(
        workdir, balloon_builtin_args(free_page_reporting=False), memory_mib=args.memory
    )
    try:
        async with guest.qmp_session() as session:
            return await scenario(guest, QmpBalloon(session), args)
    finally:
        await guest.kill()


async def run_vhostballoon(workdir: Path, args) -> dict:
    daemon = Daemon(workdir)
    daemon.start()
    try:
        guest = await QemuGuest.start(workdir, balloon_vhost_user_args(daemon.socket_path), memory_mib=args.memory)
        try:
            client = ControlClient(daemon.control_path)
            try:
                return await scenario(guest, ControlBalloon(client), args)
            finally:
                client.close()
        finally:
            await guest.kill()
    finally:
        daemon.stop()


RUNNERS = {"qemu": run_qemu, "vhostballoon": run_vhostballoon}


def other_qemus(own: int) -> int:
    """QEMU processes on this machine besides ours (they skew the timings)."""
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != own:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    count += f.read().strip().startswith("qemu-system")
            except OSError:
                pass
    return count


# -- output ------------------------------------------------------------------------------


def fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    _, _, scale, form, _ = next(f for f in FIGURES if f[0] == key)
    return form.format(value / scale)


def medians(runs: list[dict], variant: str) -> dict:
    ok = [r[variant] for r in runs if "error" not in r[variant]]
    if not ok:
        return {}
    return {key: statistics.median(r[key] for r in ok) for key, *_ in FIGURES}


def print_table(runs: list[dict], args) -> None:
    med = {v: medians(runs, v) for v in VARIANTS}
    counts = {v: sum("error" not in r[v] for r in runs) for v in VARIANTS}
    label_w = 34
    heads = [f"{TITLES[v]} (n={counts[v]})" for v in VARIANTS]
    print()
    print(f"Medians of {len(runs)} run(s); {args.memory} MiB guest, fill {args.fill} MiB, target {args.target} MiB")
    print(f"{'':<{label_w}}  {heads[0]:>26}  {heads[1]:>22}  {'ratio vb/qemu':>13}")
    for key, label, scale, _form, kind in FIGURES:
        q, v = med["qemu"].get(key), med["vhostballoon"].get(key)
        ratio = "-"
        if q is not None and v is not None and q:
            ratio = f"{v / q:.2f}"
        name = label.format(mem=args.memory, target=args.target)
        print(f"{name:<{label_w}}  {fmt(key, q):>26}  {fmt(key, v):>22}  {ratio:>13}")
    print()
    print("Each run:")
    for i, run in enumerate(runs, 1):
        for variant in VARIANTS:
            r = run[variant]
            head = f"  run {i} {TITLES[variant]:<20}"
            if "error" in r:
                print(f"{head} FAILED: {r['error']}")
                continue
            figures = "  ".join(
                f"{key}={fmt(key, r[key])}" for key, *_ in FIGURES
            )
            print(f"{head} {figures}  (load {r['load']:.2f}, other QEMUs {r['other_qemus']})")


async def main_async(args) -> int:
    workroot = Path(args.workdir or tempfile.mkdtemp(prefix="vb-compare-"))
    workroot.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    for i in range(1, args.runs + 1):
        run: dict = {}
        for variant in VARIANTS:
            workdir = workroot / f"run{i}-{variant}"
            workdir.mkdir(exist_ok=True)
            print(f"run {i}/{args.runs}: {TITLES[variant]} ...", end=" ", flush=True)
            started = time.monotonic()
            try:
                with trio.fail_after(args.timeout * 2 + 300):
                    figures = await RUNNERS[variant](workdir, args)
                print(
                    f"inflate {figures['inflate_s']:.2f} s, freed {figures['freed_at_target'] / MiB:.0f} MiB, "
                    f"deflate {figures['deflate_s']:.2f} s ({time.monotonic() - started:.0f} s)"
                )
            except Exception as exc:  # report, go on with the next run
                figures = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                print(f"FAILED after {time.monotonic() - started:.0f} s: {figures['error']} (logs in {workdir})")
                if args.verbose:
                    traceback.print_exc()
            run[variant] = figures
        runs.append(run)

    print_table(runs, args)
    both = all(any("error" not in r[v] for r in runs) for v in VARIANTS)
    failed = sum("error" in r[v] for r in runs for v in VARIANTS)
    if failed:
        print(f"\n{failed} of {2 * len(runs)} scenario runs FAILED (see above); medians use the others.")
    if not both:
        print("\nNo comparison: one of the columns has no successful run.")
    if args.json:
        out = {
            "params": {k: getattr(args, k) for k in ("runs", "memory", "fill", "target")},
            "medians": {v: medians(runs, v) for v in VARIANTS},
            "runs": runs,
            "workdir": str(workroot) if failed or args.workdir else None,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"JSON: {args.json}")
    if failed or args.workdir:
        print(f"Logs and consoles: {workroot}")
    else:
        shutil.rmtree(workroot, ignore_errors=True)
    return 0 if both else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    parser.add_argument("--fill", type=int, default=800, help="MiB the guest writes then frees first (default 800)")
    parser.add_argument("--target", type=int, default=512, help="balloon target in MiB (default 512)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a target (default 120)")
    parser.add_argument("--workdir", help="where logs and consoles go (default: a new temporary directory)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failed runs")
    args = parser.parse_args()
    problem = provisioning_problem()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 1
    return trio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
