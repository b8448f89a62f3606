"""A vhost-user front-end like QEMU 10.2.2 and a balloon driver like Linux's,
on a memfd "guest", for tests, the demo, benchmarks and fault injection.

This package is the front-end side: it may use trio. The back-end never
imports it, and it imports nothing of the back-end (``vhostballoon.server``,
``vhostballoon.vhost_user``, ``vhostballoon.device``, ``vhostballoon.native``):
its socket code (``fdsocket``), its vhost-user messages (``wire``) and its
balloon facts (``virtio_balloon``) are written from the specs, so that a
mistake in the back-end cannot agree with itself here
(tests/test_kit_independence.py).

Quick start::

    async with model_guest(socket_path, ram_size=256 << 20) as guest:
        # ... make the back-end set a target (control socket) ...
        await guest.wait_for_target()
        guest.ram.allocated_bytes()        # what the host still holds
        guest.ram.check_canary(guest.driver.guest_owned_pfns())  # -> []

Pieces, usable on their own:

- ``GuestRAM``: memfd guest RAM, canaries, ``allocated_bytes()``.
- ``DriverVirtqueue``: a split ring in guest RAM, driver side (plus
  ``publish_*`` methods that write broken rings on purpose).
- ``BalloonDriver``: Linux's virtio_balloon behaviour over a ``Transport``.
- ``Frontend``: QEMU's vhost-user messages over a real unix socket, with a
  ``transcript`` of every message and raw ``request``/``send_raw`` hooks
  (payloads and request numbers: ``vhostballoon.testing.wire``).
"""

from .balloon_driver import (
    LINUX_FEATURES,
    RANGE_FEATURES,
    BalloonDriver,
    DeviceTimeout,
    DriverError,
    PfnOrder,
    Transport,
    allocation_order,
)
from .frontend import (
    QEMU_PROTOCOL_FEATURES,
    BackendRejected,
    Channel,
    Frontend,
    FrontendError,
    ProtocolViolation,
    TranscriptEntry,
)
from .guest_ram import DEFAULT_UADDR, PAGE_SIZE, GuestMemoryError, GuestRAM
from .model import ModelGuest, model_guest
from .virtio_balloon import (
    VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    QueueRole,
    queue_roles,
)
from .virtqueue import DeviceBugError, DriverVirtqueue, VirtqueueError, vring_need_event

__all__ = [
    "BackendRejected",
    "BalloonDriver",
    "Channel",
    "DEFAULT_UADDR",
    "DeviceBugError",
    "DeviceTimeout",
    "DriverError",
    "DriverVirtqueue",
    "Frontend",
    "FrontendError",
    "GuestMemoryError",
    "GuestRAM",
    "LINUX_FEATURES",
    "RANGE_FEATURES",
    "ModelGuest",
    "PAGE_SIZE",
    "PfnOrder",
    "ProtocolViolation",
    "QEMU_PROTOCOL_FEATURES",
    "QueueRole",
    "TranscriptEntry",
    "Transport",
    "VIRTIO_BALLOON_ARRAY_PFNS_MAX",
    "VIRTIO_BALLOON_F_DEFLATE_ON_OOM",
    "VIRTIO_BALLOON_F_FREE_PAGE_HINT",
    "VIRTIO_BALLOON_F_MUST_TELL_HOST",
    "VIRTIO_BALLOON_F_PAGE_POISON",
    "VIRTIO_BALLOON_F_REPORTING",
    "VIRTIO_BALLOON_F_STATS_VQ",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VirtqueueError",
    "allocation_order",
    "model_guest",
    "queue_roles",
    "vring_need_event",
]
