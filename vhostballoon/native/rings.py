"""Split virtqueues (csrc/vring.c) and the sink of each buffer format."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._native import ffi, lib

from ._base import MAX_RANGES_PER_POP, RingError, _ERRLEN, _errbuf, _errtext
from .ranges import DescRange, RangeList

if TYPE_CHECKING:
    from .memory import GuestMemory


REFUSE_REASONS = {
    lib.VB_REFUSE_EMPTY: "empty", lib.VB_REFUSE_UNALIGNED: "not 4 KiB aligned",
    lib.VB_REFUSE_WRAPS: "wraps around", lib.VB_REFUSE_OUTSIDE: "not inside one region of guest memory",
    lib.VB_REFUSE_OVERLAP: "overlaps another range of the buffer",
    lib.VB_REFUSE_BALLOONED: "already in the balloon",
}


@dataclass(frozen=True)
class PoppedBatch:
    """What a sink made of the buffers one pop took (``Virtqueue.pop_pfn32``,
    ``pop_extents``)."""

    heads: list[int]
    ranges: RangeList       # the queue's own buffer: valid until its next pop
    items: int              # PFNs or descriptors in the buffers
    refused: int = 0        # extents: ranges refused, never to be used
    first_refused: tuple[int, int] | None = None  # (gpa, len) as the guest wrote it
    first_refused_why: str | None = None




class Virtqueue:
    """Device side of one split virtqueue.

    Owns its range and head buffers: the RangeList a pop returns is one of
    them, valid only until the next pop on this queue.  ``max_pfns``: the
    items (PFNs, or descriptors of an extents buffer) one pop takes.
    """

    def __init__(self, index: int, max_pfns: int = 65536, max_heads: int = 1024) -> None:
        if max_pfns < 1 or max_heads < 1 or max_heads > 1 << 16:
            raise ValueError(f"queue {index}: max_pfns {max_pfns} / max_heads {max_heads} out of range")
        self.index = index
        self._vq = ffi.new("vb_vq *")
        self._popped = RangeList(max_pfns)
        self._max_items = max_pfns
        self._heads = ffi.new("uint16_t[]", max_heads)
        self._max_heads = max_heads
        self._batch = ffi.new("vb_batch *")
        self._ranges = None  # vb_desc_range[MAX_RANGES_PER_POP], made on the first pop_ranges
        self._counts = None
        self._mem: GuestMemory | None = None
        self._generation = -1

    def _fail(self, message: str) -> RingError:
        return RingError(f"queue {self.index}: {message}")

    def _check_mapped(self) -> None:
        """Refuse to use ring pointers whose mapping may have gone away."""
        if not self._vq.ready:
            raise self._fail("not set up")
        mem = self._mem
        if mem is None or mem._mem is None or mem._unmap_generation != self._generation:
            raise self._fail("guest memory was unmapped since setup; set the queue up again")

    def setup(
        self,
        mem: GuestMemory,
        num: int,
        desc_uaddr: int,
        avail_uaddr: int,
        used_uaddr: int,
        base: int,
        event_idx: bool,
        indirect: bool,
    ) -> None:
        """Point the queue at its rings (front-end addresses) in mem."""
        self._vq.ready = 0
        for name, value in (("desc", desc_uaddr), ("avail", avail_uaddr), ("used", used_uaddr)):
            if not 0 <= value < 1 << 64:
                raise self._fail(f"{name} ring address {value:#x} is not 64-bit")
        if not 0 <= num < 1 << 32:
            raise self._fail(f"ring size {num} is not a power of two in 1..32768")
        if not 0 <= base < 1 << 16:
            raise self._fail(f"base {base} is not a 16-bit ring index")
        err = _errbuf()
        rc = lib.vb_vq_setup(
            self._vq, mem._table(), num, desc_uaddr, avail_uaddr, used_uaddr, base,
            1 if event_idx else 0, 1 if indirect else 0, err, _ERRLEN,
        )
        if rc < 0:
            raise self._fail(_errtext(err))
        self._mem = mem
        self._generation = mem._unmap_generation

    @property
    def ready(self) -> bool:
        """setup() succeeded.  Stays True when a region is unmapped later (so
        last_avail_idx is still meaningful); the queue then raises RingError
        until it is set up again."""
        return bool(self._vq.ready)

    @property
    def last_avail_idx(self) -> int:
        return self._vq.last_avail_idx

    @property
    def used_idx(self) -> int:
        return self._vq.used_idx

    @property
    def num(self) -> int:
        return self._vq.num

    def _pop(self, pop, name: str, mem: GuestMemory) -> PoppedBatch:
        self._check_mapped()
        if mem is not self._mem:
            raise self._fail(f"{name} with a different memory table than setup")
        err = _errbuf()
        out, batch = self._popped, self._batch
        count = pop(self._vq, mem._mem, out.cdata, self._max_items, batch, self._heads, self._max_heads,
                    err, _ERRLEN)
        if count < 0:
            out.n = 0
            raise self._fail(_errtext(err))
        out.n = batch.n_ranges
        return PoppedBatch(
            heads=ffi.unpack(self._heads, count) if count else [], ranges=out, items=batch.items,
            refused=batch.refused,
            first_refused=(batch.first_refused_gpa, batch.first_refused_len) if batch.refused else None,
            first_refused_why=REFUSE_REASONS.get(batch.first_refused_why) if batch.refused else None,
        )

    def pop_pfn32(self, mem: GuestMemory) -> PoppedBatch:
        """Pop every whole buffer available now (within this queue's limits)
        whose descriptors carry le32 PFN arrays, as ranges (the PFN32 sink):
        page by page the PFNs in order, outside ones included.  Buffers that
        do not fit stay for the next call.  On RingError nothing is consumed."""
        return self._pop(lib.vb_vq_pop_pfn32, "pop_pfn32", mem)

    def pop_extents(self, mem: GuestMemory) -> PoppedBatch:
        """Pop every whole buffer available now whose device-readable
        descriptors are each one range (the EXTENTS sink); ranges unfit for
        inflate/deflate are refused (counted, first one named), the buffer
        still taken.  On RingError nothing is consumed."""
        return self._pop(lib.vb_vq_pop_extents, "pop_extents", mem)

    def pop_ranges(self, mem: GuestMemory, *, writable: bool) -> list[tuple[int, list[DescRange]]]:
        """Pop every whole buffer available now and return its descriptors:
        ``[(head, [DescRange, ...]), ...]``.  ``writable``: every descriptor
        must be device-writable (free page reporting), else device-readable
        (statistics); otherwise the ring is malformed.  Addresses are not
        checked.  A buffer of more than MAX_RANGES_PER_POP descriptors is
        malformed.  On RingError nothing is consumed."""
        self._check_mapped()
        if mem is not self._mem:
            raise self._fail("pop_ranges with a different memory table than setup")
        if self._ranges is None:
            self._ranges = ffi.new("vb_desc_range[]", MAX_RANGES_PER_POP)
            self._counts = ffi.new("uint32_t[]", self._max_heads)
        err = _errbuf()
        n_ranges = ffi.new("uint32_t *")
        count = lib.vb_vq_pop_ranges(
            self._vq, mem._mem, 1 if writable else 0, self._ranges, MAX_RANGES_PER_POP, n_ranges,
            self._heads, self._counts, self._max_heads, err, _ERRLEN,
        )
        if count < 0:
            raise self._fail(_errtext(err))
        buffers = []
        at = 0
        for k in range(count):
            descs = []
            for r in self._ranges[at : at + self._counts[k]]:
                descs.append(DescRange(r.addr, r.len, r.flags))
            at += self._counts[k]
            buffers.append((self._heads[k], descs))
        return buffers

    @property
    def position(self) -> tuple[int, int]:
        """(last_avail_idx, used_idx): where the device is in the ring.  They
        differ while popped buffers are held (the statistics buffer)."""
        return self._vq.last_avail_idx, self._vq.used_idx

    def restore_position(self, last_avail_idx: int, used_idx: int) -> None:
        """After setting the rings up again (guest memory changed), carry on
        where the device was instead of going back to the original base."""
        self._check_mapped()
        if not (0 <= last_avail_idx < 1 << 16 and 0 <= used_idx < 1 << 16):
            raise self._fail(f"ring position {last_avail_idx}/{used_idx} is not 16-bit")
        self._vq.last_avail_idx = last_avail_idx
        self._vq.used_idx = used_idx
        self._vq.signalled_used = used_idx
        self._vq.signalled_used_valid = 0

    def push_used(self, heads: Sequence[int], lens: Sequence[int] | None = None) -> None:
        """Return buffers to the driver (len = bytes written, 0 by default)."""
        self._check_mapped()
        n = len(heads)
        if n == 0:
            return
        num = self._vq.num
        if n > num:
            raise ValueError(f"queue {self.index}: {n} used elements exceed ring size {num}")
        bad = [h for h in heads if not 0 <= h < num]
        if bad:
            raise ValueError(f"queue {self.index}: head {bad[0]} out of range (ring size {num})")
        c_lens = ffi.NULL
        if lens is not None:
            if len(lens) != n:
                raise ValueError(f"queue {self.index}: {n} heads but {len(lens)} lens")
            c_lens = ffi.new("uint32_t[]", list(lens))
        lib.vb_vq_push_used(self._vq, ffi.new("uint16_t[]", list(heads)), c_lens, n)

    def should_signal(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        self._check_mapped()
        return bool(lib.vb_vq_should_signal(self._vq))

    def pending(self) -> int:
        """Available buffers not popped yet."""
        self._check_mapped()
        n = lib.vb_vq_pending(self._vq)
        if n < 0:
            avail_idx = ffi.cast("uint16_t *", self._vq.avail)[1]  # le16, x86 and arm64 hosts
            last = self._vq.last_avail_idx
            raise self._fail(
                f"avail idx {avail_idx} is {(avail_idx - last) & 0xFFFF} ahead of "
                f"last_avail_idx {last} (ring size {self._vq.num})"
            )
        return n
