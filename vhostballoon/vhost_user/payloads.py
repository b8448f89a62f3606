"""vhost-user message bodies: the wire structs and one typed payload class
per body shape (spec "Message Specification"), each knowing its bytes.
``codec`` frames them into messages and says which request carries which.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Union

import construct as c

from .constants import (
    CONFIG_HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_MEM_TABLE_REGIONS,
    VRING_FD_INDEX_MASK,
    VRING_FD_INVALID,
)
from .errors import LocalProtocolError, ProtocolError


# -- wire structs (spec "Message Specification"; all numbers native-endian) ---

_HEADER = c.Struct("request" / c.Int32un, "flags" / c.Int32un, "size" / c.Int32un)
_U64 = c.Struct("value" / c.Int64un)
_VRING_STATE = c.Struct("index" / c.Int32un, "num" / c.Int32un)
# spec "A vring address description". Its table shows a "size" column, but no
# such field exists: struct vhost_vring_addr is index, flags, then 4 u64s.
_VRING_ADDR = c.Struct(
    "index" / c.Int32un,
    "flags" / c.Int32un,
    "desc" / c.Int64un,
    "used" / c.Int64un,
    "avail" / c.Int64un,
    "log" / c.Int64un,
)
_MEMORY_REGION = c.Struct(
    "gpa" / c.Int64un, "size" / c.Int64un, "uaddr" / c.Int64un, "mmap_offset" / c.Int64un
)
_MEMORY_TABLE = c.Struct(
    "nregions" / c.Int32un,
    "padding" / c.Int32un,
    "regions" / c.Array(c.this.nregions, _MEMORY_REGION),
)
_SINGLE_MEMORY_REGION = c.Struct("padding" / c.Int64un, "region" / _MEMORY_REGION)
_CONFIG = c.Struct(
    "offset" / c.Int32un, "size" / c.Int32un, "flags" / c.Int32un, "data" / c.Bytes(c.this.size)
)

_MEMORY_REGION_SIZE = _MEMORY_REGION.sizeof()  # 32
_MEMORY_TABLE_HEADER_SIZE = 8  # u32 nregions + u32 padding
_U32 = c.Int32un

# The three shapes every guest buffer costs (a GET_CONFIG and a SET_CONFIG
# with REPLY_ACK: header, config header, u64 ack) are packed with the struct
# module on the hot path: the layouts declared above, checked equal here.
_HEADER_FAST = struct.Struct("=III")
_U64_FAST = struct.Struct("=Q")
_CONFIG_HEADER_FAST = struct.Struct("=III")
assert _HEADER.sizeof() == _HEADER_FAST.size and _U64.sizeof() == _U64_FAST.size
assert _CONFIG.parse(_CONFIG_HEADER_FAST.pack(1, 0, 2)) == dict(offset=1, size=0, flags=2, data=b"")

# construct compiles a struct into generated Python: the same wire format,
# parsed and built about 3x faster.  Every buffer the guest hands over is a
# GET_CONFIG and a SET_CONFIG round trip through here (scripts/bench.py).
_HEADER, _U64, _VRING_STATE, _VRING_ADDR, _MEMORY_TABLE, _SINGLE_MEMORY_REGION, _CONFIG, _U32 = (
    s.compile() for s in (_HEADER, _U64, _VRING_STATE, _VRING_ADDR, _MEMORY_TABLE, _SINGLE_MEMORY_REGION, _CONFIG, _U32)
)


# -- payloads -----------------------------------------------------------------


@dataclass(frozen=True)
class Empty:
    """No body (size 0)."""

    fixed_size: ClassVar[int | None] = 0

    def to_bytes(self) -> bytes:
        return b""

    @classmethod
    def from_bytes(cls, name: str, body: bytes) -> Empty:
        return cls()


@dataclass(frozen=True)
class Raw:
    """A body this layer does not interpret (requests it refuses anyway, or
    crafted malformed input in tests)."""

    data: bytes
    fixed_size: ClassVar[int | None] = None

    def to_bytes(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def from_bytes(cls, name: str, body: bytes) -> Raw:
        return cls(body)


@dataclass(frozen=True)
class U64:
    """spec "A single 64-bit integer"."""

    value: int
    fixed_size: ClassVar[int | None] = 8

    def to_bytes(self) -> bytes:
        return _U64_FAST.pack(self.value)

    @classmethod
    def from_bytes(cls, name: str, body: bytes) -> U64:
        return cls(_U64_FAST.unpack(body)[0])


@dataclass(frozen=True)
class VringState:
    """spec "A vring state description" (also the vring base index)."""

    index: int
    num: int
    fixed_size: ClassVar[int | None] = 8

    def to_bytes(self) -> bytes:
        return _VRING_STATE.build({"index": self.index, "num": self.num})

    @classmethod
    def from_bytes(cls, name: str, body: bytes) -> VringState:
        parsed = _VRING_STATE.parse(body)
        return cls(parsed.index, parsed.num)


@dataclass(frozen=True)
class VringAddr:
    """spec "A vring address description" (user addresses of the ring parts)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    fixed_size: ClassVar[int | None] = 40

    def to_bytes(self) -> bytes:
        return _VRING_ADDR.build(
            {
                "index": self.index,
                "flags": self.flags,
                "desc": self.desc,
                "used": self.used,
                "avail": self.avail,
                "log": self.log,
            }
        )

    @classmethod
    def from_bytes(cls, name: str, body: bytes) -> VringAddr:
        p = _VRING_ADDR.parse(body)
        return cls(p.index, p.flags, p.desc, p.used, p.avail, p.log)


@dataclass(frozen=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 queue index, bit 8 "no fd
    attached" (spec SET_VRING_KICK). Other bits are reserved and refused."""

    index: int
    invalid: bool = False
    fixed_size: ClassVar[int | None] = 8

    def to_bytes(self) -> bytes:
        if not 0 <= self.index <= VRING_FD_INDEX_MASK:
            raise LocalProtocolError(f"vring index {self.index} does not fit bits 0-7")
        value = self.index | (VRING_FD_INVALID if self.invalid else 0)
        return _U64.build({"value": value})

    @classmethod
    def from_bytes(cls, name: str, body: bytes) -> VringFd:
        value = _U64.parse(body).value
        reserved = value & ~(VRING_FD_INDEX_MASK | VRING_FD_INVALID)
        if reserved:
            raise ProtocolError(
                f"{name}: reserved bits {reserved:#x} set in {value:#x} "
                "(only bits 0-7 index and bit 8 no-fd are defined)"
            )
        return cls(value & VRING_FD_INDEX_MASK, bool(value & VRING_FD_INVALID))


@dataclass(frozen=True)
class MemoryRegion:
    """spec "Memory region description": guest physical address, size, the
    front-end's user address, and the offset of the region in its fd."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int

    def _as_dict(self) -> dict[str, int]:
        return {"gpa": self.gpa, "size": self.size, "uaddr": self.uaddr, "mmap_offset": self.mmap_offset}

    @classmethod
    def _from_container(cls, p: c.Container) -> MemoryRegion:
        return cls(p.gpa, p.size, p.uaddr, p.mmap_offset)


@dataclass(frozen=True)
class MemoryTable:
    """spec "Multiple Memory regions description": u32 nregions, u32 padding,
    then exactly nregions regions of 32 bytes (QEMU sends no more)."""

    regions: tuple[MemoryRegion, ...]
    fixed_size: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))

    def to_bytes(self) -> bytes:
        return _MEMORY_TABLE.build(
            {
                "nregions": len(self.regions),
                "padding": 0,
                "regions": [r._as_dict() for r in self.regions],
            }
        )

    @classmethod
    def from_bytes(cls, name: str, body: bytes) -> MemoryTable:
        if len(body) < _MEMORY_TABLE_HEADER_SIZE:
            raise ProtocolError(
                f"{name}: body is {len(body)} bytes, shorter than its "
                f"{_MEMORY_TABLE_HEADER_SIZE}-byte region count"
            )
        nregions = c.Int32un.parse(body[:4])
        if nregions == 0:
            raise ProtocolError(f"{name}: 0 regions (at least 1)")
        if nregions > MAX_MEM_TABLE_REGIONS:
            raise ProtocolError(f"{name}: {nregions} regions (at most {MAX_MEM_TABLE_REGIONS})")
        expected = _MEMORY_TABLE_HEADER_SIZE + _MEMORY_REGION_SIZE * nregions
        if len(body) != expected:
            raise ProtocolError(
                f"{name}: body is {len(body)} bytes, expected {expected} for {nregions} regions"
            )
        parsed = _MEMORY_TABLE.parse(body)
        return cls(tuple(MemoryRegion._from_container(r) for r in parsed.regions))


@dataclass(frozen=True)
class SingleMemoryRegion:
    """spec "Single memory region description": u64 padding, then a region."""

    region: MemoryRegion
    fixed_size: ClassVar[int | None] = 40

    def to_bytes(self) -> bytes:
        return _SINGLE_MEMORY_REGION.build({"padding": 0, "region": self.region._as_dict()})

    @classmethod
    def from_bytes(cls, name: str, body: bytes) -> SingleMemoryRegion:
        return cls(MemoryRegion._from_container(_SINGLE_MEMORY_REGION.parse(body).region))


@dataclass(frozen=True)
class ConfigSpace:
    """spec "Virtio device config space": u32 offset, u32 size, u32 flags,
    then ``size`` bytes. GET_CONFIG requests carry ``size`` bytes too (QEMU
    sends zeros there); ``data`` must always be ``size`` bytes long."""

    offset: int
    size: int
    flags: int
    data: bytes
    fixed_size: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", bytes(self.data))
        if len(self.data) != self.size:
            raise LocalProtocolError(
                f"ConfigSpace: size {self.size} but {len(self.data)} bytes of data"
            )

    def to_bytes(self) -> bytes:
        return _CONFIG_HEADER_FAST.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def from_bytes(cls, name: str, body: bytes) -> ConfigSpace:
        if len(body) < CONFIG_HEADER_SIZE:
            raise ProtocolError(
                f"{name}: body is {len(body)} bytes, shorter than the "
                f"{CONFIG_HEADER_SIZE}-byte config header"
            )
        size = _CONFIG_HEADER_FAST.unpack_from(body)[1]
        if size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"{name}: config size {size} (at most {MAX_CONFIG_SIZE})")
        expected = CONFIG_HEADER_SIZE + size
        if len(body) != expected:
            raise ProtocolError(
                f"{name}: body is {len(body)} bytes, expected {expected} "
                f"({CONFIG_HEADER_SIZE} + config size {size})"
            )
        offset, size, flags = _CONFIG_HEADER_FAST.unpack_from(body)
        return cls(offset, size, flags, body[CONFIG_HEADER_SIZE:])


Payload = Union[
    Empty, Raw, U64, VringState, VringAddr, VringFd, MemoryTable, SingleMemoryRegion, ConfigSpace
]


def encode_payload(payload: Payload) -> bytes:
    """The body bytes of ``payload``."""
    try:
        return payload.to_bytes()
    except AttributeError:
        raise LocalProtocolError(f"not a vhost-user payload: {payload!r}") from None
    except (c.ConstructError, OverflowError, ValueError, TypeError, struct.error) as exc:
        raise LocalProtocolError(f"cannot encode {payload!r}: {exc}") from exc


