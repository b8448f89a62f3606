"""The vhost-user protocol, sans-I/O: the wire codec (``codec``), the back-end
connection state machine (``connection``), the protocol's numbers
(``constants``) and its errors (``errors``). Imports no trio, socket or mmap.
"""

from .connection import NEED_DATA, BackendChannel, BackendConnection, encode_backend_request
from .errors import DeviceError, LocalProtocolError, ProtocolError, VhostUserError

__all__ = [
    "NEED_DATA",
    "BackendChannel",
    "BackendConnection",
    "DeviceError",
    "LocalProtocolError",
    "ProtocolError",
    "VhostUserError",
    "encode_backend_request",
]
