"""Page state on disk (server/persist.py, csrc/persist.c), without a back-end
process: real memfds, real files in the state directory, the real native
tracker.  The restart under a running guest is tests/test_persist_restart.py."""

from __future__ import annotations

import json
import os
import random

import pytest

from vhostballoon.device.queues import QueueRole
from vhostballoon.device.hugepages import FlushPolicy, HugePageTracker, HugePolicy
from vhostballoon.native import PAGE_SIZE, GuestMemory, MemoryTableError, PfnArray
from vhostballoon.server.persist import JOURNAL_FILE, SNAPSHOT_FILE, PageStore, SessionPersistence

MiB = 1 << 20
HUGE = 2 * MiB
UADDR = 0x7F00_0000_0000

# Odd layouts on purpose: a region whose mmap offset is not huge-aligned (its
# first and last huge pages are partial), a region whose page count is not a
# multiple of 64 (the bitmap's last word is partial), two regions in one memfd.
LAYOUT = [  # gpa, size, mmap_offset
    (0x0, 6 * MiB + 12 * PAGE_SIZE, 0),
    (0x1000_0000, 5 * MiB, 7 * MiB + 3 * PAGE_SIZE),
    (0x2000_0000, 4 * MiB, 13 * MiB),
]
FILE_SIZE = 17 * MiB


def make_memory(fd: int, layout=LAYOUT, granule: int = HUGE) -> tuple[GuestMemory, HugePageTracker]:
    memory = GuestMemory()
    for i, (gpa, size, offset) in enumerate(layout):
        memory.add_region(os.dup(fd), gpa, size, UADDR + i * (1 << 32), offset)
    for r in memory.regions:
        memory.configure_huge_pages(r.index, granule, "shmem", True)
    return memory, HugePageTracker(memory, FlushPolicy(HugePolicy.WHOLE))


@pytest.fixture
def memfd():
    fd = os.memfd_create("vb-persist-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, FILE_SIZE)
    yield fd
    os.close(fd)


def all_pfns(layout=LAYOUT) -> list[int]:
    return [(gpa >> 12) + p for gpa, size, _ in layout for p in range(size >> 12)]


def inflate(memory, huge, pfns, persist=None):
    update = memory.balloon_update(PfnArray.from_list(pfns), inflate=True)
    ranges = huge.inflated(update.changed)
    if persist is not None:
        persist.record_batch(QueueRole.INFLATE, update.changed)
    return ranges


def deflate(memory, huge, pfns, persist=None):
    update = memory.balloon_update(PfnArray.from_list(pfns), inflate=False)
    huge.deflated(update.changed)
    if persist is not None:
        persist.record_batch(QueueRole.DEFLATE, update.changed)


def state_of(memory) -> list[tuple[bytes, bytes, int, int]]:
    return [(memory.export_ballooned(r.index), memory.export_pending(r.index), r.ballooned_pages, r.pending_pages)
            for r in memory.regions]


def test_native_export_import_round_trip_on_odd_layouts(memfd):
    old, old_huge = make_memory(memfd)
    rng = random.Random(5)
    pfns = all_pfns()
    rng.shuffle(pfns)
    inflate(old, old_huge, pfns[: len(pfns) // 2])
    assert old.pending_bytes > 0
    saved = state_of(old)

    new, new_huge = make_memory(memfd)
    for r, (ballooned, pending, _, _) in zip(new.regions, saved):
        new.import_ballooned(r.index, ballooned)
        new.import_pending(r.index, pending)
    assert state_of(new) == saved
    # The counts behind the bitmaps came back too: the same next inflate
    # completes the same huge pages in both, and the same pages stay pending.
    rest = pfns[len(pfns) // 2:]
    assert inflate(new, new_huge, rest).tolist() == inflate(old, old_huge, rest).tolist()
    assert state_of(new) == state_of(old)
    assert new.collect_pending().tolist() == old.collect_pending().tolist()


def test_native_import_refuses_a_region_in_use_and_a_wrong_size(memfd):
    memory, huge = make_memory(memfd)
    inflate(memory, huge, all_pfns()[:3])
    with pytest.raises(MemoryTableError, match="already has 3 ballooned pages"):
        memory.import_ballooned(0, memory.export_ballooned(0))
    with pytest.raises(MemoryTableError, match="bitmap of 8 bytes"):
        memory.import_ballooned(1, bytes(8))


def persistence(directory, memory, huge) -> SessionPersistence:
    return SessionPersistence(PageStore(directory), memory, huge, snapshot_interval=3600)


def test_journal_carries_what_came_after_the_snapshot(tmp_path, memfd):
    memory, huge = make_memory(memfd)
    persist = persistence(tmp_path, memory, huge)
    persist.start(inflate_base=0, actual=0)  # snapshot of the empty balloon
    pfns = all_pfns()
    random.Random(9).shuffle(pfns)
    inflate(memory, huge, pfns[:1000], persist)
    persist.snapshot("test")
    inflate(memory, huge, pfns[1000:2500], persist)  # only in the journal
    deflate(memory, huge, pfns[2000:2300], persist)  # taken back after the snapshot
    persist.record_actual(2200)
    expected = state_of(memory)
    # SIGKILL: no close(), no last snapshot.  (The mapping is the kernel's.)
    persist.journal.close()

    again, again_huge = make_memory(memfd)
    restored = persistence(tmp_path, again, again_huge).restore(inflate_base=7)
    assert restored is not None and restored.journal_records == 3  # inflate, deflate, actual
    assert state_of(again) == expected
    assert restored.ballooned_pages == 2200 and restored.actual == 2200
    pending = {gpa >> 12 for gpa, length in again.collect_pending().tolist() for gpa in range(gpa, gpa + length, 4096)}
    assert pending.isdisjoint(pfns[2000:2300])  # deflated: never to be freed


def test_state_of_other_guest_memory_is_ignored(tmp_path, memfd, capsys):
    memory, huge = make_memory(memfd)
    persist = persistence(tmp_path, memory, huge)
    persist.start(inflate_base=1, actual=0)
    inflate(memory, huge, all_pfns()[:700], persist)
    persist.close()

    other = os.memfd_create("another-vm", os.MFD_CLOEXEC)  # same layout, another file: a new VM
    os.ftruncate(other, FILE_SIZE)
    try:
        new, new_huge = make_memory(other)
        assert persistence(tmp_path, new, new_huge).restore(inflate_base=1) is None
        assert new.ballooned_pages == 0
    finally:
        os.close(other)
    moved, moved_huge = make_memory(memfd, [(gpa + 0x4000_0000, size, off) for gpa, size, off in LAYOUT])
    assert persistence(tmp_path, moved, moved_huge).restore(inflate_base=1) is None
    assert moved.ballooned_pages == 0
    # a new driver (the guest rebooted): its inflate ring starts at 0
    same, same_huge = make_memory(memfd)
    assert persistence(tmp_path, same, same_huge).restore(inflate_base=0) is None
    assert same.ballooned_pages == 0
    same2, same2_huge = make_memory(memfd)
    assert persistence(tmp_path, same2, same2_huge).restore(inflate_base=1).ballooned_pages == 700


def test_damaged_snapshot_is_set_aside_and_ignored(tmp_path, memfd):
    memory, huge = make_memory(memfd)
    persist = persistence(tmp_path, memory, huge)
    persist.start(inflate_base=1, actual=0)
    inflate(memory, huge, all_pfns()[:50], persist)
    persist.close()
    doc = json.loads((tmp_path / SNAPSHOT_FILE).read_text())
    doc["regions"][1]["ballooned_bitmap"] = doc["regions"][1]["ballooned_bitmap"][:-8]  # torn bitmap
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps(doc))
    new, new_huge = make_memory(memfd)
    assert persistence(tmp_path, new, new_huge).restore(inflate_base=1) is None
    assert new.ballooned_pages == 0 and new.pending_bytes == 0  # nothing half-imported
    assert (tmp_path / "pages.damaged").exists() and not (tmp_path / SNAPSHOT_FILE).exists()

    (tmp_path / SNAPSHOT_FILE).write_bytes(b'{"version": 1, "epoch": 3')  # torn file
    assert persistence(tmp_path, new, new_huge).restore(inflate_base=1) is None


def test_journal_replay_stops_at_a_damaged_record(tmp_path, memfd):
    memory, huge = make_memory(memfd)
    persist = persistence(tmp_path, memory, huge)
    persist.start(inflate_base=1, actual=0)
    pfns = all_pfns()
    inflate(memory, huge, pfns[:10], persist)
    second_at = persist.journal.offset
    inflate(memory, huge, pfns[10:20], persist)
    persist.journal.close()
    with open(tmp_path / JOURNAL_FILE, "r+b") as f:  # one bit of the second record's PFNs
        f.seek(second_at + 16 + 4)
        byte = f.read(1)
        f.seek(second_at + 16 + 4)
        f.write(bytes([byte[0] ^ 1]))
    new, new_huge = make_memory(memfd)
    restored = persistence(tmp_path, new, new_huge).restore(inflate_base=1)
    assert restored.journal_records == 1 and new.ballooned_pages == 10


def test_a_new_snapshot_retires_the_journal(tmp_path, memfd):
    """Killed right after the rename of a new snapshot, before the journal
    was rewound: the old records (already in the snapshot) are not replayed."""
    memory, huge = make_memory(memfd)
    persist = persistence(tmp_path, memory, huge)
    persist.start(inflate_base=1, actual=0)
    pfns = all_pfns()
    inflate(memory, huge, pfns[:40], persist)
    deflate(memory, huge, pfns[:40], persist)
    inflate(memory, huge, pfns[40:45], persist)
    journal_before = (tmp_path / JOURNAL_FILE).read_bytes()
    persist.snapshot("test")
    persist.journal.close()
    (tmp_path / JOURNAL_FILE).write_bytes(journal_before)  # as if the rewind never happened
    new, new_huge = make_memory(memfd)
    restored = persistence(tmp_path, new, new_huge).restore(inflate_base=1)
    assert restored.journal_records == 0 and state_of(new) == state_of(memory)


def test_c_journal_records_read_back_and_refuse_what_does_not_fit(tmp_path):
    """The C queue workers append through PageJournal (csrc/persist.c); what
    they write must be what persist.Journal replays: same layout, zlib's CRC."""
    import zlib

    from vhostballoon.native import crc32
    from vhostballoon.server.persist import Journal

    data = bytes(range(256)) * 17
    assert crc32(data) == zlib.crc32(data) and crc32(b"") == 0 and crc32(data, 7) == zlib.crc32(data, 7)
    journal = Journal(tmp_path / JOURNAL_FILE, size=4096)
    try:
        journal.rewind(5)
        pfns = PfnArray.from_list([3, 1, 0xFFFFFFFF])
        assert journal.native.append(1, pfns) == 0
        assert journal.native.append(3) == 0
        assert journal.native.append(4, (1234).to_bytes(4, "little")) == 0
        assert journal.records(5) == [(1, bytes(pfns.view())), (3, b""), (4, (1234).to_bytes(4, "little"))]
        assert journal.records(4) == []  # another epoch: nothing
        big = PfnArray.from_list(range(1010))  # 4040 bytes of values: cannot fit after 76
        assert journal.native.append(2, big) == -1
        assert len(journal.records(5)) == 3
        assert journal.native.append(2, PfnArray.from_list(range(600))) == 1  # past half: snapshot soon
        assert journal.half_full()
        journal.rewind(6)
        assert journal.records(6) == [] and journal.offset == 0
    finally:
        journal.close()


async def test_a_journal_that_fills_is_snapshotted_by_the_session_and_drops_nothing(
    nursery, socket_path, tmp_path, logs, monkeypatch
):
    """The C queue threads append every batch to the journal; when it passes
    half full they wake the session, which snapshots and rewinds it.  With
    a 16 KiB journal a 32 MiB balloon of random pages (32 buffers of 256
    one-page ranges, 4 KiB of records each; Linux's descending runs would
    coalesce 16 pages to a record) fills it several times over: nothing may
    wait for long, nothing may be dropped, and the state written at the end
    holds the whole balloon."""
    from functools import partial

    from vhostballoon.server import persist
    from vhostballoon.server.daemon import run_backend
    from vhostballoon.server.service import BalloonService
    from vhostballoon.server.state import StateStore
    from vhostballoon.testing import model_guest

    from backend_support import wait_no_session

    MiB = 1 << 20
    monkeypatch.setattr(persist, "JOURNAL_BYTES", 16 * 1024)
    state_dir = tmp_path / "state"
    service = BalloonService(state=StateStore(state_dir, snapshot_interval=3600))
    await nursery.start(partial(run_backend, socket_path, service=service))
    async with model_guest(socket_path, ram_size=64 * MiB, order="random") as guest:
        service.set_target(32 * MiB)
        await guest.wait_for_target((32 * MiB) // PAGE_SIZE)
    await wait_no_session(service)  # its last snapshot is written as it ends
    reasons = [e.get("reason") for e in logs if e["event"] == "page snapshot written"]
    assert reasons.count("journal half full") >= 2, reasons
    assert not [e for e in logs if e["log_level"] == "error"], [e for e in logs if e["log_level"] == "error"]
    assert os.path.getsize(state_dir / JOURNAL_FILE) == 16 * 1024
    doc = json.loads((state_dir / SNAPSHOT_FILE).read_text())
    import base64
    import zlib

    bitmaps = [zlib.decompress(base64.b64decode(r["ballooned_bitmap"])) for r in doc["regions"]]
    assert sum(int.from_bytes(b, "little").bit_count() for b in bitmaps) == (32 * MiB) // PAGE_SIZE
    assert sum(r["ballooned"] for r in doc["regions"]) == (32 * MiB) // PAGE_SIZE


def test_a_format_1_state_with_pfn_records_is_still_replayed(tmp_path, memfd):
    """Before ranges, the journal held le32 PFN lists (kinds INFLATE and
    DEFLATE) under snapshot version 1: a back-end of format 2 replays them."""
    from vhostballoon.device.journal_kinds import JournalKind

    memory, huge = make_memory(memfd)
    persist = persistence(tmp_path, memory, huge)
    persist.start(inflate_base=0, actual=0)
    doc = json.loads((tmp_path / SNAPSHOT_FILE).read_text())
    doc["version"] = 1
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps(doc))
    pfns = all_pfns()
    random.Random(4).shuffle(pfns)
    inflate(memory, huge, pfns[:1500])
    deflate(memory, huge, pfns[1000:1200])
    assert persist.journal.append(JournalKind.INFLATE, PfnArray.from_list(pfns[:1500]))
    assert persist.journal.append(JournalKind.DEFLATE, PfnArray.from_list(pfns[1000:1200]))
    expected = state_of(memory)
    persist.journal.close()

    again, again_huge = make_memory(memfd)
    restored = persistence(tmp_path, again, again_huge).restore(inflate_base=7)
    assert restored is not None and restored.journal_records == 2
    assert state_of(again) == expected and restored.ballooned_pages == 1300


def test_a_journal_with_a_kind_it_does_not_know_is_not_replayed(tmp_path, memfd, capsys):
    """Skipping a record could skip a deflate: the state is ignored instead."""
    memory, huge = make_memory(memfd)
    persist = persistence(tmp_path, memory, huge)
    persist.start(inflate_base=0, actual=0)
    inflate(memory, huge, all_pfns()[:100], persist)
    assert persist.journal.append(99, b"\0\0\0\0")
    persist.journal.close()

    again, again_huge = make_memory(memfd)
    assert persistence(tmp_path, again, again_huge).restore(inflate_base=7) is None
    assert again.ballooned_pages == 0
    assert "unknown kinds" in capsys.readouterr().out
