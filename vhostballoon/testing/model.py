"""``model_guest``: a QEMU-like front-end plus a Linux-like balloon driver on a
memfd guest, connected to a back-end socket, in one ``async with``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from .balloon_driver import LINUX_FEATURES, BalloonDriver, PfnOrder
from .frontend import QEMU_PROTOCOL_FEATURES, Frontend
from .guest_ram import DEFAULT_RAM_SIZE, DEFAULT_RESERVED, GuestRAM

STOP_TIMEOUT = 10.0


@dataclass
class ModelGuest:
    ram: GuestRAM
    frontend: Frontend
    driver: BalloonDriver
    final_vring_bases: dict[int, int] = field(default_factory=dict)  # from stop(), filled on exit

    @property
    def actual_pages(self) -> int:
        return self.driver.actual_pages

    async def wait_for_target(self, num_pages: int | None = None, *, timeout: float = 60.0) -> int:
        return await self.driver.wait_for_target(num_pages, timeout=timeout)


@asynccontextmanager
async def running_driver(frontend: Frontend, driver: BalloonDriver, run=None) -> AsyncIterator[None]:
    """The driver probed and running (``run``, default ``driver.run``, a
    task taking ``task_status``) and the backend channel served, until the
    block ends; then both stop.  An error of the block, or the single error
    of a task, is raised as itself, not wrapped in an ExceptionGroup."""
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(frontend.serve_backend_channel)
            await driver.probe()
            await nursery.start(run or driver.run)
            try:
                yield
            except BaseException as exc:  # re-raised below, outside the nursery, unwrapped
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group
        raise
    if body_error is not None:
        raise body_error


@asynccontextmanager
async def model_guest(
    socket_path: str | os.PathLike[str],
    *,
    ram_size: int = DEFAULT_RAM_SIZE,
    reserved: int = DEFAULT_RESERVED,
    features: int = LINUX_FEATURES,
    order: PfnOrder | str = PfnOrder.RANDOM,
    seed: int = 0,
    touch: bool = True,
    num_vqs: int = 5,
    vq_size: int = 128,
    protocol_features: int = QEMU_PROTOCOL_FEATURES,
    reply_timeout: float = 10.0,
    stop_on_exit: bool = True,
    huge_pages: bool = False,
    **driver_options: Any,
) -> AsyncIterator[ModelGuest]:
    """Boot a model guest against the back-end listening on ``socket_path``.

    On entry: guest RAM is created (and every page touched unless
    ``touch=False``), the front-end connects and sends QEMU's start-up
    messages, the driver probes (feature negotiation, device start), and its
    config-change handling runs in a task. ``features`` is what the driver
    accepts; the offer comes from the back-end. On a clean exit the front-end
    sends QEMU's stop messages (the vring bases land in
    ``guest.final_vring_bases``) unless ``stop_on_exit=False`` (e.g. the
    back-end was killed on purpose); everything is closed either way.

    ``huge_pages=True`` madvises guest RAM for transparent huge pages, as
    QEMU does (effective when shmem THP is ``advise`` or ``always``).

    Extra keyword arguments go to ``BalloonDriver`` (``poison_val``: non-zero
    makes a guest that poisons free pages, ``touch_on_inflate``,
    ``buffer_timeout``).
    """
    ram = GuestRAM(ram_size, reserved=reserved, huge_pages=huge_pages)
    frontend: Frontend | None = None
    try:
        if touch:
            ram.touch()
        frontend = await Frontend.connect(
            socket_path,
            num_vqs=num_vqs,
            vq_size=vq_size,
            protocol_features=protocol_features,
            reply_timeout=reply_timeout,
        )
        await frontend.initialize()
        driver = BalloonDriver(ram, frontend, accept_features=features, order=order, seed=seed, **driver_options)
        guest = ModelGuest(ram, frontend, driver)
        async with running_driver(frontend, driver):
            yield guest
        if stop_on_exit:
            with trio.fail_after(STOP_TIMEOUT):
                guest.final_vring_bases = await frontend.stop()
    finally:
        if frontend is not None:
            await frontend.aclose()
        ram.close()
