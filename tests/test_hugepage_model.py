"""The native huge page tracker against a small pure-Python reference model.

Nothing is freed here: the ranges the tracker hands out are collected and
compared, page by page, with what the model says may be freed, for any
sequence of inflate and deflate batches (any order, duplicates, PFNs outside
guest memory) and flushes, under each policy.  The regions are real mappings
of a sparse memfd, tracked with small "huge pages" (16 and 64 KiB) so that
hypothesis reaches full, partial and straddling huge pages quickly; one
region starts at a file offset that is not huge-aligned and another is
marked hugetlbfs, whose partial pages no flush may take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostballoon.device.hugepages import FlushPolicy, HugePolicy, PendingState
from vhostballoon.native import PAGE_SHIFT, PAGE_SIZE, GuestMemory, PfnArray, RangeList

KiB = 1 << 10
MiB = 1 << 20
UADDR = 0x7F0000000000


@dataclass(frozen=True)
class Spec:
    gpa: int
    pages: int
    mmap_offset: int
    granule: int
    backing: str
    thp: bool

    @property
    def first_pfn(self) -> int:
        return self.gpa >> PAGE_SHIFT

    def pfns(self) -> range:
        return range(self.first_pfn, self.first_pfn + self.pages)


# R0 and R1 touch in guest-physical space (ranges must not merge across
# them); R1's file offset is 12 KiB, so its first and last 16 KiB huge pages
# are only partly inside it; R2 is "hugetlbfs", and R5 ends where it begins
# with whole huge pages on both sides; R3 and R4 are contiguous both in gpa
# and in the file, yet are two regions.
REGIONS = [
    Spec(0, 64, 0, 16 * KiB, "shmem", True),
    Spec(256 * KiB, 50, 12 * KiB, 16 * KiB, "shmem", True),
    Spec(1 * MiB, 64, 1 * MiB, 64 * KiB, "hugetlbfs", False),
    Spec(1 * MiB + 256 * KiB, 16, 2 * MiB, PAGE_SIZE, "shmem", False),
    Spec(1 * MiB + 320 * KiB, 16, 2 * MiB + 64 * KiB, PAGE_SIZE, "file", False),
    Spec(1 * MiB - 32 * KiB, 8, 3 * MiB, 16 * KiB, "shmem", True),
]
ALL_PFNS = sorted(p for spec in REGIONS for p in spec.pfns())
OUTSIDE = [REGIONS[0].first_pfn + 64 + 50 + 1, (4 * MiB) >> PAGE_SHIFT, 0xFFFFFFFF]
FLUSH_BYTES = 10 * PAGE_SIZE  # auto's size bound, small enough to be reached


def spec_of(pfn: int) -> Spec | None:
    for spec in REGIONS:
        if pfn in spec.pfns():
            return spec
    return None


def huge_page(spec: Spec, pfn: int) -> tuple[list[int], bool]:
    """The PFNs of pfn's huge page that lie in its region, and whether the
    whole huge page lies in it (alignment by file offset)."""
    ppg = spec.granule // PAGE_SIZE
    file_page = (spec.mmap_offset >> PAGE_SHIFT) + (pfn - spec.first_pfn)
    start = file_page // ppg * ppg
    members = [
        spec.first_pfn + fp - (spec.mmap_offset >> PAGE_SHIFT)
        for fp in range(start, start + ppg)
    ]
    inside = [p for p in members if p in spec.pfns()]
    return inside, len(inside) == ppg


class Model:
    """What may be freed when: a set-based restatement of csrc/track.c."""

    def __init__(self) -> None:
        self.ballooned: set[int] = set()
        self.pending: set[int] = set()

    def inflate(self, pfns: list[int]) -> set[int]:
        fresh = [p for p in dict.fromkeys(pfns) if spec_of(p) is not None and p not in self.ballooned]
        self.ballooned.update(fresh)
        freed = set()
        for p in fresh:
            spec = spec_of(p)
            if spec.granule == PAGE_SIZE:
                freed.add(p)
                continue
            members, whole = huge_page(spec, p)
            if whole and self.ballooned.issuperset(members):
                freed.update(members)
                self.pending.difference_update(members)
            else:
                self.pending.add(p)
        return freed

    def deflate(self, pfns: list[int]) -> None:
        gone = {p for p in pfns if p in self.ballooned}
        self.ballooned -= gone
        self.pending -= gone

    def collectable(self) -> set[int]:
        return {p for p in self.pending if spec_of(p).backing != "hugetlbfs"}

    def collect(self) -> set[int]:
        taken = self.collectable()
        self.pending -= taken
        return taken


def pages_of(ranges: RangeList) -> list[int]:
    out = []
    for gpa, length in ranges.tolist():
        assert gpa % PAGE_SIZE == 0 and length % PAGE_SIZE == 0 and length > 0
        first = gpa >> PAGE_SHIFT
        pages = list(range(first, first + (length >> PAGE_SHIFT)))
        # Each range lies in one region: the discard engine refuses others.
        assert spec_of(pages[0]) is not None and spec_of(pages[0]) is spec_of(pages[-1]), (gpa, length)
        out.extend(pages)
    return out


@pytest.fixture(scope="module")
def memfd():
    fd = os.memfd_create("model", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * MiB)  # sparse: nothing here is ever touched
    yield fd
    os.close(fd)


def index_of(mem: GuestMemory, spec: Spec) -> int:
    """The table keeps regions sorted by gpa, not in REGIONS order."""
    return next(r.index for r in mem.regions if r.gpa == spec.gpa)


def new_memory(memfd: int) -> GuestMemory:
    mem = GuestMemory()
    for spec in REGIONS:
        mem.add_region(os.dup(memfd), spec.gpa, spec.pages * PAGE_SIZE, UADDR + spec.gpa, spec.mmap_offset)
    for spec in REGIONS:
        mem.configure_huge_pages(index_of(mem, spec), spec.granule, spec.backing, spec.thp)
    return mem


pfn_lists = st.lists(st.sampled_from(ALL_PFNS + OUTSIDE), max_size=40)
# Runs of consecutive PFNs, shuffled: closer to what a guest sends, and they
# complete huge pages far more often than independent picks.
runs = st.builds(
    lambda start, length, perm: [ALL_PFNS[(start + i) % len(ALL_PFNS)] for i in perm(length)],
    st.integers(0, len(ALL_PFNS) - 1),
    st.integers(1, 48),
    st.just(lambda n: list(range(n))) | st.randoms(use_true_random=False).map(lambda r: lambda n: r.sample(range(n), n)),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("inflate"), pfn_lists | runs),
        st.tuples(st.just("deflate"), pfn_lists | runs),
        st.tuples(st.just("deadline"), st.just([])),
    ),
    max_size=30,
)


@pytest.mark.parametrize("mode", list(HugePolicy))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops)
def test_tracker_frees_exactly_what_the_model_frees(memfd, mode, script):
    policy = FlushPolicy(mode, flush_bytes=FLUSH_BYTES, flush_after=1.0)
    model = Model()
    deflated_since: set[int] = set()  # deflated and not inflated again since
    with new_memory(memfd) as mem:
        for op, pfns in script:
            ranges = RangeList(0)
            if op == "inflate":
                up = mem.balloon_update(PfnArray.from_list(pfns), inflate=True)
                deflated_since -= set(up.changed.tolist())
                ranges = mem.track_inflate(up.changed)
                want = model.inflate(pfns)
            elif op == "deflate":
                up = mem.balloon_update(PfnArray.from_list(pfns), inflate=False)
                mem.track_deflate(up.changed)
                deflated_since |= set(up.changed.tolist())
                model.deflate(pfns)
                want = set()
            else:
                want = set()
            # The session's question after every batch; "deadline" is the
            # timed flush firing, i.e. the oldest page has waited long enough.
            collectable, _ = mem.pending(collectable_only=True)
            age = 2.0 if op == "deadline" else 0.0
            if policy.should_flush(PendingState(collectable, age if collectable else None)):
                ranges = ranges + mem.collect_pending()
            model_flushes = (
                mode is HugePolicy.EAGER
                or (mode is HugePolicy.AUTO and (op == "deadline" or len(model.collectable()) * PAGE_SIZE >= FLUSH_BYTES))
            )
            if model_flushes:
                want |= model.collect()

            freed = pages_of(ranges)
            assert len(freed) == len(set(freed)), f"{op}: a page handed out twice in one batch: {ranges}"
            assert set(freed) == want, f"{op} {pfns}: tracker freed {sorted(set(freed))}, model {sorted(want)}"
            assert set(freed) <= model.ballooned, "freed a page that is not ballooned"
            assert not set(freed) & deflated_since, "freed a page after the guest took it back"
            assert mem.ballooned_pages == len(model.ballooned)
            total, _ = mem.pending()
            assert total == len(model.pending) * PAGE_SIZE
            assert mem.pending(collectable_only=True)[0] == len(model.collectable()) * PAGE_SIZE
            if mode is HugePolicy.WHOLE:
                # Never a partial huge page of a THP region: only whole ones
                # and the pages of regions without huge pages.
                for p in freed:
                    spec = spec_of(p)
                    assert spec.granule == PAGE_SIZE or huge_page(spec, p)[1]
            for p in freed:
                if spec_of(p).backing == "hugetlbfs":
                    assert huge_page(spec_of(p), p)[1], "a partial hugetlbfs huge page was handed out"


def test_whole_ranges_are_huge_aligned_by_file_offset(memfd):
    """R1 starts 12 KiB into its file: its huge pages start at gpa
    256 KiB + 4 KiB + 16 KiB * k, not at 16 KiB multiples of gpa."""
    with new_memory(memfd) as mem:
        spec = REGIONS[1]
        pfns = list(spec.pfns())[::-1]  # the whole region, descending like Linux
        up = mem.balloon_update(PfnArray.from_list(pfns), inflate=True)
        ranges = mem.track_inflate(up.changed)
        # 50 pages at file pages 3..52: whole huge pages are file pages 4..51
        # (12 of them, merged into one range), 1 page before, 1 after stay pending.
        assert ranges.tolist() == [(spec.gpa + PAGE_SIZE, 48 * PAGE_SIZE)]
        assert mem.pending()[0] == 2 * PAGE_SIZE
        assert mem.collect_pending().tolist() == [(spec.gpa, PAGE_SIZE), (spec.gpa + 49 * PAGE_SIZE, PAGE_SIZE)]


def test_hugetlbfs_pending_is_never_collected_and_completes_later(memfd):
    with new_memory(memfd) as mem:
        spec = REGIONS[2]  # 64 KiB huge pages: 16 PFNs each
        first = spec.first_pfn
        up = mem.balloon_update(PfnArray.from_list(list(range(first, first + 15))), inflate=True)
        assert len(mem.track_inflate(up.changed)) == 0
        assert len(mem.collect_pending()) == 0 and len(mem.collect_pending(index_of(mem, spec))) == 0
        assert mem.pending()[0] == 15 * PAGE_SIZE and mem.pending(collectable_only=True) == (0, None)
        up = mem.balloon_update(PfnArray.from_list([first + 15]), inflate=True)
        assert mem.track_inflate(up.changed).tolist() == [(spec.gpa, 64 * KiB)]
        assert mem.pending() == (0, None)


def test_tracker_never_frees_a_page_whose_deflate_it_was_not_told_of(memfd):
    """A caller that updates the bitmap but skips track_deflate must still
    not get a deflated page freed: the tracker checks the bitmap before it
    hands out a huge page or a pending page."""
    with new_memory(memfd) as mem:
        first = REGIONS[0].first_pfn  # 16 KiB huge pages: 4 PFNs each
        up = mem.balloon_update(PfnArray.from_list([first, first + 1, first + 2, first + 5]), inflate=True)
        assert len(mem.track_inflate(up.changed)) == 0
        mem.balloon_update(PfnArray.from_list([first + 1, first + 5]), inflate=False)  # no track_deflate
        up = mem.balloon_update(PfnArray.from_list([first + 3]), inflate=True)
        assert len(mem.track_inflate(up.changed)) == 0  # not whole after all
        assert pages_of(mem.collect_pending()) == [first, first + 2, first + 3]
        # Feeding PFNs that are not ballooned, or twice, changes nothing either.
        assert len(mem.track_inflate(PfnArray.from_list([first + 1, first + 1, first + 40]))) == 0
        assert mem.pending() == (0, None)


def test_track_inflate_in_regions_without_huge_pages_coalesces_at_once(memfd):
    with new_memory(memfd) as mem:
        r3, r4 = REGIONS[3], REGIONS[4]
        pfns = [r4.first_pfn + 1, r3.first_pfn + 15, r4.first_pfn, r3.first_pfn + 14, r3.first_pfn + 3, r3.first_pfn + 15]
        up = mem.balloon_update(PfnArray.from_list(pfns), inflate=True)
        ranges = mem.track_inflate(up.changed)
        # R3 ends where R4 begins (gpa and file): still two ranges.
        assert ranges.tolist() == [
            (r3.gpa + 3 * PAGE_SIZE, PAGE_SIZE),
            (r3.gpa + 14 * PAGE_SIZE, 2 * PAGE_SIZE),
            (r4.gpa, 2 * PAGE_SIZE),
        ]
        assert mem.pending() == (0, None)


def test_configure_refuses_bad_sizes_and_pending_regions(memfd):
    with new_memory(memfd) as mem:
        for bad in (0, 2048, 3 * PAGE_SIZE, 2 << 30):
            with pytest.raises(ValueError, match=f"huge page size {bad} is not a power of two"):
                mem.configure_huge_pages(0, bad, "shmem", True)
        with pytest.raises(ValueError, match="region 9 out of range"):
            mem.configure_huge_pages(9, 16 * KiB, "shmem", True)
        up = mem.balloon_update(PfnArray.from_list([1]), inflate=True)
        mem.track_inflate(up.changed)
        with pytest.raises(ValueError, match="region 0 has 1 pending pages"):
            mem.configure_huge_pages(0, 64 * KiB, "shmem", True)
        assert mem.collect_pending(0).tolist() == [(PAGE_SIZE, PAGE_SIZE)]  # R0 is first by gpa too
        # Reconfigured with a page ballooned (and freed) already: it counts.
        mem.configure_huge_pages(0, 16 * KiB, "shmem", True)
        up = mem.balloon_update(PfnArray.from_list([0, 2, 3]), inflate=True)
        assert mem.track_inflate(up.changed).tolist() == [(0, 16 * KiB)]
