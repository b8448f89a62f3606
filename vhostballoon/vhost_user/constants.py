"""Numbers of the vhost-user protocol.

Source unless noted: QEMU ``docs/interop/vhost-user.rst`` (cited by section
name as "spec <section>"), checked against the front-end that sends them,
QEMU ``hw/virtio/vhost-user.c``.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Request(IntEnum):
    """Front-end message types (spec "Front-end message types", ``:id:``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4  # deprecated: "ignore, or use it to disable all rings"
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # previous name SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35  # in-band kick; QEMU's front-end only reserves the number
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    # Proposed on qemu-devel ("vhost_user: Add frontend command for shmem
    # config", 2024-2025); not in the stored upstream spec. Listed so that it
    # is refused as unsupported rather than as an unknown number.
    GET_SHMEM_CONFIG = 44


class BackendRequest(IntEnum):
    """Back-end message types, sent on the back-end channel (spec "Back-end
    message types"; QEMU's ``VhostUserBackendRequest``)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(IntFlag):
    """Protocol feature bits as masks (spec "Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4  # the spec's #define says VHOST_USER_PROTOCOL_F_MTU
    BACKEND_REQ = 1 << 5  # previous name SLAVE_REQ
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10  # previous name SLAVE_SEND_FD
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17  # QEMU's front-end only reserves the bit
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    SHMEM = 1 << 20  # proposed with GET_SHMEM_CONFIG; not in the stored spec


# spec "Communication": bit 30 of GET_FEATURES / SET_FEATURES (a mask here).
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

# virtio 1.x "Reserved Feature Bits": VIRTIO_F_RING_PACKED is bit 34. Needed to
# know whether a vring base / size follows the split or the packed rules
# (spec "A vring descriptor index for split virtqueues").
VIRTIO_F_RING_PACKED = 1 << 34

# spec "Header": flags bits 0-1 version, bit 2 reply, bit 3 need_reply.
VERSION = 0x1
VERSION_MASK = 0x3
REPLY = 0x4
NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | REPLY | NEED_REPLY

# spec "Message Specification": three 32-bit header fields.
HEADER_SIZE = 12

# QEMU hw/virtio/vhost-user.c: VHOST_MEMORY_BASELINE_NREGIONS (fds with
# SET_MEM_TABLE) and VHOST_USER_BACKEND_MAX_FDS (spec "Back-end
# communication": "at most 8 descriptors in each message").
MAX_FDS = 8

# spec SET_VRING_KICK: "Bits (0-7) of the payload contain the vring index.
# Bit 8 is the invalid FD flag." (QEMU VHOST_USER_VRING_IDX_MASK / _NOFD_MASK)
VRING_FD_INDEX_MASK = 0xFF
VRING_FD_INVALID = 0x100

# virtio 1.x "Virtqueues": Queue Size max 32768; split rings need a power of 2.
MAX_VRING_SIZE = 32768

# spec "Multiple Memory regions description": region0 .. region7
# (QEMU VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_TABLE_REGIONS = 8

# This back-end's answer to GET_MAX_MEM_SLOTS: the memory regions its C
# memory table holds (csrc/vb_core.h vb_mem, sized from this through the
# generated header).  QEMU's own limit is VHOST_USER_MAX_RAM_SLOTS, 512.
MAX_MEM_SLOTS = 32

# QEMU hw/virtio/vhost-user.c: VHOST_USER_MAX_CONFIG_SIZE.
MAX_CONFIG_SIZE = 256

# spec "Virtio device config space": offset, size, flags (QEMU
# VHOST_USER_CONFIG_HDR_SIZE).
CONFIG_HEADER_SIZE = 12

# Our own cap on a message body, so that a garbage size field cannot make us
# buffer without end. The largest body we accept is 12 + 256 (config); QEMU's
# largest (a crypto session) is about 1.1 KiB.
MAX_BODY_SIZE = 4096

# spec SET_CONFIG flags: 0 front-end write, 1 live migration.
CONFIG_FLAG_FRONTEND = 0
CONFIG_FLAG_MIGRATION = 1

# spec "A vring address description": flags bit 0 is VHOST_VRING_F_LOG
# (linux/vhost_types.h), used only with dirty logging.
VRING_ADDR_F_LOG = 0x1
