"""The front-end's plumbing: its errors, the record of every message it
saw (its transcript), and one socket read as vhost-user messages."""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .fds import close_fds
from .fdsocket import FdSocket, FdSocketError
from .wire import BackendRequest, Message, MessageReader, Request, WireError


class FrontendError(Exception):
    """The front-end could not do what it was asked (our side, or a dead peer)."""


class ProtocolViolation(FrontendError):
    """The back-end's reply is not what QEMU accepts (wrong request, flags or size)."""


class BackendRejected(FrontendError):
    """The back-end acked a request with a non-zero (failure) value."""


class Channel(enum.Enum):
    FRONT = "front"  # the front-end's socket: we send requests, the back-end replies
    BACKEND = "backend"  # the backend-request channel: the back-end sends requests


@dataclass(frozen=True)
class TranscriptEntry:
    channel: Channel
    sent: bool  # True: this front-end wrote it
    request: int  # Request or BackendRequest value
    flags: int
    size: int
    payload: Any
    nfds: int

    @property
    def name(self) -> str:
        kind = Request if self.channel is Channel.FRONT else BackendRequest
        try:
            return kind(self.request).name
        except ValueError:
            return f"request {self.request}"


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class _MessageChannel:
    """One unix stream socket moving bytes and fds, read as messages."""

    def __init__(self, sock: trio.socket.SocketType, reader: MessageReader, channel: Channel) -> None:
        self.socket = FdSocket(sock)
        self.reader = reader
        self.channel = channel

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        await self.socket.send(data, fds)

    async def receive_message(self) -> Message | None:
        """The next whole message, or None when the peer closed the socket."""
        try:
            while True:
                message = self.reader.next_message()
                if message is not None:
                    return message
                data, fds = await self.socket.receive()
                if not data:
                    close_fds(fds)
                    return None
                self.reader.feed(data, fds)  # the reader owns the fds now
        except (WireError, FdSocketError) as exc:
            raise ProtocolViolation(f"{self.channel.value} channel: {exc}") from exc

    def close(self) -> None:
        self.socket.close()
        self.reader.close()
