"""This process's file descriptors: closing a batch, and counting them for
tests that check nothing leaks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fd_count() -> int:
    """Open fds of this process (the listdir's own fd counts the same every time)."""
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@contextmanager
def no_fd_leak() -> Iterator[None]:
    """The block leaves exactly as many fds open as it found."""
    before = fd_count()
    yield
    assert fd_count() == before
