"""Pure rules of issue 5: which reported ranges are freed, feature offers,
stats decoding, the control commands.  No sockets, one small memfd."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest

from vhostballoon.cli import _daemon_parser
from vhostballoon.device.features import (
    DEFAULT_FEATURES,
    IMPLEMENTED_FEATURES,
    RING_FEATURES,
    BalloonFeature,
    FeatureSpecError,
    parse_feature_spec,
)
from vhostballoon.device.queues import queues_needed
from vhostballoon.device.reporting import Invalid, Skip, _overlapping, plan_report
from vhostballoon.device.stats import STAT_NAMES, decode_stats, stat_name
from vhostballoon.native import DescRange, GuestMemory, PfnArray
from vhostballoon.server.control import execute_line
from vhostballoon.server.service import BalloonService

MiB = 1 << 20
PAGE = 4096


# ---- --features ---------------------------------------------------------------------

F = BalloonFeature


@pytest.mark.parametrize(
    "spec, balloon",
    [
        ("all", IMPLEMENTED_FEATURES),
        ("none", 0),
        ("stats,reporting", F.STATS_VQ | F.REPORTING),
        ("-reporting", IMPLEMENTED_FEATURES & ~F.REPORTING),
        ("-poison,-oom", IMPLEMENTED_FEATURES & ~F.PAGE_POISON & ~F.DEFLATE_ON_OOM),
        ("none,+must-tell-host,deflate-on-oom", F.MUST_TELL_HOST | F.DEFLATE_ON_OOM),
        ("all,-stats,stats", IMPLEMENTED_FEATURES),
        (" Stats , Free-Page-Reporting ", F.STATS_VQ | F.REPORTING),
    ],
)
def test_feature_spec(spec, balloon):
    assert parse_feature_spec(spec) == int(balloon) | RING_FEATURES


def test_default_offer_is_everything_implemented_and_never_free_page_hint():
    assert DEFAULT_FEATURES == parse_feature_spec("all")
    assert not DEFAULT_FEATURES & F.FREE_PAGE_HINT
    # inflate, deflate, stats, reporting, range-inflate, range-deflate
    assert queues_needed(DEFAULT_FEATURES) == 6
    assert queues_needed(parse_feature_spec("-stats")) == 5
    assert queues_needed(parse_feature_spec("-ranges")) == 4  # what a stock Linux guest uses


@pytest.mark.parametrize(
    "spec, message",
    [("", "empty item"), ("stats,,oom", "empty item"), ("balloon", "unknown feature 'balloon'"),
     ("free-page-hint", "free page hinting is not implemented")],
)
def test_bad_feature_specs_say_what_is_known(spec, message):
    with pytest.raises(FeatureSpecError, match=message) as info:
        parse_feature_spec(spec)
    if "unknown" in message:
        assert "known: all, none, must-tell-host, stats, oom, poison, reporting" in str(info.value)


def test_daemon_flags_parse_features_and_stats_interval(capsys):
    args = _daemon_parser().parse_args(["--socket-path", "x", "--features=-reporting", "--stats-interval", "0"])
    assert args.features == parse_feature_spec("-reporting") and args.stats_interval == 0
    assert _daemon_parser().parse_args(["--socket-path", "x"]).features == DEFAULT_FEATURES
    for bad in (["--features", "bogus"], ["--stats-interval", "-1"], ["--stats-interval", "soon"]):
        with pytest.raises(SystemExit):
            _daemon_parser().parse_args(["--socket-path", "x", *bad])
    assert "--features" in capsys.readouterr().err


# ---- report validation -------------------------------------------------------------


@pytest.fixture
def memory():
    fd = os.memfd_create("reporting-rules", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * MiB)
    mem = GuestMemory()
    mem.add_region(fd, 0, 32 * MiB, 0x7F00_0000_0000, 0)  # owns fd now
    mem.add_region(os.dup(fd), 64 * MiB, 32 * MiB, 0x7F10_0000_0000, 32 * MiB)
    yield mem
    mem.close()


def d(addr, length):
    return DescRange(addr, length, 2)


def test_overlap_sweep_matches_brute_force():
    rng = random.Random(5)
    for _ in range(300):
        entries = [(i, d(rng.randrange(0, 64) * PAGE, rng.randrange(1, 8) * PAGE)) for i in range(rng.randrange(1, 12))]
        brute = {
            i for i, a in entries for j, b in entries
            if i != j and a.addr < b.addr + b.length and b.addr < a.addr + a.length
        }
        assert _overlapping(entries) == brute


def test_entries_across_regions_and_gaps_are_outside(memory):
    plan = plan_report(
        [d(30 * MiB, 4 * MiB), d(40 * MiB, 2 * MiB), d(64 * MiB, 2 * MiB), d(2 * MiB, 2 * MiB)],
        memory, poison=False, whole_huge_pages_only=False,
    )
    assert [(x.addr, r) for x, r in plan.invalid] == [(30 * MiB, Invalid.OUTSIDE), (40 * MiB, Invalid.OUTSIDE)]
    assert plan.free == [(64 * MiB, 2 * MiB), (2 * MiB, 2 * MiB)]


def test_partial_huge_pages_are_kept_on_hugetlbfs_and_under_the_whole_policy(memory):
    # Pretend region 0 is THP-backed shmem and region 1 (file offset 32 MiB)
    # hugetlbfs, both with 2 MiB huge pages.
    memory.configure_huge_pages(0, 2 * MiB, "shmem", True)
    memory.configure_huge_pages(1, 2 * MiB, "hugetlbfs", False)
    thp_entry = d(2 * MiB + 64 * PAGE, 3 * MiB)  # [2.25, 5.25) MiB: no whole 2 MiB page inside
    hugetlb_entry = d(65 * MiB, 4 * MiB)  # file [33, 37) MiB: one whole huge page, [34, 36)
    plan = plan_report([thp_entry, hugetlb_entry], memory, poison=False, whole_huge_pages_only=True)
    assert plan.free == [(66 * MiB, 2 * MiB)]
    assert plan.skipped == {Skip.WOULD_SPLIT: 3 * MiB, Skip.HUGETLBFS_PARTIAL: 2 * MiB}
    assert plan.unnatural == [thp_entry, hugetlb_entry]
    # Other policies may split a THP (counted by the discard engine); hugetlbfs never.
    plan = plan_report([thp_entry, hugetlb_entry], memory, poison=False, whole_huge_pages_only=False)
    assert plan.free == [(thp_entry.addr, 3 * MiB), (66 * MiB, 2 * MiB)]
    assert plan.skipped == {Skip.HUGETLBFS_PARTIAL: 2 * MiB}


def test_poison_keeps_everything_valid_and_balloon_pages_are_never_reported(memory):
    memory.balloon_update(PfnArray.from_list([(6 * MiB) // PAGE + 7]), inflate=True)
    entries = [d(4 * MiB, 2 * MiB), d(6 * MiB, 2 * MiB), d(8 * MiB, 0)]
    plan = plan_report(entries, memory, poison=True, whole_huge_pages_only=False)
    assert plan.free == [] and plan.skipped == {Skip.POISON: 2 * MiB}
    assert [r for _, r in plan.invalid] == [Invalid.ZERO_LENGTH, Invalid.IN_BALLOON]
    plan = plan_report(entries, memory, poison=False, whole_huge_pages_only=False)
    assert plan.free == [(4 * MiB, 2 * MiB)] and plan.reported_bytes == 4 * MiB


# ---- statistics ----------------------------------------------------------------------


def test_stats_decode_every_linux_tag_and_keep_unknown_ones_by_number():
    assert [STAT_NAMES[t] for t in (4, 5, 10, 15)] == [
        "stat-free-memory", "stat-total-memory", "stat-oom-kills", "stat-direct-reclaims",
    ]
    assert len(STAT_NAMES) == 16 and stat_name(16) == "stat-tag-16"
    data = b"".join(struct.pack("<HQ", tag, value) for tag, value in [(4, 1 << 30), (99, 3), (4, 5)])
    assert decode_stats(data) == ({4: 5, 99: 3}, 0)  # a later duplicate wins
    assert decode_stats(data + b"\x01\x02\x03") == ({4: 5, 99: 3}, 3)


# ---- control commands ------------------------------------------------------------------


def run(service, obj) -> dict:
    return execute_line(service, json.dumps(obj).encode())


def test_query_stats_and_set_stats_interval_commands():
    service = BalloonService()
    got = run(service, {"execute": "query-stats"})["return"]
    assert got["stats"] == {} and got["connected"] is False and got["age-seconds"] is None
    assert got["stats-interval"] == 5.0
    assert run(service, {"execute": "set-stats-interval", "arguments": {"interval": 2}}) == {
        "return": {"stats-interval": 2.0}
    }
    assert run(service, {"execute": "query-balloon"})["return"]["stats-interval"] == 2.0
    for bad in ({"interval": -1}, {"seconds": 2}, {}):
        reply = run(service, {"execute": "set-stats-interval", "arguments": bad})
        assert reply["error"]["class"] == "GenericError"
    assert service.stats_interval == 2.0
    assert "error" in run(service, {"execute": "query-stats", "arguments": {"x": 1}})


def test_ctl_prints_stats_with_sizes(capsys):
    from vhostballoon.ctl import _print_stats

    _print_stats({"stats": {"stat-free-memory": 512 << 20, "stat-minor-faults": 7}, "age-seconds": 1.5,
                  "stats-interval": 5.0, "updates": 3, "connected": True, "negotiated": True})
    out = capsys.readouterr().out
    assert "stat-free-memory   536870912 (512.0 MiB)" in out and "stat-minor-faults  7\n" in out
    assert "age-seconds        1.5" in out
    _print_stats({"stats": {}, "connected": False, "negotiated": False})
    assert "no statistics: no front-end is connected" in capsys.readouterr().out
