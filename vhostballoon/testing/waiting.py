"""Waiting for state that changes elsewhere (a back-end, a guest), for the
tests and the fault scripts alike."""

from __future__ import annotations

from typing import Callable

import trio

POLL = 0.005  # seconds between looks


class WaitTimeout(AssertionError, TimeoutError):
    """A condition did not come true in time: a failed check for a test, a
    timeout for a script."""


async def wait_until(predicate: Callable[[], object], *, timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something true; return that."""
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(POLL)
    raise WaitTimeout(f"timed out after {timeout} s waiting for {what}")

