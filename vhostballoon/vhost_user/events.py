"""What a back-end connection hands to the device: one typed event per
device-level request, with validated values (``connection`` makes them;
the session handles them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .codec import MemoryRegion
from .constants import Request


@dataclass(frozen=True, kw_only=True)
class Event:
    """A device-level request. ``request`` and ``need_reply`` are the original
    message's, for logging; the connection sends the reply itself."""

    request: Request
    need_reply: bool = False

    @property
    def fds(self) -> tuple[int, ...]:
        """The fds this event hands to the caller (who now owns them)."""
        return ()


@dataclass(frozen=True)
class FeaturesSet(Event):
    """SET_FEATURES (already stored as ``acked_features``). Without
    VHOST_USER_F_PROTOCOL_FEATURES in ``features`` every ring starts enabled
    (spec "Ring states")."""

    features: int


@dataclass(frozen=True)
class StatusSet(Event):
    """SET_STATUS (already stored as ``status``)."""

    status: int


@dataclass(frozen=True)
class MemoryTableSet(Event):
    """SET_MEM_TABLE: the whole table, each region with its fd."""

    regions: tuple[tuple[MemoryRegion, int], ...]

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(fd for _, fd in self.regions)


@dataclass(frozen=True)
class MemoryRegionAdded(Event):
    region: MemoryRegion
    fd: int

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True)
class MemoryRegionRemoved(Event):
    """REM_MEM_REG; the region is identified by gpa, uaddr and size (its
    mmap_offset is to be ignored, spec REM_MEM_REG)."""

    region: MemoryRegion


@dataclass(frozen=True)
class VringNumSet(Event):
    index: int
    num: int


@dataclass(frozen=True)
class VringAddrSet(Event):
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class VringBaseSet(Event):
    index: int
    base: int


@dataclass(frozen=True)
class VringBaseGet(Event):
    """GET_VRING_BASE: stop the ring; complete with its last avail index."""

    index: int


@dataclass(frozen=True)
class _VringFileSet(Event):
    index: int
    fd: int | None  # None: the no-fd bit was set

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)


@dataclass(frozen=True)
class VringKickSet(_VringFileSet):
    """SET_VRING_KICK; ``fd`` None means "poll" (spec)."""


@dataclass(frozen=True)
class VringCallSet(_VringFileSet):
    pass


@dataclass(frozen=True)
class VringErrSet(_VringFileSet):
    pass


@dataclass(frozen=True)
class VringEnableSet(Event):
    index: int
    enabled: bool


@dataclass(frozen=True)
class ConfigGet(Event):
    """GET_CONFIG; complete with exactly ``size`` bytes (or ok=False)."""

    offset: int
    size: int
    flags: int


@dataclass(frozen=True)
class ConfigSet(Event):
    """SET_CONFIG; ``flags`` 0 is a front-end (guest) write, 1 migration."""

    offset: int
    data: bytes
    flags: int


@dataclass(frozen=True)
class BackendChannelSet(Event):
    """SET_BACKEND_REQ_FD: the socket for back-end requests."""

    fd: int

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd,)


@dataclass(frozen=True)
class DeviceReset(Event):
    """RESET_DEVICE, or the deprecated RESET_OWNER (see ``request``)."""


# -- the state table -----------------------------------------------------------------
