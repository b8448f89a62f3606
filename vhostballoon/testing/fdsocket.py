"""A unix stream socket that moves bytes and file descriptors, for trio.

What QEMU's vhost-user front-end does with its chardev socket: every message
goes out with one ``sendmsg``, its fds (SCM_RIGHTS) attached to its first
byte; whatever arrives comes with the fds the kernel hands over with it
(``recvmsg``).  The kit's own, so that it shares no code with the back-end
it tests.
"""

from __future__ import annotations

import os
import socket
from array import array
from collections.abc import Sequence

import trio

from .fds import close_fds

# vhost-user.rst: at most 8 fds in a message (8 memory regions of SET_MEM_TABLE,
# QEMU's VHOST_MEMORY_BASELINE_NREGIONS, one fd each); room for that, so that
# more shows as a truncation.
MAX_FDS = 8
_FD = array("i").itemsize
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD)


class FdSocketError(Exception):
    """The peer sent what a vhost-user socket cannot carry (too many fds)."""


async def connect_unix(path: str | os.PathLike[str]) -> trio.socket.SocketType:
    """A connected unix stream socket (QEMU's ``-chardev socket,path=...``)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return sock


class FdSocket:
    """Owns one connected socket; the fds it sends stay the caller's, the fds
    it receives become the caller's."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        # The plain socket under trio's non-blocking one: a request the kernel
        # takes at once (the usual case: a few dozen bytes) goes out without a
        # trip through trio's scheduler, as QEMU's write does not wait either.
        self._plain: socket.socket | None = getattr(sock, "_sock", None)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """All of ``data``; ``fds`` travel with its first byte."""
        view = memoryview(data)
        if fds:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds).tobytes())]
            view = view[await self._sock.sendmsg([view], rights) :]
        elif self._plain is not None:
            try:
                view = view[self._plain.send(view) :]
            except BlockingIOError:
                pass
        while view:
            view = view[await self._sock.send(view) :]

    async def receive(self, max_bytes: int = 65536) -> tuple[bytes, list[int]]:
        """The next bytes and the fds that came with them; b"" when the peer
        closed its end."""
        data, ancillary, flags, _ = await self._sock.recvmsg(max_bytes, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds = array("i")
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(payload[: len(payload) - len(payload) % _FD])
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise FdSocketError(f"the peer sent more than {MAX_FDS} fds at once: ancillary data truncated")
        return data, fds.tolist()

    def close(self) -> None:
        self._sock.close()
