"""The driver side of a virtio 1.x split virtqueue, laid out in guest RAM.

Layout (virtio 1.2, 2.7 "Split Virtqueues"; all fields little-endian)::

    descriptor table  16 * num    {le64 addr, le32 len, le16 flags, le16 next}
    available ring     6 + 2*num  {le16 flags, le16 idx, le16 ring[num], le16 used_event}
    used ring          6 + 8*num  {le16 flags, le16 idx, {le32 id, le32 len}[num], le16 avail_event}

The three parts sit back to back in the reserved area of guest RAM, the used
ring aligned to 64 bytes as Linux's virtio_pci (``SMP_CACHE_BYTES``) does, so
the back-end sees addresses that are not page aligned.

Behaviour follows Linux ``drivers/virtio/virtio_ring.c``: a buffer of more
than one segment goes through an indirect table when INDIRECT_DESC was
negotiated; the avail index is published right after the ring entry; with
EVENT_IDX the kick decision is ``vring_need_event(avail_event, new, old)`` and
every ``get_used`` re-arms the interrupt by writing ``used_event``.

This class does no I/O: it never kicks or waits. The ``publish_*`` methods
write deliberately broken rings for the back-end's bad-input tests.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .guest_ram import GuestRAM

# virtio 1.2, 2.7.5 "The Virtqueue Descriptor Table"
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
# virtio 1.2, 2.7.6 / 2.7.8
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
USED_ALIGN = 64  # Linux virtio_pci: vring_create_virtqueue(..., SMP_CACHE_BYTES, ...)
MAX_QUEUE_SIZE = 32768  # virtio 1.2, 2.7: Queue Size is at most 32768

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

Segment = tuple[int, int]  # (guest physical address, length)


class VirtqueueError(RuntimeError):
    """The driver was asked for something the ring cannot do (no free descriptors...)."""


class DeviceBugError(VirtqueueError):
    """The device wrote something into the used ring that no correct device writes."""


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Linux include/uapi/linux/virtio_ring.h: notify iff ``event`` lies in (old, new]."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@dataclass(frozen=True)
class RingLayout:
    index: int
    num: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int

    @staticmethod
    def sizes(num: int) -> tuple[int, int, int]:
        return DESC_SIZE * num, 6 + 2 * num, 6 + 8 * num


class DriverVirtqueue:
    """One split virtqueue as the guest driver sees it.

    ``add_buffer`` -> ``kick_needed`` (then the caller kicks) -> the device
    processes -> ``get_used`` returns ``(head, written_len)`` pairs.
    """

    def __init__(
        self,
        ram: GuestRAM,
        index: int,
        num: int = 128,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtqueueError(f"queue {index}: size {num} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        self.ram = ram
        self.mem = ram.mem
        self.index = index
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        desc_size, avail_size, used_size = RingLayout.sizes(num)
        self.desc_gpa = ram.alloc_reserved(desc_size + avail_size, align=4096)
        self.avail_gpa = self.desc_gpa + desc_size
        self.used_gpa = ram.alloc_reserved(used_size, align=USED_ALIGN)
        self.layout = RingLayout(index, num, self.desc_gpa, self.avail_gpa, self.used_gpa)
        self._avail_idx_gpa = self.avail_gpa + 2
        self._avail_ring_gpa = self.avail_gpa + 4
        self._used_event_gpa = self.avail_gpa + 4 + 2 * num
        self._used_idx_gpa = self.used_gpa + 2
        self._used_ring_gpa = self.used_gpa + 4
        self._avail_event_gpa = self.used_gpa + 4 + 8 * num
        self.mem[self.desc_gpa : self.used_gpa + used_size] = bytes(self.used_gpa + used_size - self.desc_gpa)
        # Free descriptor ids; pop() hands out 0, 1, 2, ... first, like Linux's free list.
        self._free: list[int] = list(range(num - 1, -1, -1))
        self._chains: dict[int, list[int]] = {}  # head -> descriptor ids it holds
        self._indirect_tables: dict[int, tuple[int, int]] = {}  # head -> (gpa, entries)
        self.avail_idx = 0  # free-running, as published
        self.last_used_idx = 0
        self._kicked_avail_idx = 0
        self.buffers_added = 0

    # -- normal operation --------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    def add_buffer(
        self,
        out_segments: Sequence[Segment] = (),
        in_segments: Sequence[Segment] = (),
        *,
        indirect: bool | None = None,
    ) -> int:
        """Publish one buffer (device-readable ``out`` segments, then
        device-writable ``in`` segments); returns its head descriptor id.

        ``indirect=None`` decides like Linux (indirect iff negotiated and more
        than one segment); True forces an indirect table even if not negotiated.
        """
        total = len(out_segments) + len(in_segments)
        if total == 0:
            raise VirtqueueError(f"queue {self.index}: a buffer needs at least one segment")
        use_indirect = (self.indirect and total > 1) if indirect is None else indirect
        needed = 1 if use_indirect else total
        if needed > len(self._free):
            raise VirtqueueError(
                f"queue {self.index}: {needed} descriptors needed, {len(self._free)} free of {self.num}"
            )
        pack = _DESC.pack_into
        mem = self.mem
        if use_indirect:
            head = self._free.pop()
            table_gpa = self._indirect_table(head, total)
            self._write_chain(table_gpa, list(range(total)), out_segments, in_segments)
            pack(mem, self.desc_gpa + DESC_SIZE * head, table_gpa, DESC_SIZE * total, VRING_DESC_F_INDIRECT, 0)
            self._chains[head] = [head]
        else:
            ids = [self._free.pop() for _ in range(total)]
            head = ids[0]
            self._write_chain(self.desc_gpa, ids, out_segments, in_segments)
            self._chains[head] = ids
        self._publish(head)
        self.buffers_added += 1
        return head

    def kick_needed(self) -> bool:
        """Whether the buffers published since the last call need a kick
        (Linux virtqueue_kick_prepare_split). Call it once per kick decision."""
        new, old = self.avail_idx, self._kicked_avail_idx
        self._kicked_avail_idx = new
        if self.event_idx:
            (avail_event,) = _U16.unpack_from(self.mem, self._avail_event_gpa)
            return vring_need_event(avail_event, new, old)
        (used_flags,) = _U16.unpack_from(self.mem, self.used_gpa)
        return not used_flags & VRING_USED_F_NO_NOTIFY

    def used_idx(self) -> int:
        return _U16.unpack_from(self.mem, self._used_idx_gpa)[0]

    def get_used(self) -> list[tuple[int, int]]:
        """Collect what the device returned: ``[(head, written_len), ...]``,
        freeing the descriptors. Raises DeviceBugError on an id that is not
        in flight or a used index that ran ahead of what was published."""
        used_idx = self.used_idx()
        pending = (used_idx - self.last_used_idx) & 0xFFFF
        if pending == 0:
            return []
        if pending > len(self._chains):
            raise DeviceBugError(
                f"queue {self.index}: used idx moved from {self.last_used_idx} to {used_idx} "
                f"but only {len(self._chains)} buffers are in flight"
            )
        result = []
        unpack = _USED_ELEM.unpack_from
        mem = self.mem
        for _ in range(pending):
            slot = self.last_used_idx % self.num
            head, written = unpack(mem, self._used_ring_gpa + 8 * slot)
            ids = self._chains.pop(head, None)
            if ids is None:
                raise DeviceBugError(
                    f"queue {self.index}: used ring slot {slot} returns id {head}, which is not in flight"
                )
            self._free.extend(reversed(ids))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            result.append((head, written))
        if self.event_idx:
            # Re-arm: ask for a call on the very next used entry (Linux virtqueue_get_buf_ctx_split).
            _U16.pack_into(mem, self._used_event_gpa, self.last_used_idx)
        return result

    def suppress_interrupts(self, suppress: bool = True) -> None:
        """Linux virtqueue_disable_cb/enable_cb: the avail NO_INTERRUPT flag
        (a hint the device may ignore with EVENT_IDX)."""
        _U16.pack_into(self.mem, self.avail_gpa, VRING_AVAIL_F_NO_INTERRUPT if suppress else 0)

    # -- deliberately broken rings (bad-input tests) -----------------------

    def publish_head(self, head: int) -> None:
        """Publish ``head`` in the avail ring as-is, with no descriptor behind
        it: e.g. ``publish_head(num)`` is a head out of range."""
        self._publish(head)

    def publish_looping_chain(self, length: int = 2) -> int:
        """Publish a chain of ``length`` descriptors whose last one points back
        to the first (all have NEXT set): a device that follows it never ends."""
        if length < 1 or length > len(self._free):
            raise VirtqueueError(f"queue {self.index}: cannot build a loop of {length} descriptors")
        ids = [self._free.pop() for _ in range(length)]
        scratch = self.ram.alloc_reserved(64)
        for pos, desc_id in enumerate(ids):
            nxt = ids[(pos + 1) % length]
            _DESC.pack_into(self.mem, self.desc_gpa + DESC_SIZE * desc_id, scratch, 4, VRING_DESC_F_NEXT, nxt)
        self._publish(ids[0])
        return ids[0]

    def publish_descriptor(self, addr: int, length: int, flags: int = 0, next_id: int = 0) -> int:
        """Publish one raw descriptor (any address, length, flags, next): e.g.
        a buffer outside guest RAM or an INDIRECT descriptor to garbage."""
        if not self._free:
            raise VirtqueueError(f"queue {self.index}: no free descriptor")
        head = self._free.pop()
        _DESC.pack_into(self.mem, self.desc_gpa + DESC_SIZE * head, addr, length, flags, next_id)
        self._chains[head] = [head]
        self._publish(head)
        return head

    def set_avail_idx(self, value: int) -> None:
        """Write the avail index directly, e.g. ``avail_idx + num + 1`` (more
        buffers than the ring holds)."""
        self.avail_idx = value & 0xFFFF
        _U16.pack_into(self.mem, self._avail_idx_gpa, self.avail_idx)

    # -- internals -----------------------------------------------------------

    def _write_chain(
        self, table_gpa: int, ids: list[int], out_segments: Sequence[Segment], in_segments: Sequence[Segment]
    ) -> None:
        pack = _DESC.pack_into
        mem = self.mem
        last = len(ids) - 1
        pos = 0
        for segments, write_flag in ((out_segments, 0), (in_segments, VRING_DESC_F_WRITE)):
            for addr, length in segments:
                at = table_gpa + DESC_SIZE * ids[pos]
                if pos < last:
                    pack(mem, at, addr, length, write_flag | VRING_DESC_F_NEXT, ids[pos + 1])
                else:
                    pack(mem, at, addr, length, write_flag, 0)
                pos += 1

    def _indirect_table(self, head: int, entries: int) -> int:
        table = self._indirect_tables.get(head)
        if table is None or table[1] < entries:
            capacity = max(entries, 32)
            table = (self.ram.alloc_reserved(DESC_SIZE * capacity, align=DESC_SIZE), capacity)
            self._indirect_tables[head] = table
        return table[0]

    def _publish(self, head: int) -> None:
        _U16.pack_into(self.mem, self._avail_ring_gpa + 2 * (self.avail_idx % self.num), head)
        # The ring entry must be visible before the index. x86 keeps stores in
        # program order, and each pack_into is a separate C call, so this holds.
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        _U16.pack_into(self.mem, self._avail_idx_gpa, self.avail_idx)
