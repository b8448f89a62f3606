#!/usr/bin/env python3
"""Huge page policies against one fallocate per page, on THP-backed memory.

    .venv/bin/python scripts/bench_hugepages.py [--size 1G] [--seed 0]
        [--orders random,linux] [--json FILE]

A benchmark, not a test: it prints figures and exits 0 (1 only when THP
cannot be switched on at all here).  No sockets, no back-end process: it
drives the back-end's own pieces directly, as ``FrontendSession._process``
does per inflate buffer, on a memfd of ``--size`` in this process:
``GuestMemory.balloon_update`` (bitmap), ``HugePageTracker.inflated`` (the C
tracker), ``HugePageTracker.flush_due``/``collect`` (the policy) and
``HugePageTracker.discard`` (the C discard engine).  For each PFN order,
every variant gets a fresh memfd whose mapping is madvised MADV_HUGEPAGE (as
QEMU does with guest RAM) and fully written, with shmem THP on
(``shmem_enabled=advise``, the PMD size's own knob ``inherit``, by
``vhostballoon.testing.host.shmem_thp`` around each variant: restored
after), and then balloons ALL of it, 256 PFNs per buffer:

- ``per-page``: one ``fallocate(PUNCH_HOLE)`` per 4 KiB page in the guest's
  order (QEMU's way when it cannot merge), done with the existing
  ``GuestMemory.discard_ranges`` and one 4 KiB range per page (built before
  the clock starts); no helper was added.  The bitmap update runs too, so
  "track" is comparable.
- ``eager``: ``--huge-policy eager``.
- ``auto``: ``--huge-policy auto`` with the daemon's defaults
  (``DEFAULT_FLUSH_BYTES`` pending or ``DEFAULT_FLUSH_AFTER`` s, printed in
  the header); the last buffer is the guest reaching its target (flush
  then).  With the earlier 64 MiB bound, random order over 1 GiB flushed 15
  times mid-balloon and split all 512 huge pages (1x per-page).
- ``auto@target``: auto with the bounds off (flush only at the target) --
  what auto does when neither bound triggers (differs from ``auto`` only
  when ``--size`` exceeds the bytes bound).
- ``whole``: ``--huge-policy whole``.

Orders (``vhostballoon.testing.balloon_driver.allocation_order``):
``random`` (all PFNs shuffled, the design's premise) and ``linux``
(descending runs of 16 pages, two 2 MiB blocks interleaved, top down:
what the real guest looks like, see tests/e2e/test_qemu_hugepages.py).

Per variant, wall times summed over the buffers: the ballooned bitmap
(``bitmap s``, ``balloon_update``: every variant pays it), the huge page
tracker and policy (``track s``: ``inflated``, ``flush_due``, ``collect``)
and the discard calls (``discard s``); host memory freed (memfd
``st_blocks``); THP splits (/proc/vmstat ``thp_split_page`` delta, machine-wide: quiet machine
assumed, and the C core's own count); discard syscalls; huge pages freed
whole; ``ShmemPmdMapped`` of the mapping before (proof of THP backing: a
variant whose memfd did not get all THPs, e.g. because another process
changed the machine-wide knobs, is run again, up to 3 times, and flagged).
``x disc`` and ``x total`` are per-page time / variant time (same order):
discard alone, and bitmap + track + discard.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import platform
import re
import sys
import time
from array import array

from vhostballoon.device.hugepages import (
    DEFAULT_FLUSH_AFTER,
    DEFAULT_FLUSH_BYTES,
    THP_SYSFS,
    FlushPolicy,
    HugePageTracker,
    HugePolicy,
    pmd_size,
)
from vhostballoon.testing.host import shmem_thp, vmstat
from vhostballoon.sizes import parse_size
from vhostballoon.native import PAGE_SHIFT, PAGE_SIZE, DiscardStats, GuestMemory, PfnArray, RangeList
from vhostballoon.testing.allocation import allocation_order

MiB = 1 << 20
BATCH = 256  # PFNs per inflate buffer, as Linux sends them
UADDR = 0x7F0000000000
NAME = "vb-bench-huge"
VARIANTS = ("per-page", "eager", "auto", "auto@target", "whole")
NEVER = 1e9  # seconds: no deadline within a run (FlushPolicy refuses inf)
ATTEMPTS = 3  # per variant, when its memfd did not get all THPs (the knobs are machine-wide)


def size_arg(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0 or value % (2 * MiB):
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 2M")
    return value


# ---- the kernel's figures ------------------------------------------------------------


def pmd_mapped(name: str) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = f"/memfd:{name} " in line
            elif inside and line.startswith("ShmemPmdMapped:"):
                total += int(line.split()[1]) << 10
    return total


# ---- one variant -----------------------------------------------------------------------


class ThpRam:
    """A memfd mapped MADV_HUGEPAGE and fully written, plus a GuestMemory on it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create(NAME, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.view = mmap.mmap(self.fd, size)
        self.view.madvise(mmap.MADV_HUGEPAGE)
        chunk = b"\xa5" * (2 * MiB)
        for off in range(0, size, len(chunk)):
            self.view[off:off + len(chunk)] = chunk
        self.pmd_before = pmd_mapped(NAME)
        self.mem = GuestMemory()
        self.mem.add_region(os.dup(self.fd), 0, size, UADDR, 0)

    def allocated(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        self.mem.close()
        self.view.close()
        os.close(self.fd)


def per_page_ranges(pfns: PfnArray) -> RangeList:
    out = RangeList(pfns.n)
    for i in range(pfns.n):
        out.cdata[i].gpa = pfns.cdata[i] << PAGE_SHIFT
        out.cdata[i].len = PAGE_SIZE
    out.n = pfns.n
    return out


def run_variant(variant: str, order: array, size: int) -> dict:
    ram = ThpRam(size)
    try:
        policy = {
            "per-page": FlushPolicy(HugePolicy.EAGER),  # tracker only configures the region here
            "eager": FlushPolicy(HugePolicy.EAGER),
            "auto": FlushPolicy(HugePolicy.AUTO),
            "auto@target": FlushPolicy(HugePolicy.AUTO, flush_bytes=1 << 62, flush_after=NEVER),
            "whole": FlushPolicy(HugePolicy.WHOLE),
        }[variant]
        tracker = HugePageTracker(ram.mem, policy)
        [(_, backing)] = tracker.configure_regions()
        buffers = [PfnArray.from_list(order[i:i + BATCH]) for i in range(0, len(order), BATCH)]
        # Every PFN is ballooned once, so each buffer's changed PFNs are the
        # buffer: the per-page range lists are built here, untimed (QEMU
        # would not pay Python's cost of building them).
        page_ranges = [per_page_ranges(b) for b in buffers] if variant == "per-page" else None
        gc.collect()
        gc.disable()
        stats = DiscardStats()
        bitmap = track = discard = 0.0
        flushes = 0
        blocks0, splits0 = ram.allocated(), vmstat("thp_split_page")
        for k, pfns in enumerate(buffers):
            t0 = time.perf_counter()
            update = ram.mem.balloon_update(pfns, inflate=True)
            tb = time.perf_counter()
            if page_ranges is not None:
                assert update.changed.n == pfns.n
                ranges = page_ranges[k]
            else:
                ranges = tracker.inflated(update.changed)
                if tracker.flush_due(guest_at_target=k == len(buffers) - 1):
                    ranges = ranges + tracker.collect()
                    flushes += 1
            t1 = time.perf_counter()
            if len(ranges):
                stats.add(tracker.discard(ranges))
            t2 = time.perf_counter()
            bitmap += tb - t0
            track += t1 - tb
            discard += t2 - t1
        gc.enable()
        freed = blocks0 - ram.allocated()
        return {
            "variant": variant,
            "thp_before_bytes": ram.pmd_before,
            "granule": backing.granule,
            "bitmap_s": bitmap,
            "track_s": track,
            "discard_s": discard,
            "total_s": bitmap + track + discard,
            "freed_bytes": freed,
            "pending_bytes": tracker.state().collectable_bytes + tracker.state().held_bytes,
            "splits_kernel": vmstat("thp_split_page") - splits0,
            "splits_ours": stats.splits,
            "huge_whole": stats.huge_pages_whole,
            "syscalls": stats.syscalls,
            "discarded_bytes": stats.bytes_freed,
            "flushes": flushes,
        }
    finally:
        ram.close()


# ---- table ---------------------------------------------------------------------------------

COLUMNS = [
    ("order", "{}", 7), ("variant", "{}", 12), ("THP MiB", "{:.0f}", 8), ("bitmap s", "{:.3f}", 9), ("track s", "{:.4f}", 8),
    ("discard s", "{:.4f}", 10), ("freed MiB", "{:.1f}", 10), ("whole", "{}", 6), ("splits k/ours", "{}", 14),
    ("syscalls", "{}", 9), ("flushes", "{}", 8), ("x disc", "{}", 7), ("x total", "{}", 8),
]


def table(rows: list[dict]) -> str:
    out = ["  ".join(f"{name:>{w}}" for name, _, w in COLUMNS)]
    for r in rows:
        cells = [
            r["order"], r["variant"], r["thp_before_bytes"] / MiB, r["bitmap_s"], r["track_s"], r["discard_s"],
            r["freed_bytes"] / MiB, r["huge_whole"], f"{r['splits_kernel']}/{r['splits_ours']}",
            r["syscalls"], r["flushes"], r["ratio_discard"], r["ratio_total"],
        ]
        out.append("  ".join(f"{fmt.format(c):>{w}}" for (_, fmt, w), c in zip(COLUMNS, cells)))
    return "\n".join(out)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.0f}x" if b > 0 else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=size_arg, default=1 << 30, help="memfd size (default 1G)")
    p.add_argument("--seed", type=int, default=0, help="random order seed (default 0)")
    p.add_argument("--orders", default="random,linux", help="comma list of random, linux (default both)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    for o in orders:
        if o not in ("random", "linux"):
            p.error(f"unknown order {o!r}")

    pages = range(args.size >> PAGE_SHIFT)
    rows: list[dict] = []
    if not os.path.exists(os.path.join(THP_SYSFS, "shmem_enabled")):
        print("cannot run: this kernel has no shmem THP (no shmem_enabled in sysfs)", file=sys.stderr)
        return 1
    try:
        for o in orders:
            order = allocation_order(pages, o, seed=args.seed)
            for variant in VARIANTS:
                for attempt in range(1, ATTEMPTS + 1):
                    # Switched per variant: what another process may have
                    # changed meanwhile is set again, and restored after.
                    with shmem_thp("advise"):
                        row = {"order": o, **run_variant(variant, order, args.size), "attempt": attempt}
                    if row["thp_before_bytes"] == args.size and row["granule"] == pmd_size():
                        break
                    print(f"  {o} {variant}: memory not all THP ({row['thp_before_bytes'] / MiB:.0f} MiB) "
                          "or not tracked in huge pages: another process changing the knobs? again",
                          file=sys.stderr)
                rows.append(row)
                print(f"  {o:7} {variant:12} discard {row['discard_s']:.4f} s, track {row['track_s']:.4f} s,"
                      f" freed {row['freed_bytes'] / MiB:.0f} MiB", file=sys.stderr)
    except PermissionError as exc:
        print(f"cannot run: cannot set {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    for o in orders:
        base = next(r for r in rows if r["order"] == o and r["variant"] == "per-page")
        for r in rows:
            if r["order"] == o:
                r["ratio_discard"] = ratio(base["discard_s"], r["discard_s"])
                r["ratio_total"] = ratio(base["total_s"], r["total_s"])
    print(f"\nballoon ALL of {args.size / MiB:.0f} MiB of THP-backed memfd, {BATCH} PFNs per buffer "
          f"(kernel {platform.release()}, {os.cpu_count()} CPUs; auto: flush at {DEFAULT_FLUSH_BYTES / MiB:.0f} MiB "
          f"pending or {DEFAULT_FLUSH_AFTER:g} s); splits k/ours = /proc/vmstat "
          f"thp_split_page delta / the C core's count\n")
    print(table(rows))
    odd = [f"{r['order']}/{r['variant']}" for r in rows
           if r["thp_before_bytes"] < args.size or r["granule"] != pmd_size()]
    if odd:
        print(f"\nWARNING: not (all) THP-backed, or not tracked in huge pages: {', '.join(odd)}; "
              "did another process change the shmem THP knobs meanwhile? Those rows are not THP figures.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "batch": BATCH, "seed": args.seed, "kernel": platform.release(),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
