"""The one table of what each front-end request may do, and when (in the
manner of h11's state table): handled here, answered, turned into an event
for the device, refused, or not offered.  ``connection`` looks every request
up here; a request that is illegal in the current state is a lookup that
fails with a clear error.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .codec import ConfigSpace, U64, VringState
from .constants import ProtocolFeature, Request


class Handling(enum.Enum):
    CONNECTION = "answered by the connection"
    EVENT = "handed to the caller as an event"
    UNSUPPORTED = "refused: not implemented by this back-end"


class _Requirement(enum.Enum):
    # spec SET_VRING_ENABLE: only when VHOST_USER_F_PROTOCOL_FEATURES "has been
    # negotiated". Before SET_FEATURES, SET_PROTOCOL_FEATURES shows that the
    # front-end uses it; after SET_FEATURES, bit 30 must have been acked.
    F_PROTOCOL_FEATURES = "VHOST_USER_F_PROTOCOL_FEATURES (bit 30)"


@dataclass(frozen=True)
class Rule:
    """What the connection does with one request.

    ``requires``: a protocol feature (or bit 30) that must be negotiated first.
    ``reply``: the payload type of the request's own reply; None means it has
    none, and gets a u64 ack only when NEED_REPLY asks for one.
    ``handler``: the BackendConnection method that validates the message and
    returns either the reply payload (CONNECTION) or an Event (EVENT).
    ``refusal``: why an UNSUPPORTED request is refused.
    """

    handling: Handling
    handler: str = ""
    requires: ProtocolFeature | _Requirement | None = None
    reply: type | None = None
    refusal: str = ""


def _answer(handler: str, reply: type | None = None, requires=None) -> Rule:
    return Rule(Handling.CONNECTION, handler, requires, reply)


def _event(handler: str, reply: type | None = None, requires=None) -> Rule:
    return Rule(Handling.EVENT, handler, requires, reply)


def _refuse(reason: str) -> Rule:
    return Rule(Handling.UNSUPPORTED, refusal=reason)


def _not_offered(feature: ProtocolFeature) -> Rule:
    return _refuse(f"protocol feature {feature.name} not offered")


_PF = ProtocolFeature
R = Request

#: The one table of what is legal when, for every front-end request.
RULES: dict[Request, Rule] = {
    R.GET_FEATURES: _answer("_get_features", U64),
    R.SET_FEATURES: _event("_set_features"),  # stored here, and told to the device
    R.SET_OWNER: _answer("_set_owner"),
    R.RESET_OWNER: _event("_reset_owner"),
    R.SET_MEM_TABLE: _event("_set_mem_table"),
    R.SET_LOG_BASE: _not_offered(_PF.LOG_SHMFD),
    R.SET_LOG_FD: _refuse("dirty logging: feature VHOST_F_LOG_ALL not offered"),
    R.SET_VRING_NUM: _event("_set_vring_num"),
    R.SET_VRING_ADDR: _event("_set_vring_addr"),
    R.SET_VRING_BASE: _event("_set_vring_base"),
    R.GET_VRING_BASE: _event("_get_vring_base", VringState),
    R.SET_VRING_KICK: _event("_set_vring_kick"),
    R.SET_VRING_CALL: _event("_set_vring_call"),
    R.SET_VRING_ERR: _event("_set_vring_err"),
    R.GET_PROTOCOL_FEATURES: _answer("_get_protocol_features", U64),
    R.SET_PROTOCOL_FEATURES: _answer("_set_protocol_features"),
    R.GET_QUEUE_NUM: _answer("_get_queue_num", U64, _PF.MQ),
    R.SET_VRING_ENABLE: _event("_set_vring_enable", requires=_Requirement.F_PROTOCOL_FEATURES),
    R.SEND_RARP: _not_offered(_PF.RARP),
    R.NET_SET_MTU: _not_offered(_PF.NET_MTU),
    R.SET_BACKEND_REQ_FD: _event("_set_backend_req_fd", requires=_PF.BACKEND_REQ),
    R.IOTLB_MSG: _refuse("feature VIRTIO_F_IOMMU_PLATFORM not offered"),
    R.SET_VRING_ENDIAN: _not_offered(_PF.CROSS_ENDIAN),
    R.GET_CONFIG: _event("_get_config", ConfigSpace, _PF.CONFIG),
    R.SET_CONFIG: _event("_set_config", requires=_PF.CONFIG),
    R.CREATE_CRYPTO_SESSION: _not_offered(_PF.CRYPTO_SESSION),
    R.CLOSE_CRYPTO_SESSION: _not_offered(_PF.CRYPTO_SESSION),
    R.POSTCOPY_ADVISE: _not_offered(_PF.PAGEFAULT),
    R.POSTCOPY_LISTEN: _not_offered(_PF.PAGEFAULT),
    R.POSTCOPY_END: _not_offered(_PF.PAGEFAULT),
    R.GET_INFLIGHT_FD: _not_offered(_PF.INFLIGHT_SHMFD),
    R.SET_INFLIGHT_FD: _not_offered(_PF.INFLIGHT_SHMFD),
    R.GPU_SET_SOCKET: _refuse("only vhost-user-gpu back-ends take it"),
    R.RESET_DEVICE: _event("_reset_device", requires=_PF.RESET_DEVICE),
    R.VRING_KICK: _not_offered(_PF.INBAND_NOTIFICATIONS),
    R.GET_MAX_MEM_SLOTS: _answer("_get_max_mem_slots", U64, _PF.CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: _event("_add_mem_reg", requires=_PF.CONFIGURE_MEM_SLOTS),
    R.REM_MEM_REG: _event("_rem_mem_reg", requires=_PF.CONFIGURE_MEM_SLOTS),
    R.SET_STATUS: _event("_set_status", requires=_PF.STATUS),  # stored here, and told
    R.GET_STATUS: _answer("_get_status", U64, _PF.STATUS),
    R.GET_SHARED_OBJECT: _not_offered(_PF.SHARED_OBJECT),
    R.SET_DEVICE_STATE_FD: _not_offered(_PF.DEVICE_STATE),
    R.CHECK_DEVICE_STATE: _not_offered(_PF.DEVICE_STATE),
    R.GET_SHMEM_CONFIG: _not_offered(_PF.SHMEM),
}
del R

_missing = [r.name for r in Request if r not in RULES]
if _missing:  # pragma: no cover - a table edit gone wrong
    raise RuntimeError(f"RULES lacks {_missing}")


