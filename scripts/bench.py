#!/usr/bin/env python3
"""The back-end beside the kernel's limit and the per-page approach, on one table.

    .venv/bin/python scripts/bench.py [--size 1G] [--runs 3] [--json FILE]
        [--only NAME ...] [--profile DIR] [--py-spy PATH]

Each run of a scenario starts a fresh back-end in its own process
(``python -m vhostballoon --socket-path ... --log-level warning``) and boots
the testing front-end and model guest against it over the real socket and
rings, on a memfd of ``--size`` whose every guest page is written. One
``balloon`` command on the control socket then asks for ALL guest pages
(target = the 2 MiB the model guest reserves for its rings) or HALF of guest
RAM, and the guest gives them in Linux's order (descending runs, two 2 MiB
blocks interleaved) or in random order, with shmem THP off
(``shmem_enabled=never``) or on (``advise``, the PMD size's knob on
``inherit``, guest RAM madvised as QEMU does). The sysfs switch lasts only
while guest RAM is touched and handed to the back-end (which reads sysfs
then) and is restored in ``finally``.

Measured per run, command -> guest at target and the host's memory freed:

- wall: from the command until the guest driver is idle at the target and
  the memfd's st_blocks show every ballooned byte freed (for THP + random
  order, pending partial huge pages are freed when the guest reaches the
  target: that flush counts);
- back-end CPU: the back-end process's CPU clock (all threads, ns;
  ``clock_gettime`` of its CPU-time clock id), with the user/sys split from
  ``/proc/<pid>/stat`` (clock ticks);
- host bytes freed (memfd ``st_blocks``), discard syscalls and THP splits
  (``query-balloon``), the guest's per-buffer round trip (kick -> used seen,
  ``BalloonDriver.inflate_rtt_ns``), the back-end's peak RSS (VmHWM);
- model guest CPU: this process's own CPU time over the same interval (the
  front-end and driver; the baselines run outside it).

Then, on the very PFNs the guest ballooned and on a fresh touched memfd of
the same size and THP state, in this process:

- per-page: ``GuestMemory.discard_ranges`` with one 4 KiB range per PFN in
  the guest's order (QEMU's one fallocate per page);
- whole: the same PFNs sorted and coalesced, one fallocate per contiguous
  range (ALL and HALF in Linux order: one call over everything; the
  kernel's limit for those pages).

Two more scenarios measure GET_CONFIG latency (the guest's vCPU waits on it)
from a second task issuing one every 2 ms through the front-end:
``getconfig-balloon`` during a 1 GiB balloon-all (Linux order, no THP), and
``getconfig-flush`` during one large discard: THP on, random order, half of
RAM ballooned under ``--huge-policy whole`` (so nearly all of it is pending in
partial huge pages), then ``set-huge-policy auto`` frees it all in one flush.
Their other figures include the prober's load, so they stand apart.

The table shows medians over ``--runs``; a failing run prints FAILED and the
reason, and the script goes on. Exit status 0 unless an argument is wrong.
``--profile DIR`` runs the back-end under py-spy (``--native``) and writes
one collapsed-stack file per run plus a summary: its timings are perturbed
by the sampling and are not goals material.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from vhostballoon.device.hugepages import THP_SYSFS, pmd_size, sysfs_choice
from vhostballoon.native import PAGE_SHIFT, PAGE_SIZE, GuestMemory, RangeList
from vhostballoon.sizes import parse_size
from vhostballoon.testing import RANGE_FEATURES, GuestRAM, model_guest
from vhostballoon.testing.guest_ram import DEFAULT_UADDR

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
GETCONFIG_INTERVAL = 0.002  # seconds between the prober's GET_CONFIGs
SETTLE_POLL = 0.01  # seconds between query-balloon polls while waiting for the host to be freed
SETTLE_TIMEOUT = 30.0
BACKEND_START_TIMEOUT = 15.0


# ---- the back-end process ------------------------------------------------------


def process_cpu_clock(pid: int) -> int:
    """The CPU-time clock id of another process: every thread, live or gone
    (Linux MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED), include/linux/posix-timers.h)."""
    return ((~pid) << 3) | 2


def proc_stat_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of the whole thread group, in clock ticks (proc(5))."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """CPU time in ns per thread name (/proc/PID/task/TID/schedstat, whose
    first field is the time on CPU).  The C threads are named vb-front,
    vb-inflate, vb-deflate; the event loop has the process's own name;
    trio's worker threads are summed under theirs."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
        out[name] = out.get(name, 0) + ns
    return out


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class BackendProcess:
    """``python -m vhostballoon`` in its own process (optionally under py-spy)."""

    def __init__(self, workdir: str, extra_args: list[str]) -> None:
        self.socket_path = os.path.join(workdir, "vb.sock")
        self.control_path = self.socket_path + ".ctl"
        self.log_path = os.path.join(workdir, "backend.log")
        # -P: not the current directory first on sys.path (see faults/_common.py: DAEMON)
        cmd = [
            sys.executable, "-P", "-m", "vhostballoon", "--socket-path", self.socket_path,
            "--state-dir", "none", "--log-level", "warning", *extra_args,
        ]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.profiler: subprocess.Popen | None = None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + BACKEND_START_TIMEOUT
        while not os.path.exists(self.control_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"back-end exited with status {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"back-end not listening after {BACKEND_START_TIMEOUT} s: {self.log_tail()}")
            time.sleep(0.02)

    async def start_profile(self, output: str, py_spy: str) -> None:
        """py-spy on the back-end for the measured interval only (not its start-up)."""
        self.profiler = subprocess.Popen(
            [py_spy, "record", "--pid", str(self.pid), "--native", "--threads", "--rate", "500",
             "--format", "raw", "--output", output],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        await trio.sleep(1.0)  # py-spy attaches and starts sampling

    def stop_profile(self) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait()
            self.profiler = None

    def cpu_ns(self) -> int:
        return time.clock_gettime_ns(process_cpu_clock(self.pid))

    def ticks(self) -> tuple[int, int]:
        return proc_stat_ticks(self.pid)

    def peak_rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmHWM")

    def log_tail(self, n: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def stop(self) -> None:
        self.stop_profile()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def control(path: str, command: str, **arguments: Any) -> dict:
    """One command on a fresh control connection (as vhostballoon-ctl does):
    no client stays subscribed to events while the balloon runs."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        await stream.send_all((json.dumps(request) + "\n").encode())
        buffer = b""
        while True:
            while b"\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError(f"control socket closed during {command}")
                buffer += data
            line, buffer = buffer.split(b"\n", 1)
            reply = json.loads(line)
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error'].get('desc')}")
            return reply["return"]


# ---- shmem THP ------------------------------------------------------------------


class ShmemThp:
    """shmem_enabled=advise (+ per-size inherit) for THP on, never for off;
    apply() only for a short window, restore() in finally (idempotent)."""

    def __init__(self, on: bool) -> None:
        top = os.path.join(THP_SYSFS, "shmem_enabled")
        per_size = os.path.join(THP_SYSFS, f"hugepages-{pmd_size() >> 10}kB", "shmem_enabled")
        self.wanted = [(top, "advise" if on else "never")]
        if on and os.path.exists(per_size):
            self.wanted.append((per_size, "inherit"))
        self.on = on
        self.saved: list[tuple[str, str]] = []

    def apply(self) -> None:
        for path, value in self.wanted:
            old = sysfs_choice(path)
            if old is None:
                if self.on:
                    raise RuntimeError(f"THP not available: cannot read {path}")
                continue  # no shmem THP at all: it is off
            self.saved.append((path, old))
            if old != value:
                with open(path, "w") as f:
                    f.write(value)

    def restore(self) -> None:
        while self.saved:
            path, old = self.saved.pop()
            if sysfs_choice(path) != old:
                with open(path, "w") as f:
                    f.write(old)

    def __enter__(self) -> ShmemThp:
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def pmd_mapped_bytes(name: str) -> int:
    """ShmemPmdMapped of this process's mappings of memfd ``name``: proof
    that guest RAM is (or is not) backed by THPs."""
    total = 0
    inside = False
    header = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
    with open("/proc/self/smaps") as f:
        for line in f:
            if header.match(line):
                inside = f"/memfd:{name} " in line + " "
            elif inside and line.startswith("ShmemPmdMapped:"):
                total += int(line.split()[1]) << 10
    return total


# ---- figures ----------------------------------------------------------------------


def percentile(values, q: float) -> float | None:
    data = sorted(values)
    if not data:
        return None
    k = (len(data) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def coalesce(pfns) -> list[tuple[int, int]]:
    """Sorted PFNs -> [(gpa, length)] of maximal contiguous runs."""
    ranges: list[tuple[int, int]] = []
    start = prev = None
    for pfn in sorted(set(pfns)):
        if prev is not None and pfn == prev + 1:
            prev = pfn
            continue
        if start is not None:
            ranges.append((start << PAGE_SHIFT, (prev - start + 1) << PAGE_SHIFT))
        start = prev = pfn
    if start is not None:
        ranges.append((start << PAGE_SHIFT, (prev - start + 1) << PAGE_SHIFT))
    return ranges


def per_page_ranges(pfns: array) -> RangeList:
    pairs = array("Q", bytes(16 * len(pfns)))
    pairs[0::2] = array("Q", [pfn << PAGE_SHIFT for pfn in pfns])
    pairs[1::2] = array("Q", [PAGE_SIZE]) * len(pfns)
    return RangeList.from_pairs(pairs)


def coalesced_ranges(pfns: array) -> RangeList:
    pairs = array("Q")
    for gpa, length in coalesce(pfns):
        pairs.append(gpa)
        pairs.append(length)
    return RangeList.from_pairs(pairs)


# Maps the memfd passed as fd argv[2] and writes one byte of every page (as
# the guest model writes its canary), so that its page tables map the whole
# file, dirty, then waits for its stdin to close.
_MAPPER = """
import mmap, os, sys
size = int(sys.argv[1])
m = mmap.mmap(int(sys.argv[2]), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
for off in range(0, size, 4096):
    m[off] = 0x5a
sys.stdout.write("mapped\\n")
sys.stdout.flush()
sys.stdin.read()
"""


def baseline(kind: str, pfns: array, size: int, thp: bool, *, foreign: bool = False) -> dict:
    """Free the same PFNs on a fresh touched memfd of the same size and THP
    state, per page or coalesced, in this thread; its CPU and wall time.

    foreign: as the back-end frees them, the file mapped (page tables
    filled) by another process and not by this one, so each call also zaps
    that process's page tables and flushes its TLB, as freeing a guest's
    memory does.  Otherwise the file is mapped and touched here only."""
    name = "vb-bench-baseline"
    with ShmemThp(thp):
        ram = GuestRAM(size, name=name, huge_pages=thp)
        try:
            ram.touch()
        except BaseException:
            ram.close()
            raise
    mapper = None
    if foreign:
        mapper = subprocess.Popen([sys.executable, "-c", _MAPPER, str(size), str(ram.fd)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, pass_fds=(ram.fd,))
        if mapper.stdout.readline() != b"mapped\n":
            raise RuntimeError("foreign baseline: the mapping process failed")
        ram.mem.madvise(mmap.MADV_DONTNEED)  # our own page tables go; the pages stay (shared)
    try:
        huge_backed = pmd_mapped_bytes(name)
        ranges = per_page_ranges(pfns) if kind == "per-page" else coalesced_ranges(pfns)
        mem = GuestMemory()
        try:
            mem.add_region(os.dup(ram.fd), 0, size, DEFAULT_UADDR, 0)
            if thp:  # so that the C core counts THP splits as it does for the back-end
                mem.configure_huge_pages(0, pmd_size(), "shmem", True)
            before = ram.allocated_bytes()
            wall0, cpu0 = time.perf_counter_ns(), time.thread_time_ns()
            stats = mem.discard_ranges(ranges)
            cpu1, wall1 = time.thread_time_ns(), time.perf_counter_ns()
            after = ram.allocated_bytes()
        finally:
            mem.close()
    finally:
        ram.close()
        if mapper is not None:
            mapper.stdin.close()
            mapper.wait()
    if stats.bytes_failed or stats.pages_outside:
        raise RuntimeError(f"{kind} baseline: {stats.bytes_failed} bytes failed (errno {stats.last_errno}), "
                           f"{stats.pages_outside} pages outside")
    return {
        "cpu_ms": (cpu1 - cpu0) / 1e6,
        "wall_ms": (wall1 - wall0) / 1e6,
        "syscalls": stats.syscalls,
        "freed_bytes": before - after,
        "splits": stats.splits,
        "thp_backed_bytes": huge_backed,
    }


# ---- scenarios -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    amount: str  # "all" | "half"
    order: str  # "linux" | "random" | "ranges" (the range guest: 2 MiB blocks first, protocol/range-balloon.md)
    thp: bool
    probe: str | None = None  # None | "balloon" | "flush"
    backend_args: tuple[str, ...] = ()

    @property
    def baselines(self) -> bool:
        return self.probe is None


SCENARIOS = [
    Scenario(f"{amount}-{order}-thp{'on' if thp else 'off'}", amount, order, thp)
    for thp in (False, True)
    for amount in ("all", "half")
    for order in ("linux", "random")
] + [
    Scenario(f"all-ranges-thp{'on' if thp else 'off'}", "all", "ranges", thp) for thp in (False, True)
] + [
    # The auto policy with a low flush threshold, which flushes mid-balloon
    # pages that would have completed (device/hugepages.py DEFAULT_FLUSH_BYTES).
    Scenario("all-random-thpon-flush64m", "all", "random", True, backend_args=("--flush-bytes", "64M")),
] + [
    Scenario("getconfig-balloon", "all", "linux", False, probe="balloon"),
    Scenario("getconfig-flush", "half", "random", True, probe="flush", backend_args=("--huge-policy", "whole")),
]


async def getconfig_prober(frontend, latencies: list[int], stop: trio.Event) -> None:
    """A guest vCPU reading config: one GET_CONFIG every GETCONFIG_INTERVAL.
    Stopped between requests, never cancelled in one: a reply left unread on
    the socket would be taken for the reply to the front-end's next request."""
    while not stop.is_set():
        start = time.perf_counter_ns()
        await frontend.get_config()
        latencies.append(time.perf_counter_ns() - start)
        with trio.move_on_after(GETCONFIG_INTERVAL):
            await stop.wait()


async def wait_host_freed(backend: BackendProcess, expected: int) -> tuple[bool, dict]:
    """Until nothing is pending in the back-end and its discards have freed
    every ballooned byte (the back-end is fresh: its counters start at 0);
    (settled, last query-balloon).  The back-end's own count, not the
    memfd's: the model guest writes a scratch page of its reserved area
    during the run, which st_blocks would count against the balloon."""
    with trio.move_on_after(SETTLE_TIMEOUT):
        while True:
            info = await control(backend.control_path, "query-balloon")
            if info.get("pending-bytes", 0) == 0 and info["discarded-bytes"] >= expected:
                return True, info
            await trio.sleep(SETTLE_POLL)
    return False, await control(backend.control_path, "query-balloon")


async def balloon_run(sc: Scenario, size: int, run: int, workdir: str, profile_to: str | None,
                      py_spy: str | None) -> dict:
    backend = BackendProcess(workdir, list(sc.backend_args))
    result: dict[str, Any] = {"loadavg": os.getloadavg()[0]}
    try:
        backend.wait_ready()
        thp = ShmemThp(sc.thp)
        thp.apply()
        try:
            guest_args = (dict(features=RANGE_FEATURES, num_vqs=7) if sc.order == "ranges"
                          else dict(order=sc.order))
            async with model_guest(backend.socket_path, ram_size=size, huge_pages=sc.thp, seed=run,
                                   **guest_args) as guest:
                thp.restore()  # the back-end has read sysfs (ADD_MEM_REG) and RAM is touched
                ram = guest.ram
                ballooned = ram.num_pages - ram.reserved_pages if sc.amount == "all" else (size // 2) >> PAGE_SHIFT
                target = size - ballooned * PAGE_SIZE
                info = await control(backend.control_path, "query-balloon")
                region = info["regions"][0]
                result["thp_backed_bytes"] = pmd_mapped_bytes("vb-guest")
                result["backend_view"] = {k: region.get(k) for k in ("backing", "huge-page-size", "thp", "thp-setting")}
                if sc.thp and result["thp_backed_bytes"] < size // 2:
                    raise RuntimeError(f"THP asked for but only {result['thp_backed_bytes']} bytes of guest RAM "
                                       "are PMD-mapped (shmem_enabled changed under us?)")
                if not sc.thp and (result["thp_backed_bytes"] or region.get("huge-page-size") != PAGE_SIZE):
                    raise RuntimeError(f"THP off asked for but guest RAM has {result['thp_backed_bytes']} "
                                       f"PMD-mapped bytes and the back-end tracks {region.get('huge-page-size')}")
                before = ram.allocated_bytes()
                latencies: list[int] = []
                stop_prober = trio.Event()
                async with trio.open_nursery() as nursery:
                    if sc.probe == "flush":  # phase 1, not measured: fill the pending pages
                        await control(backend.control_path, "balloon", value=target)
                        await guest.wait_for_target(ballooned, timeout=600)
                        result["pending_before_flush"] = (await control(backend.control_path, "query-balloon"))["pending-bytes"]
                    if sc.probe:
                        nursery.start_soon(getconfig_prober, guest.frontend, latencies, stop_prober)
                    if profile_to:
                        await backend.start_profile(profile_to, py_spy)
                    q0 = await control(backend.control_path, "query-balloon")
                    alloc0 = ram.allocated_bytes()
                    ticks0, self0 = backend.ticks(), time.process_time_ns()
                    threads0 = thread_cpu_ns(backend.pid)
                    cpu0, wall0 = backend.cpu_ns(), time.perf_counter_ns()
                    if sc.probe == "flush":
                        await control(backend.control_path, "set-huge-policy", policy="auto")
                    else:
                        await control(backend.control_path, "balloon", value=target)
                        await guest.wait_for_target(ballooned, timeout=600)
                    wall_target = time.perf_counter_ns()
                    settled, q1 = await wait_host_freed(backend, ballooned * PAGE_SIZE)
                    wall1, cpu1 = time.perf_counter_ns(), backend.cpu_ns()
                    self1, ticks1 = time.process_time_ns(), backend.ticks()
                    threads1 = thread_cpu_ns(backend.pid)
                    backend.stop_profile()
                    stop_prober.set()
                after = ram.allocated_bytes()
                rtt = guest.driver.inflate_rtt_ns
                rtt_prefix = "phase1_rtt" if sc.probe == "flush" else "rtt"  # the flush itself has no buffers
                result.update({
                    "settled": settled,
                    "wall_ms": (wall1 - wall0) / 1e6,
                    "wall_to_target_ms": (wall_target - wall0) / 1e6,
                    "backend_cpu_ms": (cpu1 - cpu0) / 1e6,
                    "backend_user_ms": (ticks1[0] - ticks0[0]) * 1000 / CLK_TCK,
                    "backend_sys_ms": (ticks1[1] - ticks0[1]) * 1000 / CLK_TCK,
                    "guest_cpu_ms": (self1 - self0) / 1e6,
                    "backend_threads_ms": {name: (threads1[name] - threads0.get(name, 0)) / 1e6
                                           for name in threads1 if threads1[name] != threads0.get(name, 0)},
                    "freed_bytes": alloc0 - after,
                    "freed_total_bytes": before - after,
                    "ballooned_bytes": ballooned * PAGE_SIZE,
                    "discarded_bytes": q1["discarded-bytes"] - q0["discarded-bytes"],
                    "syscalls": q1["discard-syscalls"] - q0["discard-syscalls"],
                    "splits": q1["thp-splits"] - q0["thp-splits"],
                    "huge_whole": q1["huge-pages-freed-whole"] - q0["huge-pages-freed-whole"],
                    "buffers": len(rtt),
                    f"{rtt_prefix}_p50_us": percentile(rtt, 0.5) / 1e3 if len(rtt) else None,
                    f"{rtt_prefix}_p99_us": percentile(rtt, 0.99) / 1e3 if len(rtt) else None,
                    f"{rtt_prefix}_max_us": max(rtt) / 1e3 if len(rtt) else None,
                    "peak_rss_mib": backend.peak_rss_kb() / 1024,
                })
                if latencies:
                    result.update({
                        "getconfig_n": len(latencies),
                        "getconfig_p50_us": percentile(latencies, 0.5) / 1e3,
                        "getconfig_p99_us": percentile(latencies, 0.99) / 1e3,
                        "getconfig_max_us": max(latencies) / 1e3,
                    })
                pfns = guest.driver.balloon_pfns
                if not settled:
                    raise RuntimeError(f"host memory not freed within {SETTLE_TIMEOUT} s: the back-end freed "
                                       f"{q1['discarded-bytes']} of {ballooned * PAGE_SIZE} bytes, "
                                       f"{q1.get('pending-bytes')} pending")
        finally:
            thp.restore()
    finally:
        backend.stop()
        if backend.proc.returncode not in (0, None):
            result["backend_exit"] = backend.proc.returncode
    if sc.baselines:
        for kind in ("per-page", "whole"):
            base = baseline(kind, pfns, size, sc.thp)
            result.update({f"{kind.replace('-', '')}_{k}": v for k, v in base.items()})
            base = baseline(kind, pfns, size, sc.thp, foreign=True)  # as the back-end frees: another process maps it
            result.update({f"{kind.replace('-', '')}_foreign_{k}": v for k, v in base.items()})
        result["perpage_over_backend"] = result["perpage_cpu_ms"] / result["backend_cpu_ms"]
        result["backend_over_whole"] = result["backend_cpu_ms"] / result["whole_cpu_ms"]
        result["perpage_foreign_over_backend"] = result["perpage_foreign_cpu_ms"] / result["backend_cpu_ms"]
        result["backend_over_whole_foreign"] = result["backend_cpu_ms"] / result["whole_foreign_cpu_ms"]
    return result


# ---- the table -----------------------------------------------------------------------------

COLUMNS = [
    # header, key, format
    ("scenario", "name", "{}"),
    ("wall ms", "wall_ms", "{:.0f}"),
    ("BE cpu ms", "backend_cpu_ms", "{:.0f}"),
    ("usr/sys", ("backend_user_ms", "backend_sys_ms"), "{:.0f}/{:.0f}"),
    ("freed MiB", "freed_bytes", lambda v: f"{v / MiB:.0f}"),
    ("calls", "syscalls", "{:.0f}"),
    ("splits", "splits", "{:.0f}"),
    ("rtt p50 us", "rtt_p50_us", "{:.0f}"),
    ("p99 us", "rtt_p99_us", "{:.0f}"),
    ("getcfg p99 us", "getconfig_p99_us", "{:.0f}"),
    ("RSS MiB", "peak_rss_mib", "{:.1f}"),
    ("perpage cpu ms", "perpage_cpu_ms", "{:.0f}"),
    ("(calls/splits)", ("perpage_syscalls", "perpage_splits"), "{:.0f}/{:.0f}"),
    ("whole cpu ms", "whole_cpu_ms", "{:.1f}"),
    ("(calls)", "whole_syscalls", "{:.0f}"),
    ("perpage/BE", "perpage_over_backend", "{:.2f}"),
    ("BE/whole", "backend_over_whole", "{:.2f}"),
    ("2nd-mm perpage", "perpage_foreign_cpu_ms", "{:.0f}"),
    ("2nd-mm whole", "whole_foreign_cpu_ms", "{:.1f}"),
    ("perpage/BE", "perpage_foreign_over_backend", "{:.2f}"),
    ("BE/whole", "backend_over_whole_foreign", "{:.2f}"),
    ("guest cpu ms", "guest_cpu_ms", "{:.0f}"),
]


def median_of(runs: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if values:
            out[key] = statistics.median(values)
    return out


def cell(row: dict, key, fmt) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    values = [row.get(k) for k in keys]
    if any(v is None for v in values):
        return "-"
    return fmt(*values) if callable(fmt) else fmt.format(*values)


def render_table(rows: list[dict]) -> str:
    header = [c[0] for c in COLUMNS]
    body = [[cell(row, key, fmt) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for b in body:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(b, widths))))
    return "\n".join(lines)


GOALS = [
    # (description, scenario, check(median row) -> (met, shown value))
    ("balloon all, linux, no THP: back-end CPU <= 1.5x whole-range fallocate", "all-linux-thpoff",
     lambda r: (r["backend_over_whole"] <= 1.5, f"{r['backend_over_whole']:.2f}x")),
    ("balloon all, linux, no THP: per-page CPU >= 4x back-end CPU", "all-linux-thpoff",
     lambda r: (r["perpage_over_backend"] >= 4, f"{r['perpage_over_backend']:.2f}x")),
    ("balloon all, linux, THP: per-page CPU >= 50x back-end CPU", "all-linux-thpon",
     lambda r: (r["perpage_over_backend"] >= 50, f"{r['perpage_over_backend']:.2f}x")),
    ("balloon all, linux, THP: zero splits", "all-linux-thpon",
     lambda r: (r["splits"] == 0, f"{r['splits']:.0f} splits")),
    ("buffer round trip p50 <= 200 us (all, linux, no THP)", "all-linux-thpoff",
     lambda r: (r["rtt_p50_us"] <= 200, f"{r['rtt_p50_us']:.0f} us")),
    ("buffer round trip p99 <= 2 ms (all, linux, no THP)", "all-linux-thpoff",
     lambda r: (r["rtt_p99_us"] <= 2000, f"{r['rtt_p99_us']:.0f} us")),
    ("GET_CONFIG p99 <= 2 ms during a balloon-all (linux, no THP)", "getconfig-balloon",
     lambda r: (r["getconfig_p99_us"] <= 2000, f"{r['getconfig_p99_us']:.0f} us")),
    ("GET_CONFIG p99 <= 2 ms during one large discard (flush of half of RAM)", "getconfig-flush",
     lambda r: (r["getconfig_p99_us"] <= 2000, f"{r['getconfig_p99_us']:.0f} us")),
    ("range guest, THP: back-end CPU <= 1.5x whole-range fallocate", "all-ranges-thpon",
     lambda r: (r["backend_over_whole"] <= 1.5, f"{r['backend_over_whole']:.2f}x")),
    ("range guest, no THP: back-end CPU <= 1.2x whole-range fallocate", "all-ranges-thpoff",
     lambda r: (r["backend_over_whole"] <= 1.2, f"{r['backend_over_whole']:.2f}x")),
    ("range guest, THP: zero splits", "all-ranges-thpon",
     lambda r: (r["splits"] == 0, f"{r['splits']:.0f} splits")),
    ("peak back-end RSS <= 60 MiB for a 4 GiB guest (--size 4G)", "all-linux-thpoff",
     lambda r: (r["peak_rss_mib"] <= 60, f"{r['peak_rss_mib']:.1f} MiB")),
]


def machine_info() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem_total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) << 10
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": model,
        "mem_total_bytes": mem_total,
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "shmem_enabled_at_start": sysfs_choice(os.path.join(THP_SYSFS, "shmem_enabled")),
        "shmem_enabled_pmd_at_start": sysfs_choice(os.path.join(THP_SYSFS, f"hugepages-{pmd_size() >> 10}kB",
                                                             "shmem_enabled")),
    }


def code_info() -> dict:
    """Which vhostballoon is measured (the back-end runs from the same interpreter)."""
    import vhostballoon

    root = os.path.dirname(os.path.dirname(os.path.abspath(vhostballoon.__file__)))
    info: dict[str, Any] = {"package_root": root, "interpreter": sys.executable}
    try:
        info["git_head"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                          text=True, check=True).stdout.strip()
        info["git_dirty"] = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                           capture_output=True, text=True, check=True).stdout.split("\n")[:-1]
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


# ---- profiles --------------------------------------------------------------------------------


_PY_FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^()]*\.py):\d+\)$")
_C_CORE_FILES = ("discard.c", "vring.c", "track.c", "mem.c", "ranges.c", "persist.c", "serve.c", "front.c",
                 "vhostballoon._native")
# Functions of the per-buffer path whose inclusive share is worth showing.
_INCLUSIVE = (
    "FrontendSession._receive_loop", "BackendConnection.receive_data", "BackendConnection.next_event",
    "BackendConnection.data_to_send", "FrontendSession._dispatch", "FrontendSession._flush",
    "FrontendSession._on_config_get", "FrontendSession._on_config_set", "FrontendSession._queue_worker",
    "FrontendSession._process", "serve_available", "vb_vq_pop_pfn32", "vb_balloon_update", "vb_track_inflate",
    "BalloonDevice.apply",
    "HugePageTracker.flush_due", "FrontendSession._arm_flush_timer", "Virtqueue.push_used",
    "FrontendSession._discard", "to_thread_run_sync", "FrontendSession._discard_blocking",
    "GuestMemory.allocated_bytes", "punch_fallocate", "BalloonService.publish", "serve_control",
    "Struct._parse", "Struct._build", "gc_collect_main",
)


def _module_of(path: str) -> str:
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    parts = path.split("/")
    if parts[0] == "vhostballoon" and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0] if len(parts) > 1 else "stdlib:" + parts[0]


def summarize_profile(path: str, top: int = 12) -> dict:
    """py-spy raw stacks (--threads --native) -> where the back-end's busy
    samples go: by kind of code at the leaf, by Python package of the
    innermost Python frame, and inclusive shares of the per-buffer path.
    Idle samples (epoll_wait, an idle worker thread, GIL waits) are left out."""
    kinds: Counter = Counter()
    modules: Counter = Counter()
    inclusive: Counter = Counter()
    leaves: Counter = Counter()
    idle = busy = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            text = stack
            leaf = frames[-1]
            worker = "WorkerThread._work" in text
            if (leaf.startswith("epoll_wait") or "take_gil" in text
                    or (worker and "WorkerThread._handle_job" not in text)):
                idle += n
                continue
            busy += n
            leaves[leaf] += n
            if any(name in leaf for name in _C_CORE_FILES) or leaf.startswith("vb_"):
                kinds["C core (csrc)"] += n
            elif _PY_FRAME.match(leaf):
                kinds["Python bytecode"] += n
            elif "(libc.so" in leaf or leaf.startswith("0x"):
                kinds["libc / syscalls (kernel)"] += n
            else:
                kinds["CPython runtime / extensions"] += n
            inner = next((m for m in map(_PY_FRAME.match, reversed(frames)) if m), None)
            if inner:
                modules[("worker: " if worker else "") + _module_of(inner.group("file"))] += n
            if not re.search(r"vhostballoon/(server|device|vhost_user|native)", text):
                inclusive["(no back-end frame: trio run loop, epoll, gc)"] += n
            seen = set()
            for name in _INCLUSIVE:
                if name in text and name not in seen:
                    seen.add(name)
                    inclusive[name] += n
    share = lambda c: {k: round(100 * v / busy, 1) for k, v in c.most_common(top)} if busy else {}
    return {
        "busy_samples": busy,
        "idle_samples": idle,
        "kind_pct": share(kinds),
        "module_pct": share(modules),
        "inclusive_pct": {k: round(100 * v / busy, 1) for k, v in inclusive.items()} if busy else {},
        "top_leaves": leaves.most_common(top),
    }


# ---- main ----------------------------------------------------------------------------------------


def transport_floor(buffers: int = 4096, runs: int = 5) -> dict:
    """scripts/transport_floor.c, built here: the least CPU a back-end spends
    per guest buffer on this machine (GET_CONFIG, one kick, SET_CONFIG; no
    ring, no discard), and what that makes per GiB ballooned in 256-PFN
    buffers.  Both of its threads run on one CPU, which hands over from one
    to the other without ever going idle: the cheapest case, so a lower
    bound (across two CPUs each event also wakes an idle CPU, and on this
    kind of VM that costs several times more).  {"error": ...} when it
    cannot be built or run."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transport_floor.c")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return {"error": "no C compiler (cc/gcc) on PATH"}
    with tempfile.TemporaryDirectory(prefix="vb-floor-") as tmp:
        exe = os.path.join(tmp, "transport_floor")
        try:
            subprocess.run([cc, "-O2", "-pthread", "-o", exe, source], check=True, capture_output=True)
            one_cpu = min(os.sched_getaffinity(0))
            samples = [float(subprocess.run([exe, str(buffers), str(runs)], check=True, capture_output=True,
                                            text=True, preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu})).stdout)
                       for _ in range(3)]
        except (subprocess.CalledProcessError, ValueError, OSError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
    per_buffer_ns = statistics.median(samples)
    return {"per_buffer_us": per_buffer_ns / 1e3, "samples_us": [x / 1e3 for x in samples],
            "per_gib_ms": per_buffer_ns * (GiB // PAGE_SIZE // 256) / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="guest RAM (default 1G; 4G for the RSS goal)")
    p.add_argument("--runs", type=int, default=3, help="runs per scenario (medians are shown; default 3)")
    p.add_argument("--json", metavar="FILE", help="write machine info, every run and the medians here")
    p.add_argument("--only", nargs="+", metavar="NAME", help="scenarios to run (default: all): "
                   + ", ".join(s.name for s in SCENARIOS))
    p.add_argument("--profile", metavar="DIR", help="run the back-end under py-spy; collapsed stacks go to DIR")
    p.add_argument("--py-spy", metavar="PATH", help="py-spy executable (default: py-spy on PATH)")
    p.add_argument("--note", help="free text kept in the JSON (e.g. which commit the package under test is)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    if size < 64 * MiB or size % (2 * MiB):
        p.error("--size must be a multiple of 2 MiB and at least 64M")
    scenarios = SCENARIOS
    if args.only:
        unknown = set(args.only) - {s.name for s in SCENARIOS}
        if unknown:
            p.error(f"unknown scenario(s) {sorted(unknown)}")
        scenarios = [s for s in SCENARIOS if s.name in args.only]
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.py_spy = shutil.which(args.py_spy or "py-spy")
        if not args.py_spy:
            p.error("--profile needs py-spy (pip install py-spy; --py-spy PATH)")

    info = machine_info()
    print(f"vhostballoon bench: guest {size // MiB} MiB, {args.runs} run(s) per scenario; "
          f"{info['nproc']} CPUs ({info['cpu_model']}), Linux {info['kernel']}, load {info['loadavg_at_start'][0]:.2f}")
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "size_bytes": size,
        "runs": args.runs,
        "profiled": bool(args.profile),
        "note": args.note,
        "code": code_info(),
        "scenarios": {},
    }
    rows = []
    for sc in scenarios:
        runs, failures = [], []
        for run in range(args.runs):
            workdir = tempfile.mkdtemp(prefix="vb-bench-", dir="/tmp")
            profile_to = os.path.join(args.profile, f"{sc.name}-run{run}.txt") if args.profile else None
            try:
                result = trio.run(balloon_run, sc, size, run, workdir, profile_to, args.py_spy)
            except Exception as exc:  # one failing run must not stop the others
                reason = f"{type(exc).__name__}: {exc}"
                failures.append(reason)
                print(f"  {sc.name} run {run + 1}: FAILED {reason}", flush=True)
                traceback.print_exc(limit=3, file=sys.stderr)
                continue
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            runs.append(result)
            print(f"  {sc.name} run {run + 1}: wall {result['wall_ms']:.0f} ms, back-end CPU "
                  f"{result['backend_cpu_ms']:.0f} ms, freed {result['freed_bytes'] / MiB:.0f} MiB, "
                  f"{result['syscalls']} calls, load {result['loadavg']:.2f}; threads "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(result.get("backend_threads_ms", {}).items())),
                  flush=True)
            if profile_to and os.path.exists(profile_to):
                result["profile"] = summarize_profile(profile_to)
        entry: dict[str, Any] = {"scenario": sc.__dict__ | {"backend_args": list(sc.backend_args)},
                                 "runs": runs, "failures": failures}
        if runs:
            entry["median"] = median_of(runs)
            rows.append({"name": sc.name, **entry["median"]})
        else:
            rows.append({"name": f"{sc.name} FAILED"})
        report["scenarios"][sc.name] = entry

    floor = transport_floor()
    report["transport_floor"] = floor
    print()
    print(render_table(rows))
    print("\nBE = back-end process (all threads); perpage/whole = same PFNs on a fresh touched memfd, this process;"
          " guest cpu = front-end + model guest (this process) during the balloon.")
    goals = []
    by_name = {r["name"]: r for r in rows}
    print("\nGoals:")
    for text, name, check in GOALS:
        row = by_name.get(name)
        try:
            met, shown = check(row) if row else (None, "not run")
        except (KeyError, TypeError):
            met, shown = None, "no figure"
        if "RSS" in text and size != 4 << 30 and met is not None:
            shown += f" with a {size // MiB} MiB guest"
        verdict = {True: "MET", False: "NOT MET", None: "?"}[met]
        print(f"  {verdict:8} {text}: {shown}")
        goals.append({"goal": text, "scenario": name, "met": met, "value": shown})
    report["goals"] = goals
    if "error" in floor:
        print(f"\nTransport floor: not measured ({floor['error']})")
    else:
        print(f"\nTransport floor (scripts/transport_floor.c; GET_CONFIG + kick + SET_CONFIG answered by a C "
              f"thread doing nothing else, both ends on one CPU: a lower bound): "
              f"{floor['per_buffer_us']:.1f} us of CPU per 256-PFN buffer "
              f"(samples {', '.join(f'{x:.1f}' for x in floor['samples_us'])}), "
              f"{floor['per_gib_ms']:.1f} ms per GiB ballooned.")
        thp = by_name.get("all-linux-thpon")
        if thp and thp.get("perpage_cpu_ms") and thp.get("whole_cpu_ms"):
            best = thp["perpage_cpu_ms"] / (floor["per_gib_ms"] * size / GiB + thp["whole_cpu_ms"])
            floor["best_thp_perpage_over_backend"] = best
            print(f"  With THP, a back-end that spent only that plus the whole-range fallocate would reach "
                  f"per-page/BE = {best:.1f}x at best.")
    report["machine"]["shmem_enabled_at_end"] = sysfs_choice(os.path.join(THP_SYSFS, "shmem_enabled"))
    if args.profile:
        print("\nProfiles (py-spy, back-end, samples while busy):")
        for name, entry in report["scenarios"].items():
            for i, run in enumerate(entry["runs"]):
                prof = run.get("profile")
                if prof:
                    print(f"  {name} run {i + 1}: {prof['busy_samples']} busy samples "
                          f"({prof['idle_samples']} idle left out)")
                    print(f"    by code at the leaf, %: {prof['kind_pct']}")
                    print(f"    by package of the innermost Python frame, %: {prof['module_pct']}")
                    print(f"    inclusive, %: {prof['inclusive_pct']}")
                    for leaf, n in prof["top_leaves"][:8]:
                        print(f"    {n:6d}  {leaf}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
