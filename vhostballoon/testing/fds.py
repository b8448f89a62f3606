"""This process's file descriptors, for tests that check nothing leaks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


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
