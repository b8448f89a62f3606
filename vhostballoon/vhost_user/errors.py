"""The errors of the vhost-user layer.

Two families, as in h11: :class:`ProtocolError` is the peer's fault
(malformed or illegal input); :class:`LocalProtocolError` is ours (the API
was used wrongly). They share a base so a caller can catch both, but neither
is a subclass of the other: a bug of ours must never pass for bad input.
"""

from __future__ import annotations


class VhostUserError(Exception):
    """Base of the errors raised by :mod:`vhostballoon.vhost_user`."""


class ProtocolError(VhostUserError):
    """The peer sent something malformed, or something illegal now.

    The connection that raised it is poisoned: every later call raises a
    ProtocolError too. Close the socket.
    """


class LocalProtocolError(VhostUserError):
    """This process used the API wrongly (a bug here, not in the peer)."""


class DeviceError(VhostUserError):
    """The device refuses a well-formed request (e.g. overlapping memory
    regions, a ring outside guest memory).

    Device code may raise it; whoever handles the event then calls
    ``BackendConnection.complete(event, ok=False)``, which sends the front-end
    a failure ack when it asked for one (REPLY_ACK).
    """
