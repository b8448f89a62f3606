#!/usr/bin/env python3
"""Side by side: QEMU's own virtio-balloon, the stock driver on vhostballoon,
and this project's range driver on vhostballoon; same guest, same scenario.

    .venv/bin/python scripts/compare_with_qemu_balloon.py [--runs 3] [--json FILE]
        [--variants qemu,stock,ranges] [--guest fresh|fragmented]
        [--backing memfd|thp|hugetlbfs] [--memory 1024] [--fill 800] [--target 512]

Each run boots the test guest (1 GiB, TCG) once per variant, one QEMU at a time:

- ``qemu``: ``-device virtio-balloon-pci`` with the guest's stock
  ``virtio_balloon`` driver, driven by QMP ``balloon`` / ``query-balloon``;
- ``stock`` (also ``vhostballoon``): ``vhost-user-test-device-pci`` and the
  vhostballoon daemon (its own process), the stock driver;
- ``ranges``: the same with ``guest/linux/vhostballoon_guest.ko`` (built here
  against the rig's guest kernel headers, carried in a second initramfs
  archive), which balloons by address/length ranges, 2 MiB blocks first
  (``protocol/range-balloon.md``); ``num_vqs=7``.

The guest before the balloon: ``fresh`` writes ``--fill`` MiB into a tmpfs and
removes it (its free memory is in large blocks); ``fragmented`` writes two
tmpfs files of ``--fill``/2 MiB each, alternately in 4 KiB pieces (busybox
``awk``), then removes one, so that its free memory is scattered 4 KiB pages.

Guest RAM (``--backing``): ``memfd`` (QEMU's memory-backend-memfd), ``thp``
(a memfd created here, shmem THP on ``advise``, mapped 2 MiB-aligned: the
guest's memory is transparent huge pages), ``hugetlbfs`` (memfd
``hugetlb=on``; ``nr_hugepages`` reserved for the run and restored).

Per run: inflate time to the target; host memory freed (the memfd's
allocated blocks) at the target and 1 s later; THP splits on the host
(``thp_split_page``, machine-wide); huge pages back in ``HugePages_Free``;
in the guest, ``compact_stall`` during the inflate and its free blocks of
order 9 and above (``/proc/buddyinfo``) before and after; the deflate time.
Free page reporting is off on every device, so the figures compare the
balloon alone.  The table shows medians of the runs that succeeded; ratio =
variant / qemu.  A failed run is reported and the next one goes on.  Exit 0
when every variant has at least one successful run.

TCG figures on a shared 2-core machine: other QEMUs running at the same time
slow every column (the load average is printed with each run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

import trio

from vhostballoon.ctl import ControlClient
from vhostballoon.testing.host import THP_SYSFS, HugePagesUnavailable, reserved_huge_pages, shmem_thp, smaps_total, sysfs_choice, vmstat
from vhostballoon.testing.qemu import (
    GUEST_DIR,
    QemuGuest,
    balloon_builtin_args,
    balloon_vhost_user_args,
    build_guest_module,
    guest_initrd_with_modules,
    provisioning_problem,
)

REPO = Path(__file__).resolve().parents[1]
MODULE = "vhostballoon_guest"
ADD_MODULES = REPO.parent / "shared" / "e2e" / "add-guest-modules.sh"

MiB = 1 << 20
POLL = 0.05
VARIANTS = ("qemu", "stock", "ranges")
TITLES = {"qemu": "qemu virtio-balloon", "stock": "stock driver + vb", "ranges": "range driver + vb"}

# (key, label, unit scale, format, kind): kind "time" gets a ratio.
FIGURES = [
    ("allocated_before", "host allocated before (MiB)", MiB, "{:.0f}", "size"),
    ("thp_backed_before", "of which THP-mapped (MiB)", MiB, "{:.0f}", "size"),
    ("inflate_s", "inflate {mem}->{target} MiB (s)", 1, "{:.2f}", "time"),
    ("freed_at_target", "host freed at target (MiB)", MiB, "{:.0f}", "size"),
    ("freed_settled", "host freed 1 s later (MiB)", MiB, "{:.0f}", "size"),
    ("thp_splits", "host THP splits", 1, "{:.0f}", "count"),
    ("hugepages_back", "huge pages back (HugePages_Free)", 1, "{:.0f}", "count"),
    ("guest_compact_stall", "guest compact_stall in inflate", 1, "{:.0f}", "count"),
    ("guest_order9_before", "guest free order>=9 blocks before", 1, "{:.0f}", "count"),
    ("guest_order9_after", "guest free order>=9 blocks after", 1, "{:.0f}", "count"),
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


def fragment_command(total_mib: int) -> str:
    """Busybox awk writing two tmpfs files alternately, 4 KiB per record, so
    their pages interleave in the guest's memory."""
    records = total_mib * 256 // 2
    return ("sh awk 'BEGIN{s=sprintf(\"%4095s\",\"x\"); for(i=0;i<" + str(records)
            + ";i++){print s > \"/fill/a\"; print s > \"/fill/b\"}}'")


async def guest_figures(guest: QemuGuest) -> tuple[int, int]:
    """(compact_stall, free blocks of order >= 9) in the guest now."""
    stall = 0
    for line in (await guest.run("vmstat")).lines:
        for name, value in re.findall(r"(compact_stall) (\d+)", line):
            stall = int(value)
    blocks = 0
    for line in (await guest.run("sh cat /proc/buddyinfo")).lines:
        fields = line.split()
        if "zone" in fields:
            counts = [int(x) for x in fields[fields.index("zone") + 2:]]
            blocks += sum(counts[9:])
    return stall, blocks


def hugepages_free() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


async def prepare_guest(guest: QemuGuest, args) -> None:
    if args.guest == "fresh":
        result = await guest.run(f"fill {args.fill}", timeout=180)
        if result.rc != 0:
            raise RunFailed(f"fill {args.fill} failed in the guest (rc {result.rc}): {result.lines}")
        await guest.run("unfill", timeout=60)
    else:
        result = await guest.run(fragment_command(args.fill), timeout=600)
        if result.rc != 0:
            raise RunFailed(f"fragmenting failed in the guest (rc {result.rc}): {result.lines[-5:]}")
        await guest.run("sh rm -f /fill/a; sync; echo 3 > /proc/sys/vm/drop_caches", timeout=60)


async def scenario(guest: QemuGuest, balloon, args) -> dict:
    mem, target = args.memory * MiB, args.target * MiB
    await prepare_guest(guest, args)
    await wait_actual(balloon, mem, 30)  # the device is up and the balloon empty
    stall0, order9_before = await guest_figures(guest)
    before = guest.host_allocated()
    thp_backed = smaps_total(guest.process.pid, "vb-compare-ram", "ShmemPmdMapped")
    if args.backing == "thp" and thp_backed < before // 2:
        raise RunFailed(f"guest RAM should be THP-backed but only {thp_backed // MiB} MiB are PMD-mapped "
                        f"(shmem_enabled: {sysfs_choice(os.path.join(THP_SYSFS, 'shmem_enabled'))}; "
                        "another process changed it?)")
    others = other_qemus(guest.process.pid)
    splits0, huge0 = vmstat("thp_split_page"), hugepages_free()

    t0 = time.monotonic()
    await balloon.set_target(target)
    t1 = await wait_actual(balloon, target, args.timeout)
    at_target = guest.host_allocated()
    await trio.sleep(1.0)
    settled = guest.host_allocated()
    splits, huge_back = vmstat("thp_split_page") - splits0, hugepages_free() - huge0
    stall1, order9_after = await guest_figures(guest)

    t2 = time.monotonic()
    await balloon.set_target(mem)
    t3 = await wait_actual(balloon, mem, args.timeout)
    return {
        "allocated_before": before,
        "thp_backed_before": thp_backed,
        "inflate_s": t1 - t0,
        "freed_at_target": before - at_target,
        "freed_settled": before - settled,
        "thp_splits": splits,
        "hugepages_back": huge_back,
        "guest_compact_stall": stall1 - stall0,
        "guest_order9_before": order9_before,
        "guest_order9_after": order9_after,
        "deflate_s": t3 - t2,
        "allocated_after_deflate": guest.host_allocated(),
        "other_qemus": max(others, other_qemus(guest.process.pid)),
        "load": os.getloadavg()[0],
    }


class Backing:
    """Guest RAM for one run (--backing): QEMU's memfd, a THP-backed memfd of
    ours, or hugetlbfs; machine settings changed for it are restored."""

    def __init__(self, kind: str, memory_mib: int) -> None:
        self.kind, self.memory_mib = kind, memory_mib
        self.fd: int | None = None
        self._stack = ExitStack()

    def __enter__(self) -> dict:
        if self.kind == "thp":
            self._stack.enter_context(shmem_thp("advise"))
            self.fd = os.memfd_create("vb-compare-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.memory_mib * MiB)
            return {"ram_fd": self.fd}
        if self.kind == "hugetlbfs":
            try:
                self._stack.enter_context(reserved_huge_pages(self.memory_mib // 2 + 8))
            except HugePagesUnavailable as exc:
                raise RunFailed(str(exc)) from None
            return {"ram_options": "hugetlb=on,hugetlbsize=2M"}
        return {}

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self._stack.close()


_MODULE_INITRD: Path | None = None


def module_initrd(workroot: Path) -> Path:
    """The guest's initramfs carrying vhostballoon_guest.ko, built once."""
    global _MODULE_INITRD
    if _MODULE_INITRD is None:
        out = workroot / "module"
        out.mkdir(exist_ok=True)
        ko, why = build_guest_module(REPO / "guest" / "linux", GUEST_DIR, out)
        if ko is None:
            raise RunFailed(f"cannot build {MODULE}.ko: {why}")
        _MODULE_INITRD = guest_initrd_with_modules(out / "initramfs.gz", [ko], GUEST_DIR, ADD_MODULES)
    return _MODULE_INITRD


async def run_variant(variant: str, workdir: Path, args) -> dict:
    with Backing(args.backing, args.memory) as ram:
        if variant == "qemu":
            guest = await QemuGuest.start(workdir, balloon_builtin_args(free_page_reporting=False),
                                          memory_mib=args.memory, **ram)
            try:
                async with guest.qmp_session() as session:
                    return await scenario(guest, QmpBalloon(session), args)
            finally:
                await guest.kill()
        daemon = Daemon(workdir)
        daemon.start()
        try:
            if variant == "ranges":
                options = dict(initrd=module_initrd(workdir.parent), append=f"vb.balloon={MODULE}")
                device = balloon_vhost_user_args(daemon.socket_path, num_vqs=7)
            else:
                options, device = {}, balloon_vhost_user_args(daemon.socket_path)
            guest = await QemuGuest.start(workdir, device, memory_mib=args.memory, **ram, **options)
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
    variants = args.variants
    med = {v: medians(runs, v) for v in variants}
    counts = {v: sum("error" not in r[v] for r in runs) for v in variants}
    label_w = 36
    heads = [f"{TITLES[v]} (n={counts[v]})" for v in variants]
    widths = [max(len(h), 10) for h in heads]
    others = [v for v in variants if v != "qemu"]
    print()
    print(f"Medians of {len(runs)} run(s); {args.memory} MiB guest ({args.guest}, fill {args.fill} MiB, "
          f"RAM {args.backing}), target {args.target} MiB")
    ratio_heads = [f"{v}/qemu" for v in others] if "qemu" in variants else []
    print(f"{'':<{label_w}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
          + "".join(f"  {h:>12}" for h in ratio_heads))
    for key, label, _scale, _form, kind in FIGURES:
        name = label.format(mem=args.memory, target=args.target)
        cells = [fmt(key, med[v].get(key)) for v in variants]
        ratios = []
        for v in others if ratio_heads else ():
            q, x = med["qemu"].get(key), med[v].get(key)
            ratios.append(f"{x / q:.2f}" if kind == "time" and q and x is not None else "-")
        print(f"{name:<{label_w}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
              + "".join(f"  {r:>12}" for r in ratios))
    print()
    print("Each run:")
    for i, run in enumerate(runs, 1):
        for variant in variants:
            r = run[variant]
            head = f"  run {i} {TITLES[variant]:<20}"
            if "error" in r:
                print(f"{head} FAILED: {r['error']}")
                continue
            figures = "  ".join(f"{key}={fmt(key, r[key])}" for key, *_ in FIGURES)
            print(f"{head} {figures}  (load {r['load']:.2f}, other QEMUs {r['other_qemus']})")


async def main_async(args) -> int:
    workroot = Path(args.workdir or tempfile.mkdtemp(prefix="vb-compare-"))
    workroot.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    for i in range(1, args.runs + 1):
        run: dict = {}
        for variant in args.variants:
            workdir = workroot / f"run{i}-{variant}"
            workdir.mkdir(exist_ok=True)
            print(f"run {i}/{args.runs}: {TITLES[variant]} ...", end=" ", flush=True)
            started = time.monotonic()
            try:
                with trio.fail_after(args.timeout * 2 + 300):
                    figures = await run_variant(variant, workdir, args)
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
    both = all(any("error" not in r[v] for r in runs) for v in args.variants)
    failed = sum("error" in r[v] for r in runs for v in args.variants)
    if failed:
        print(f"\n{failed} of {len(args.variants) * len(runs)} scenario runs FAILED (see above); medians use the others.")
    if not both:
        print("\nNo comparison: one of the columns has no successful run.")
    if args.json:
        out = {
            "params": {k: getattr(args, k) for k in ("runs", "memory", "fill", "target", "guest", "backing", "variants")},
            "medians": {v: medians(runs, v) for v in args.variants},
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
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma list of qemu, stock (alias vhostballoon), ranges (default: all three)")
    parser.add_argument("--guest", choices=("fresh", "fragmented"), default="fresh",
                        help="the guest's free memory before the balloon: in large blocks, or scattered (default fresh)")
    parser.add_argument("--backing", choices=("memfd", "thp", "hugetlbfs"), default="memfd",
                        help="guest RAM: QEMU's memfd, a THP-backed memfd, or hugetlbfs (default memfd)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    parser.add_argument("--fill", type=int, default=800, help="MiB the guest writes then frees first (default 800)")
    parser.add_argument("--target", type=int, default=512, help="balloon target in MiB (default 512)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a target (default 120)")
    parser.add_argument("--workdir", help="where logs and consoles go (default: a new temporary directory)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failed runs")
    args = parser.parse_args()
    aliases = {"vhostballoon": "stock"}
    args.variants = [aliases.get(v.strip(), v.strip()) for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants {unknown or 'empty'}: choose from {', '.join(VARIANTS)}")
    problem = provisioning_problem()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 1
    return trio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
