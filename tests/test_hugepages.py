"""Huge pages on real memory: THP-backed memfds, hugetlbfs memfds, plain files.

The kernel's own figures are the evidence: st_blocks of the memfd,
ShmemHugePages and HugePages_Free in /proc/meminfo, thp_split_page in
/proc/vmstat, and ShmemPmdMapped of the test's own mapping in
/proc/self/smaps.  The THP tests switch shmem_enabled to "advise" (only
madvised mappings get huge pages, so nothing else on the machine changes
behaviour) and the hugetlbfs tests reserve a few huge pages; both restore
what they found.  meminfo and vmstat are machine-wide: on a busy machine
another process could move them, so the exact assertions assume a quiet one.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import re

import pytest
from backend_support import bracketed, meminfo, vmstat
from vhostballoon.testing.host import HugePagesUnavailable, reserved_huge_pages

from vhostballoon.device.hugepages import (
    BATCH_GRANULE,
    THP_SYSFS,
    Backing,
    FlushPolicy,
    HugePageTracker,
    HugePolicy,
    PendingState,
    detect_backing,
    mapped_huge_bytes,
    pmd_size,
    shmem_thp,
)
from vhostballoon.native import PAGE_SHIFT, PAGE_SIZE, DiscardStats, GuestMemory, PfnArray, RangeList, fd_backing

MiB = 1 << 20
UADDR = 0x7F0000000000
BATCH = 256  # PFNs per inflate buffer, as Linux sends them


# ---- the kernel's figures ------------------------------------------------------------


def smaps_bytes(addr: int, field: str) -> int:
    """A field of the /proc/self/smaps entry of the mapping that starts at addr."""
    current = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-[0-9a-f]+ ", line)
            if m:
                current = int(m.group(1), 16) == addr
            elif current and line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{field} of mapping {addr:#x}")


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def address_of(view: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def chunks(seq, n):
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def stamp(view: mmap.mmap, page: int) -> None:
    view[page * PAGE_SIZE:page * PAGE_SIZE + 8] = (page | 1 << 63).to_bytes(8, "little")


def stamped(view: mmap.mmap, page: int) -> bool:
    return view[page * PAGE_SIZE:page * PAGE_SIZE + 8] == (page | 1 << 63).to_bytes(8, "little")


# ---- fixtures ---------------------------------------------------------------------------


class ThpGuest:
    """A memfd whose "VMM" mapping asks for huge pages, fully touched."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.huge = pmd_size()
        self.fd = os.memfd_create("thp-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.view = mmap.mmap(self.fd, size)
        self.view.madvise(mmap.MADV_HUGEPAGE)
        shmem_huge_before = meminfo("ShmemHugePages")
        for page in range(size // PAGE_SIZE):
            stamp(self.view, page)
        self.pmd_mapped = smaps_bytes(address_of(self.view), "ShmemPmdMapped")
        self.shmem_huge_gain = meminfo("ShmemHugePages") - shmem_huge_before
        self.mem = GuestMemory()
        self.mem.add_region(os.dup(self.fd), 0, size, UADDR, 0)

    def pages_of(self, huge_index: int) -> list[int]:
        per = self.huge // PAGE_SIZE
        return list(range(huge_index * per, (huge_index + 1) * per))

    def close(self) -> None:
        self.mem.close()
        self.view.close()
        os.close(self.fd)


@pytest.fixture
def thp_guest(shmem_thp_advise):
    guest = ThpGuest(64 * MiB)
    try:
        if guest.pmd_mapped != guest.size or guest.shmem_huge_gain < guest.size:
            pytest.skip(
                f"THP not available: a MADV_HUGEPAGE memfd of {guest.size >> 20} MiB got "
                f"{guest.pmd_mapped >> 20} MiB PMD-mapped, ShmemHugePages +{guest.shmem_huge_gain >> 20} MiB"
            )
        yield guest
    finally:
        guest.close()


def balloon(tracker: HugePageTracker, pfns: list[int], *, at_target: bool = False) -> DiscardStats:
    """What the session does per inflate buffer: bitmap, tracker, policy, discard."""
    total = DiscardStats()
    for batch in chunks(pfns, BATCH):
        up = tracker.memory.balloon_update(PfnArray.from_list(batch), inflate=True)
        ranges = tracker.inflated(up.changed)
        if tracker.flush_due(guest_at_target=at_target):
            ranges = ranges + tracker.collect()
        total.add(tracker.discard(ranges))
    return total


# ---- THP --------------------------------------------------------------------------------


def _scatter(guest: ThpGuest, rng: random.Random, n_whole: int, n_partial: int, per_partial: int):
    hps = rng.sample(range(guest.size // guest.huge), n_whole + n_partial)
    whole, partial = hps[:n_whole], hps[n_whole:]
    pfns = [p for h in whole for p in guest.pages_of(h)]
    partial_pages = [p for h in partial for p in rng.sample(guest.pages_of(h), per_partial)]
    pfns += partial_pages
    rng.shuffle(pfns)
    return whole, partial, partial_pages, pfns


def test_thp_random_order_frees_whole_huge_pages_with_one_call_each_and_no_split(thp_guest):
    g = thp_guest
    tracker = HugePageTracker(g.mem, FlushPolicy(HugePolicy.WHOLE))
    [(index, backing)] = tracker.configure_regions()
    assert (index, backing.kind, backing.thp, backing.huge_page_size) == (0, "shmem", "advise", g.huge)
    assert g.mem.regions[0].huge_page_size == g.huge and g.mem.regions[0].thp

    whole, partial, partial_pages, pfns = _scatter(g, random.Random(4), 12, 4, 200)
    splits, shmem_huge, blocks = vmstat("thp_split_page"), meminfo("ShmemHugePages"), allocated(g.fd)

    stats = balloon(tracker, pfns)

    assert vmstat("thp_split_page") == splits, "a THP was split"
    assert (stats.huge_pages_whole, stats.splits) == (12, 0)
    assert stats.bytes_freed == stats.bytes_shmem == 12 * g.huge and stats.bytes_failed == 0
    assert stats.syscalls == stats.ranges <= 12  # one call per huge page, fewer where neighbours merged
    assert blocks - allocated(g.fd) == 12 * g.huge  # exactly: the partial ones are all still there
    assert shmem_huge - meminfo("ShmemHugePages") == 12 * g.huge
    # The partly ballooned huge pages are still whole THPs in the VMM's mapping.
    assert smaps_bytes(address_of(g.view), "ShmemPmdMapped") == g.size - 12 * g.huge
    state = tracker.state()
    assert (state.collectable_bytes, state.held_bytes) == (len(partial_pages) * PAGE_SIZE, 0)
    assert 0 <= state.oldest_age < 60
    assert not tracker.flush_due(guest_at_target=True)  # whole: never
    for h in partial:  # ballooned-but-pending pages keep their contents too
        assert all(stamped(g.view, p) for p in g.pages_of(h))


def test_thp_partial_pages_are_freed_by_a_flush_splitting_each_huge_page_once(thp_guest):
    g = thp_guest
    tracker = HugePageTracker(g.mem, FlushPolicy(HugePolicy.WHOLE))
    tracker.configure_regions()
    whole, partial, partial_pages, pfns = _scatter(g, random.Random(5), 6, 4, 200)
    balloon(tracker, pfns)
    # The guest takes 50 of the pending pages back before any flush.
    taken_back = partial_pages[:50]
    up = g.mem.balloon_update(PfnArray.from_list(taken_back), inflate=False)
    assert tracker.deflated(up.changed) == 50
    stamp(g.view, taken_back[0])  # and writes to one of them

    tracker.policy = FlushPolicy(HugePolicy.EAGER)
    assert tracker.flush_due()
    splits, blocks, shmem_huge = vmstat("thp_split_page"), allocated(g.fd), meminfo("ShmemHugePages")
    stats = tracker.discard(tracker.collect())

    freed_pages = len(partial_pages) - 50
    assert blocks - allocated(g.fd) == freed_pages * PAGE_SIZE
    assert stats.bytes_freed == freed_pages * PAGE_SIZE and stats.huge_pages_whole == 0
    assert stats.splits == len(partial) == 4
    assert vmstat("thp_split_page") - splits == 4  # >= 4 on a busy machine
    assert shmem_huge - meminfo("ShmemHugePages") == 4 * g.huge
    assert tracker.state().collectable_bytes == 0
    assert all(stamped(g.view, p) for p in taken_back)  # never freed after the deflate
    assert not any(stamped(g.view, p) for p in partial_pages[50:])  # read last: reading refills


def test_thp_eager_frees_each_batch_at_once_and_counts_each_split_once(thp_guest):
    g = thp_guest
    tracker = HugePageTracker(g.mem, FlushPolicy(HugePolicy.EAGER))
    tracker.configure_regions()
    rng = random.Random(6)
    pages = rng.sample(g.pages_of(3), 300) + rng.sample(g.pages_of(9), 300)
    rng.shuffle(pages)
    blocks, splits = allocated(g.fd), vmstat("thp_split_page")

    stats = balloon(tracker, pages)  # 3 buffers, each cutting into both huge pages

    assert blocks - allocated(g.fd) == 600 * PAGE_SIZE
    assert stats.splits == 2 and vmstat("thp_split_page") - splits == 2
    assert tracker.state().collectable_bytes == 0

    # Huge page 3 completes (freed whole), the guest takes it all back and
    # touches it: a fresh THP.  Cutting into it again is a new split.
    stats = balloon(tracker, sorted(set(g.pages_of(3)) - set(pages)))
    assert (stats.huge_pages_whole, stats.splits) == (1, 0)
    up = g.mem.balloon_update(PfnArray.from_list(g.pages_of(3)), inflate=False)
    tracker.deflated(up.changed)
    for p in g.pages_of(3):
        stamp(g.view, p)
    assert smaps_bytes(address_of(g.view), "ShmemPmdMapped") == g.size - g.huge  # 9 is split
    splits = vmstat("thp_split_page")
    stats = balloon(tracker, g.pages_of(3)[:10] + g.pages_of(9)[:10])
    assert stats.splits == 1 and vmstat("thp_split_page") - splits == 1


def test_thp_whole_huge_pages_are_cheaper_than_pages(thp_guest):
    """Not a benchmark, a sanity check of why this exists: 16 MiB freed in
    whole huge pages costs 8 calls, page by page 4096 (and 8 splits)."""
    g = thp_guest
    tracker = HugePageTracker(g.mem, FlushPolicy(HugePolicy.WHOLE))
    tracker.configure_regions()
    pfns = [p for h in range(8) for p in g.pages_of(h)]
    random.Random(7).shuffle(pfns)
    whole = balloon(tracker, pfns)
    assert (whole.huge_pages_whole, whole.syscalls <= 8, whole.splits) == (8, True, 0)

    page_by_page = g.mem.discard_ranges(
        RangeList.from_list([(p << PAGE_SHIFT, PAGE_SIZE) for h in range(8, 16) for p in g.pages_of(h)])
    )
    assert page_by_page.syscalls == 8 * g.huge // PAGE_SIZE and page_by_page.splits == 8


def test_mapped_huge_bytes_sees_our_own_pmd_mappings(thp_guest):
    g = thp_guest
    assert mapped_huge_bytes(g.mem) == {0: 0}  # we touched nothing yet
    ctypes.string_at(g.mem.translate(5 * g.huge, 1), 1)  # read one byte, as a ring access would
    assert mapped_huge_bytes(g.mem) == {0: g.huge}


# ---- hugetlbfs ---------------------------------------------------------------------------

HUGETLB_PAGES = 8


@pytest.fixture
def hugetlb_reserved():
    """HUGETLB_PAGES more persistent huge pages for the test, given back after."""
    try:
        with reserved_huge_pages(HUGETLB_PAGES):
            yield meminfo("Hugepagesize")
    except HugePagesUnavailable as exc:
        pytest.skip(str(exc))


class HugetlbGuest:
    def __init__(self, huge: int, n: int) -> None:
        self.huge, self.size = huge, huge * n
        self.fd = os.memfd_create("hugetlb-guest", os.MFD_CLOEXEC | os.MFD_HUGETLB)
        os.ftruncate(self.fd, self.size)
        self.view = mmap.mmap(self.fd, self.size)
        for page in range(self.size // PAGE_SIZE):
            stamp(self.view, page)
        self.mem = GuestMemory()
        self.mem.add_region(os.dup(self.fd), 0, self.size, UADDR, 0)

    def pages_of(self, h: int) -> list[int]:
        per = self.huge // PAGE_SIZE
        return list(range(h * per, (h + 1) * per))

    def close(self) -> None:
        self.mem.close()
        self.view.close()
        os.close(self.fd)


@pytest.fixture
def hugetlb_guest(hugetlb_reserved):
    g = HugetlbGuest(hugetlb_reserved, HUGETLB_PAGES)
    yield g
    g.close()


@pytest.mark.parametrize("mode", list(HugePolicy))
def test_hugetlbfs_frees_only_whole_huge_pages_in_any_order(hugetlb_guest, mode):
    g = hugetlb_guest
    tracker = HugePageTracker(g.mem, FlushPolicy(mode, flush_after=0.0))
    [(_, backing)] = tracker.configure_regions()
    assert (backing.kind, backing.huge_page_size, backing.granule) == ("hugetlbfs", g.huge, g.huge)

    rng = random.Random(8)
    partial_pages = rng.sample(g.pages_of(2), 300) + rng.sample(g.pages_of(5), 300)
    pfns = g.pages_of(1) + g.pages_of(4) + g.pages_of(6) + partial_pages
    rng.shuffle(pfns)
    free, blocks = meminfo("HugePages_Free"), allocated(g.fd)

    stats = balloon(tracker, pfns, at_target=True)  # at target: auto would flush whatever it can

    assert meminfo("HugePages_Free") - free == 3
    assert blocks - allocated(g.fd) == 3 * g.huge
    assert (stats.huge_pages_whole, stats.hugetlb_partial_bytes, stats.bytes_hugetlbfs) == (3, 0, 3 * g.huge)
    assert tracker.state() == PendingState(0, None, 600 * PAGE_SIZE)  # held, not collectable
    assert not tracker.flush_due(guest_at_target=True) and len(tracker.collect()) == 0
    assert all(stamped(g.view, p) for p in g.pages_of(2) + g.pages_of(5))

    # The rest of huge page 2 arrives much later: now it is whole.
    rest = sorted(set(g.pages_of(2)) - set(partial_pages))
    stats = balloon(tracker, rest)
    assert stats.huge_pages_whole == 1 and meminfo("HugePages_Free") - free == 4
    assert tracker.state().held_bytes == 300 * PAGE_SIZE


def test_hugetlbfs_partial_punch_only_zeroes(hugetlb_guest):
    """Why partial hugetlbfs pages are never flushed: the kernel accepts the
    punch, zeroes the range and frees nothing."""
    g = hugetlb_guest
    HugePageTracker(g.mem).configure_regions()
    free = meminfo("HugePages_Free")
    page = g.pages_of(3)[7]
    stats = g.mem.discard_ranges(RangeList.from_list([(page << PAGE_SHIFT, PAGE_SIZE)]))
    assert (stats.bytes_freed, stats.hugetlb_partial_bytes, stats.huge_pages_whole) == (PAGE_SIZE, PAGE_SIZE, 0)
    assert meminfo("HugePages_Free") == free and allocated(g.fd) == g.size
    assert g.view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] == bytes(PAGE_SIZE)
    assert stamped(g.view, page + 1)


# ---- backing detection ----------------------------------------------------------------------


def _fstype_of(path: str) -> str:
    """Filesystem type of the mount holding path, from /proc/self/mountinfo."""
    best, fstype = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4]
            if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(best):
                best, fstype = mount_point, line.split(" - ", 1)[1].split()[0]
    return fstype


def test_backing_of_memfd_hugetlb_memfd_tmpfs_file_and_regular_file(tmp_path):
    fd = os.memfd_create("detect", os.MFD_CLOEXEC)
    try:
        b = detect_backing(fd)
        assert b.kind == "shmem" and fd_backing(fd)[0] == "shmem"
        assert (b.thp, b.thp_setting) == shmem_thp(fd)
        # Plain shmem is counted in 2 MiB blocks too (to free across buffers).
        assert b.granule == (pmd_size() if b.thp != "no" else BATCH_GRANULE)
    finally:
        os.close(fd)

    try:
        fd = os.memfd_create("detect-huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"no MFD_HUGETLB here: {exc}")
    try:
        assert detect_backing(fd) == Backing("hugetlbfs", meminfo("Hugepagesize"), "no", f"hugetlbfs page size {meminfo('Hugepagesize')}")
    finally:
        os.close(fd)

    if os.path.isdir("/dev/shm") and _fstype_of("/dev/shm") == "tmpfs":
        path = f"/dev/shm/vb-detect-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            b = detect_backing(fd)
            assert b.kind == "shmem"
            top = bracketed(os.path.join(THP_SYSFS, "shmem_enabled"))
            if top not in ("deny", "force"):  # else those override the mount
                assert "tmpfs /dev/shm huge=" in b.thp_setting
        finally:
            os.close(fd)
            os.unlink(path)

    directory = next((d for d in ("/tmp", "/var/tmp", str(tmp_path), os.getcwd())
                      if _fstype_of(d) not in ("tmpfs", "hugetlbfs", "ramfs", "")), None)
    if directory is None:
        pytest.skip("no directory on a disk filesystem for the plain-file case")
    path = os.path.join(directory, f"vb-detect-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, MiB)
        assert detect_backing(fd) == Backing("file", PAGE_SIZE, "no", None)
        with GuestMemory() as mem:
            mem.add_region(os.dup(fd), 0, MiB, UADDR, 0)
            tracker = HugePageTracker(mem)
            tracker.configure_regions()
            info = mem.regions[0]
            assert (info.backing, info.huge_page_size, info.thp, info.track_configured) == ("file", PAGE_SIZE, False, True)
            assert tracker.configure_regions() == []  # configured once
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.mark.parametrize(
    "top, per_size, verdict",
    [
        ("never", "inherit", "no"),
        ("never", "always", "no"),  # a memfd needs the top-level switch on (anon shared would not)
        ("advise", "inherit", "advise"),
        ("advise", "never", "no"),
        ("advise", "always", "yes"),
        ("always", "inherit", "yes"),
        ("always", "advise", "advise"),
        ("within_size", None, "yes"),
        ("deny", "always", "no"),
        ("force", "never", "yes"),
    ],
)
def test_memfd_thp_verdict_follows_sysfs(tmp_path, top, per_size, verdict):
    """Against a sysfs tree written here, so every combination runs; the
    combinations were checked on the real knobs of Linux 6.18."""
    choices = "always within_size advise never deny force".split()
    (tmp_path / "shmem_enabled").write_text(" ".join(f"[{c}]" if c == top else c for c in choices) + "\n")
    (tmp_path / "hpage_pmd_size").write_text(f"{2 * MiB}\n")
    if per_size is not None:
        (tmp_path / "hugepages-2048kB").mkdir()
        per_choices = "always inherit within_size advise never".split()
        (tmp_path / "hugepages-2048kB" / "shmem_enabled").write_text(
            " ".join(f"[{c}]" if c == per_size else c for c in per_choices) + "\n"
        )
    fd = os.memfd_create("verdict", os.MFD_CLOEXEC)
    try:
        b = detect_backing(fd, thp_root=str(tmp_path))
        assert (b.kind, b.thp) == ("shmem", verdict)
        assert b.granule == 2 * MiB  # a huge page, or a block of plain shmem (BATCH_GRANULE)
        assert f"shmem_enabled={top}" in b.thp_setting
    finally:
        os.close(fd)


# ---- policy ----------------------------------------------------------------------------------


def test_flush_policy_decisions():
    nothing = PendingState(0, None, held_bytes=50 * MiB)
    young_small = PendingState(MiB, 0.5)
    old_small = PendingState(MiB, 6.0)
    young_big = PendingState(1024 * MiB, 0.1)  # the default bound

    whole = FlushPolicy("whole")
    assert not any(whole.should_flush(s, guest_at_target=True) for s in (nothing, young_small, old_small, young_big))
    assert whole.flush_delay(old_small) is None

    eager = FlushPolicy(HugePolicy.EAGER)
    assert eager.should_flush(young_small) and not eager.should_flush(nothing)
    assert eager.flush_delay(young_small) == 0.0 and eager.flush_delay(nothing) is None

    auto = FlushPolicy()
    assert (auto.mode, auto.flush_bytes, auto.flush_after) == (HugePolicy.AUTO, 1024 * MiB, 5.0)
    assert not auto.should_flush(young_small)
    assert auto.should_flush(young_small, guest_at_target=True)
    assert auto.should_flush(old_small) and auto.should_flush(young_big)
    assert not auto.should_flush(nothing, guest_at_target=True)  # hugetlbfs pages wait for their huge page
    assert auto.flush_delay(young_small) == pytest.approx(4.5)
    assert auto.flush_delay(old_small) == 0.0 and auto.flush_delay(nothing) is None
    with pytest.raises(ValueError):
        FlushPolicy("sometimes")
    with pytest.raises(ValueError):
        FlushPolicy(flush_after=-1)


def test_tracker_state_ages_pending_pages_and_describes_itself(shmem_thp_advise):
    fd = os.memfd_create("age", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * MiB)
    try:
        with GuestMemory() as mem:
            mem.add_region(os.dup(fd), 0, 4 * MiB, UADDR, 0)
            tracker = HugePageTracker(mem)
            tracker.configure_regions()
            up = mem.balloon_update(PfnArray.from_list([1, 2, 3]), inflate=True)
            assert len(tracker.inflated(up.changed)) == 0
            _, since = mem.pending()
            state = tracker.state(now_ns=since + 2_000_000_000)
            assert state == PendingState(3 * PAGE_SIZE, 2.0, 0)
            assert tracker.policy.flush_delay(state) == pytest.approx(3.0)
            assert tracker.policy.should_flush(tracker.state(now_ns=since + 5_000_000_000))
            d = tracker.describe()
            assert d["huge-page-policy"] == "auto" and d["pending-bytes"] == 3 * PAGE_SIZE
            assert d["regions"][0]["backing"] == "shmem" and d["regions"][0]["huge-page-size"] == pmd_size()
            assert tracker.collect().tolist() == [(PAGE_SIZE, 3 * PAGE_SIZE)]
            assert tracker.state() == PendingState(0, None, 0)
    finally:
        os.close(fd)
