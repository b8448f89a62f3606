"""Unix stream sockets that carry file descriptors (SCM_RIGHTS), for trio."""

from __future__ import annotations

import array
import socket
from typing import Sequence

import trio

from ..vhost_user.constants import MAX_FDS

from ..vhost_user.codec import close_fds  # noqa: F401  (re-exported for the server)

# vhost-user.rst: at most 8 fds per message (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS_PER_MESSAGE = MAX_FDS
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


class TransportError(Exception):
    """The peer broke the transport rules (e.g. sent more fds than fit)."""


def _fds_from_ancillary(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


class FdStream:
    """One connected unix stream socket; owns the socket, not the fds it moves."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        # The stdlib socket under trio's (non-blocking): send() tries it first.
        self._raw: socket.socket | None = getattr(sock, "_sock", None)

    @classmethod
    def from_fd(cls, fd: int) -> "FdStream":
        return cls(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))

    async def receive(self, max_bytes: int = 65536) -> tuple[bytes, list[int]]:
        """Bytes and the fds that came with them. b"" means the peer left."""
        data, ancdata, flags, _ = await self.sock.recvmsg(max_bytes, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds = _fds_from_ancillary(ancdata)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise TransportError(
                f"peer sent more fds than a vhost-user message may carry ({MAX_FDS_PER_MESSAGE}); ancillary data truncated"
            )
        return data, fds

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send all of data (and fds with its first byte).  A reply the
        kernel takes at once (the usual case: a few dozen bytes) is sent
        without a trip through trio's scheduler; it is two per guest buffer
        (GET_CONFIG, SET_CONFIG), so that trip showed in the profile.  The
        receive that follows is the checkpoint."""
        if not fds and self._raw is not None:
            try:
                sent = self._raw.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await self.sock.sendmsg([data], anc)
        else:
            sent = await self.sock.send(data)
        view = memoryview(data)[sent:]
        while view:
            n = await self.sock.send(view)
            view = view[n:]

    def close(self) -> None:
        self.sock.close()
