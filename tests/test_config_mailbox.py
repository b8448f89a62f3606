"""The config space has one owner (csrc/config.c, native.ConfigMailbox): the
write rule, the log of changes of actual, "at target", and the numbers the C
side was generated from."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostballoon.device import config as layout
from vhostballoon.device.balloon import BalloonDevice, plain_actual_step
from vhostballoon.device.features import DEFAULT_FEATURES
from vhostballoon.native import ConfigAccessError, ConfigMailbox, ConfigWrite, GuestMemory, at_target, lib

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def pack(num_pages=0, actual=0, hint=0, poison=0) -> bytes:
    return struct.pack("<IIII", num_pages, actual, hint, poison)


def test_a_guest_write_takes_actual_and_poison_and_never_num_pages():
    m = ConfigMailbox()
    m.set_num_pages(100)
    bits = m.guest_write(0, pack(num_pages=7, actual=40, hint=9, poison=0xAA))
    values = m.read()
    assert (values.num_pages, values.actual, values.free_page_hint_cmd_id, values.poison_val) == (100, 40, 0, 0xAA)
    assert bits == ConfigMailbox.ACTUAL_CHANGED | ConfigMailbox.POISON_CHANGED | lib.VB_CONFIG_FIRST_WRITE
    assert m.take_writes() == [ConfigWrite(0, 40, 100)]
    assert m.take_writes() == []
    assert m.pack() == pack(100, 40, 0, 0xAA)


def test_a_partial_write_changes_only_what_it_touches():
    m = ConfigMailbox()
    m.set_num_pages(10)
    m.set_actual(3)
    m.set_poison(0x55)
    assert m.guest_write(layout.ACTUAL_OFFSET + 1, b"\x01") == ConfigMailbox.ACTUAL_CHANGED | lib.VB_CONFIG_FIRST_WRITE
    assert m.read().actual == 3 + 256 and m.read().poison_val == 0x55
    assert m.guest_write(layout.NUM_PAGES_OFFSET, b"\xff\xff") == 0  # num_pages is the device's
    assert m.read().num_pages == 10
    assert m.take_writes() == [ConfigWrite(3, 259, 10)]


@pytest.mark.parametrize("offset, data", [(14, b"abc"), (16, b"a"), (0, b""), (0, bytes(17))])
def test_a_write_outside_the_space_is_refused_with_its_values(offset, data):
    m = ConfigMailbox()
    with pytest.raises(ConfigAccessError) as info:
        m.guest_write(offset, data)
    assert f"offset {offset} size {len(data)}" in str(info.value) and "16-byte" in str(info.value)
    assert m.read().actual == 0 and m.take_writes() == []


def test_the_reader_thread_leaves_a_poison_change_to_the_session():
    m = ConfigMailbox()
    assert m.guest_write(0, pack(actual=5, poison=1), keep_poison=True) == ConfigMailbox.REFUSED
    assert m.read().actual == 0 and m.read().poison_val == 0 and m.take_writes() == []
    assert m.guest_write(0, pack(actual=5, poison=1)) & ConfigMailbox.POISON_CHANGED
    assert m.guest_write(0, pack(actual=6, poison=1), keep_poison=True) & ConfigMailbox.ACTUAL_CHANGED


def test_writes_are_logged_in_order_with_the_target_of_their_moment():
    m = ConfigMailbox()
    m.set_num_pages(512)
    for actual in (256, 512):
        m.guest_write(layout.ACTUAL_OFFSET, struct.pack("<I", actual))
    m.set_num_pages(0)
    bits = m.guest_write(layout.ACTUAL_OFFSET, struct.pack("<I", 0))
    assert bits & ConfigMailbox.AT_TARGET and not bits & lib.VB_CONFIG_FIRST_WRITE
    assert m.take_writes() == [ConfigWrite(0, 256, 512), ConfigWrite(256, 512, 512), ConfigWrite(512, 0, 0)]


def test_a_full_log_refuses_a_change_of_actual_until_it_is_drained():
    m = ConfigMailbox()
    accepted = 0
    while not m.guest_write(layout.ACTUAL_OFFSET, struct.pack("<I", accepted + 1)) & ConfigMailbox.REFUSED:
        accepted += 1
    assert accepted == 4096 and m.read().actual == 4096
    assert len(m.take_writes()) == 4096
    assert m.guest_write(layout.ACTUAL_OFFSET, struct.pack("<I", 1)) & ConfigMailbox.ACTUAL_CHANGED


@given(num_pages=st.integers(0, 1 << 20), pages=st.integers(0, 1 << 21))
def test_at_target_is_one_definition(num_pages, pages):
    """C (the reader thread, the inflate thread) and Python (the flush
    scheduler, the replay) ask the same function."""
    device = BalloonDevice(GuestMemory(), DEFAULT_FEATURES)
    device.config.num_pages, device.config.actual = num_pages, pages & 0xFFFFFFFF
    assert at_target(num_pages, pages) == (pages == num_pages)
    assert device.at_target() == at_target(num_pages, pages & 0xFFFFFFFF)
    assert plain_actual_step(0, pages, num_pages) == (not at_target(num_pages, pages))


def test_the_device_keeps_no_copy_of_the_config():
    device = BalloonDevice(GuestMemory(), DEFAULT_FEATURES)
    device.mailbox.guest_write(0, pack(actual=9, poison=3))  # as the reader thread would
    assert device.config.actual == 9 and device.config.poison_val == 3
    assert device.read_config(0, layout.CONFIG_SIZE) == pack(0, 9, 0, 3)
    assert device.describe()["actual-pages"] == 9 and device.poisoning


def test_no_c_file_restates_a_generated_constant():
    """The numbers the generated header carries are not written again by hand
    in the C runtime (front.c had its own request codes and offsets)."""
    for path in CSRC.glob("*.c"):
        text = path.read_text()
        assert not re.search(r"#define\s+\w+\s+(24|25)\b", text), path.name
        assert not re.search(r"#define\s+OFF_\w+", text), path.name
