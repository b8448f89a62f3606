#!/usr/bin/env python3
"""Writes the seed corpora of the native-core fuzzers (tests/fuzz/corpus/<harness>/).

Each seed is an input in the harnesses' format (fuzz_common.h): region
layout, queue set-up, guest memory image, then operations.  The seeds hold
well-formed rings (direct, chained and indirect buffers, event index, an
index about to wrap, two regions, one at the top of the 32-bit PFN space),
so the fuzzer starts from buffers the walker accepts and mutates from there.

    python tests/fuzz/make_seeds.py          # rewrites the seed-* files

Other files in a corpus folder are left alone: cov-* is a corpus minimized
to edge coverage (libFuzzer -merge=1 -use_counters=0) after a long run
(8 minutes per harness, about 2.3 and 3.5 million executions, no finding),
and crash-* are inputs that once failed, kept as regression tests.
"""

from __future__ import annotations

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = 4096
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
DESC = struct.Struct("<QIHH")

# Layout of region 0's image (offsets inside the region, which starts at gpa 0).
DESC_OFF, AVAIL_OFF, USED_OFF, DATA_OFF, INDIRECT_OFF = 0x000, 0x400, 0x800, 0x1000, 0xC00


class Image:
    """Guest memory of region 0 (gpa 0, 16 pages), as the driver writes it."""

    def __init__(self, num: int) -> None:
        self.num = num
        self.mem = bytearray(8 * PAGE)  # only the first 8 pages are sent: the rest stays zero
        self.avail_idx = 0
        self.next_desc = 0
        self.next_data = DATA_OFF

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC_OFF) -> None:
        DESC.pack_into(self.mem, table + 16 * i, addr, length, flags, nxt)

    def data(self, payload: bytes) -> int:
        gpa = self.next_data
        self.mem[gpa : gpa + len(payload)] = payload
        self.next_data += (len(payload) + 15) & ~15
        return gpa

    def publish(self, head: int) -> None:
        struct.pack_into("<H", self.mem, AVAIL_OFF + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, AVAIL_OFF + 2, self.avail_idx)

    def pfn_buffer(self, pfns: list[int], *, chained: int = 1, write: bool = False) -> None:
        """One buffer of le32 PFNs in ``chained`` descriptors."""
        payload = struct.pack(f"<{len(pfns)}I", *pfns)
        parts = [payload[i::chained] for i in range(1)] if chained == 1 else _split(payload, chained)
        head = self.next_desc
        for k, part in enumerate(parts):
            i = self.next_desc
            self.next_desc += 1
            last = k == len(parts) - 1
            self.desc(i, self.data(part), len(part), (0 if last else F_NEXT) | (F_WRITE if write else 0),
                      0 if last else i + 1)
        self.publish(head)

    def indirect_buffer(self, pfns: list[int], entries: int = 2) -> None:
        payload = struct.pack(f"<{len(pfns)}I", *pfns)
        parts = _split(payload, entries)
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            self.desc(k, self.data(part), len(part), 0 if last else F_NEXT, 0 if last else k + 1, table=INDIRECT_OFF)
        head = self.next_desc
        self.next_desc += 1
        self.desc(head, INDIRECT_OFF, 16 * len(parts), F_INDIRECT)
        self.publish(head)

    def ranges_buffer(self, ranges: list[tuple[int, int]], *, write: bool = True) -> None:
        """A reporting (write) or stats (read) buffer: the descriptors are the ranges."""
        head = self.next_desc
        for k, (addr, length) in enumerate(ranges):
            i = self.next_desc
            self.next_desc += 1
            last = k == len(ranges) - 1
            self.desc(i, addr, length, (0 if last else F_NEXT) | (F_WRITE if write else 0), 0 if last else i + 1)
        self.publish(head)


def _split(payload: bytes, n: int) -> list[bytes]:
    words = len(payload) // 4
    cuts = [4 * (words * k // n) for k in range(n + 1)]
    return [payload[cuts[k] : cuts[k + 1]] for k in range(n) if cuts[k + 1] > cuts[k]]


def layout(regions: list[tuple[int, int]], configure: list[int] | None) -> bytes:
    """Region bytes: (pages_b, place) per region; mmap offset and uaddr byte 0."""
    out = bytes([len(regions) - 1])
    for pages_b, place in regions:
        out += bytes([pages_b, place, 0, 0])
    if configure is not None:  # fuzz_ring only: one byte per possible region
        out += bytes((configure + [0, 0, 0])[:3])
    return out


def queue(num_log2: int, flags: int, base: int = 0) -> bytes:
    out = bytes([num_log2, flags])
    if flags & 4:
        out += struct.pack("<H", base)
    for offset in (DESC_OFF, AVAIL_OFF, USED_OFF):
        out += bytes([0]) + struct.pack("<H", offset)  # region 0, offset
    return out


def fill(image: Image) -> bytes:
    used = max(image.next_data, DATA_OFF + 64)
    return struct.pack("<H", used) + bytes(image.mem[:used])


def op_pop(inflate: bool, max_pfns: int = 1023, max_heads: int = 63) -> bytes:
    return bytes([0]) + struct.pack("<H", max_pfns) + bytes([max_heads, 1 if inflate else 0])


def op_write(offset: int, data: bytes) -> bytes:
    return bytes([1, 0]) + struct.pack("<H", offset) + bytes([len(data)]) + data


def op_collect(region: int = 0xFF, max_ranges: int = 47) -> bytes:
    return bytes([2, region, max_ranges])


def ring_seeds() -> dict[str, bytes]:
    seeds = {}
    one_region = layout([(15, 0)], [0x8B])  # 16 pages at gpa 0, shmem tracked in 32 KiB huge pages

    img = Image(8)
    img.pfn_buffer([1, 2, 3, 4, 5, 6, 7, 8])  # a whole 32 KiB huge page: freed at once
    img.pfn_buffer([9, 11, 9])  # partial, with a duplicate
    seeds["seed-direct-inflate"] = one_region + queue(3, 0) + fill(img) + op_pop(True) + op_collect()

    img = Image(8)
    img.pfn_buffer([12, 13, 14, 15, 10], chained=3)
    seeds["seed-chained-event-idx"] = (one_region + queue(3, 1) + fill(img) + op_pop(True)
                                       + op_write(AVAIL_OFF + 2, b"\x01\x00") + op_pop(False) + op_collect())

    img = Image(16)
    img.indirect_buffer([8, 9, 10, 11, 12, 13, 14, 15], entries=3)
    seeds["seed-indirect"] = one_region + queue(4, 2) + fill(img) + op_pop(True) + op_collect(0, 4)

    # An avail index about to wrap: base 0xfffe, two buffers published past it.
    img = Image(4)
    img.avail_idx = 0xFFFE
    img.pfn_buffer([3, 4])
    img.pfn_buffer([3, 4])
    seeds["seed-wrap"] = one_region + queue(2, 4, base=0xFFFE) + fill(img) + op_pop(True) + op_pop(False)

    # Inflate, then deflate the same pages: deflate must win over pending tracking.
    img = Image(8)
    img.pfn_buffer([5, 6, 7])
    img.pfn_buffer([5, 6, 7])
    seeds["seed-inflate-deflate"] = (one_region + queue(3, 0) + fill(img) + op_pop(True, max_heads=0)
                                     + op_pop(False) + op_collect())

    # Two regions: the second at the top of the 32-bit PFN space (PFN 0xffffffff).
    two = layout([(15, 0), (3, 0x80)], [0x89, 0x8A])  # shmem, 8 and 16 KiB huge pages
    top = (1 << 32) - 4
    img = Image(8)
    img.pfn_buffer([top, top + 1, top + 2, top + 3, 0xFFFFFFFF, 2])
    seeds["seed-two-regions-top"] = two + queue(3, 0) + fill(img) + op_pop(True) + op_collect()
    return seeds


def ranges_seeds() -> dict[str, bytes]:
    seeds = {}
    one_region = layout([(15, 0)], None)
    img = Image(8)
    img.ranges_buffer([(8 * PAGE, 2 * PAGE), (12 * PAGE, 4 * PAGE)])
    seeds["seed-report"] = one_region + queue(3, 0) + fill(img) + bytes([0]) + struct.pack("<H", 255) + bytes([63, 1])
    img = Image(8)
    img.ranges_buffer([(DATA_OFF, 160)], write=False)
    seeds["seed-stats"] = one_region + queue(3, 1) + fill(img) + bytes([0]) + struct.pack("<H", 255) + bytes([63, 0])
    img = Image(8)
    img.ranges_buffer([(8 * PAGE, PAGE), (9 * PAGE + 8, PAGE), (15 * PAGE, 2 * PAGE)])
    seeds["seed-report-bad-ranges"] = (one_region + queue(3, 0) + fill(img)
                                       + bytes([4, 2, 1, 0, 8, 0, 9]) + bytes([0]) + struct.pack("<H", 255) + bytes([63, 1]))
    return seeds


def main() -> None:
    for harness, seeds in (("fuzz_ring", ring_seeds()), ("fuzz_ranges", ranges_seeds())):
        folder = os.path.join(HERE, "corpus", harness)
        os.makedirs(folder, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        print(f"{folder}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
