"""Helpers shared by the back-end's integration tests (fixtures are in conftest.py).

A plain module, not conftest: ``from conftest import ...`` would pick up
whichever conftest.py pytest imported first (tests/e2e has its own)."""

from __future__ import annotations

from vhostballoon.server.service import BalloonService
from vhostballoon.testing.fds import fd_count  # noqa: F401
from vhostballoon.testing.waiting import wait_until  # noqa: F401  (shared with scripts/faults)

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
SMALL_GUEST = 256 * MiB  # the size most tests use, to keep the suite fast


def log_text(entries: list[dict]) -> str:
    """Captured structlog entries as one searchable text (event and values)."""
    return "\n".join(" ".join(f"{k}={v}" for k, v in e.items()) for e in entries)


async def wait_pending_freed(service: BalloonService, *, timeout: float = 5.0) -> None:
    """Until nothing is pending: pages of a partial 2 MiB block of plain shmem
    wait until the block completes, the guest reaches its target or the
    inflate queue has been quiet for 10 ms."""
    await wait_until(lambda: service.query()["pending-bytes"] == 0, timeout=timeout, what="pending pages taken")
    session = service.session
    if session is not None:
        async with session.memory_lock:  # a C worker's flush holds it until the pages it took are freed
            pass


async def wait_no_session(service: BalloonService, *, timeout: float = 10.0) -> None:
    """Until the back-end has finished (and cleaned up) its current session."""
    await wait_until(lambda: service.session is None, timeout=timeout, what="the session to end")


async def wait_session(service: BalloonService, served: int, *, timeout: float = 10.0) -> None:
    """Until the back-end has accepted its ``served``-th front-end."""
    await wait_until(
        lambda: service.sessions_served >= served and service.session is not None,
        timeout=timeout,
        what=f"front-end number {served} to be accepted",
    )


# The kernel's own figures: one definition, in vhostballoon.testing.host.
from vhostballoon.testing.host import meminfo, vmstat  # noqa: E402,F401
from vhostballoon.testing.host import sysfs_choice as bracketed  # noqa: E402,F401
