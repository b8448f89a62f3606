#!/usr/bin/env python3
"""Fault: the front-end disappears (QEMU killed) at a random point.

Rounds, each a new front-end and model guest on a fresh memfd, against one
back-end in this process:

  mid-inflate          the socket is closed while the guest inflates, at a
                       random buffer and a random moment within it
  mid-deflate          the same while the guest deflates
  mid-message          half a message is sent, then the socket is closed
  mid-message-with-fd  the same with an fd riding on the half message
  before-handshake     a few bytes of the first message, then close

Checked after each round: the back-end ended that session without a crash
and is still up; this process has exactly the fds it had before (the
back-end closed everything it was handed, the half message's fd included);
every page the guest still owns holds its canary and no page was freed
beyond those the guest handed over.  At the end a new front-end is served
normally: ballooned to a target and back.
"""

from __future__ import annotations

import os
import random
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import trio  # noqa: E402

from _common import (  # noqa: E402
    Checks,
    MiB,
    backend_in_process,
    captured_logs,
    fd_count,
    guest_on,
    host_holes,
    log_text,
    pages,
    parser,
    run_script,
    scratch_dir,
    size_arg,
    wait_session_ended,
    wait_until,
)
from vhostballoon.testing import Frontend, GuestRAM  # noqa: E402
from vhostballoon.vhost_user.codec import (  # noqa: E402
    ConfigSpace,
    MemoryRegion,
    SingleMemoryRegion,
    VringFd,
    encode,
)
from vhostballoon.vhost_user.constants import VERSION, Request  # noqa: E402

ROUND_KINDS = ["mid-inflate", "mid-message-with-fd", "mid-deflate", "mid-message", "before-handshake"]


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ram", type=size_arg, default="256M", help="guest RAM per round (default 256M)")
    p.add_argument("--rounds", type=int, default=len(ROUND_KINDS) + 1,
                   help=f"rounds, cycling through {', '.join(ROUND_KINDS)} (default {len(ROUND_KINDS) + 1})")
    return p


def half_message(rng: random.Random, ram: GuestRAM, with_fd: bool) -> tuple[bytes, list[int], str]:
    """A random prefix (at least 1 byte, never all) of a well-formed request;
    with_fd: one that carries an fd, which rides on the prefix."""
    if with_fd:
        if rng.random() < 0.5:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            message, what = encode(Request.SET_VRING_CALL, VringFd(index=1), need_reply=True), "SET_VRING_CALL + eventfd"
        else:
            fd = os.memfd_create("vbf-extra", os.MFD_CLOEXEC)
            os.ftruncate(fd, 2 * MiB)
            region = MemoryRegion(gpa=1 << 40, size=2 * MiB, uaddr=0x7E00_0000_0000, mmap_offset=0)
            message, what = encode(Request.ADD_MEM_REG, SingleMemoryRegion(region), need_reply=True), "ADD_MEM_REG + memfd"
        fds = [fd]
    else:
        fds = []
        message, what = rng.choice([
            (encode(Request.GET_CONFIG, ConfigSpace(0, 16, 0, bytes(16))), "GET_CONFIG"),
            (encode(Request.SET_CONFIG, ConfigSpace(0, 16, 0, bytes(16)), need_reply=True), "SET_CONFIG"),
            (struct.pack("=III", Request.GET_FEATURES, VERSION, 0), "GET_FEATURES"),
        ])
    cut = rng.randrange(1, len(message))
    return message[:cut], fds, f"{cut} of the {len(message)} bytes of {what}"


async def one_round(kind: str, args, checks: Checks, rng: random.Random, backend) -> None:
    service = backend.service
    served = service.sessions_served
    ram_size = args.ram
    balloon_bytes = (ram_size // 2) & ~(MiB - 1)
    total_buffers = balloon_bytes // MiB  # 256 PFNs (1 MiB) per buffer, as Linux
    ram = GuestRAM(ram_size, seed=rng.randrange(1, 1 << 32))
    try:
        ram.touch()
        if kind == "before-handshake":
            async with await Frontend.connect(backend.socket_path) as frontend:
                data = encode(Request.GET_FEATURES)[: rng.randrange(1, 12)]
                await frontend.send_raw(data)
                await wait_until(lambda: service.sessions_served > served, what="the back-end to accept")
            checks.did(f"{kind}: sent {len(data)} bytes of GET_FEATURES's header, closed")
            guest = None
        else:
            async with guest_on(backend.socket_path, ram, seed=rng.randrange(1 << 31)) as guest:
                driver = guest.driver
                service.set_target(ram_size - balloon_bytes)
                if kind == "mid-deflate":
                    await driver.wait_for_target(pages(balloon_bytes))
                    service.set_target(ram_size)
                    counter = lambda: driver.deflate_buffers  # noqa: E731
                else:
                    counter = lambda: driver.inflate_buffers  # noqa: E731
                stop_after = rng.randint(1, max(1, total_buffers - 1))
                await wait_until(lambda: counter() >= stop_after, timeout=60, what=f"{stop_after} buffers")
                await trio.sleep(rng.uniform(0, 0.002))  # anywhere inside the next buffer
                if kind.startswith("mid-message"):
                    data, fds, what = half_message(rng, ram, kind.endswith("with-fd"))
                    try:
                        await guest.frontend.send_raw(data, fds, last=True)
                    finally:
                        for fd in fds:
                            os.close(fd)  # the back-end has its own copy now
                    checks.did(f"{kind}: after {counter()} buffers sent {what}, closed")
                else:
                    checks.did(f"{kind}: closed the socket after {counter()} buffers "
                               f"(balloon at {len(driver.balloon_pfns)} pages)")
            # Leaving the block dropped the connection wherever the driver was.
        await wait_session_ended(service)
        checks.check(f"{kind}: the back-end ended that session and is up", service.sessions_served == served + 1,
                     f"sessions served {served} -> {service.sessions_served}")
        if guest is not None:
            holes = host_holes(ram)
            handed_over = set(guest.driver.balloon_pfns)
            damaged = guest.guest_owned_intact()
            checks.check(f"{kind}: every guest-owned page kept its canary and its memory", damaged == [],
                         f"{len(damaged)} damaged, e.g. {[hex(p) for p in damaged[:4]]}")
            if kind != "mid-deflate":  # a deflate in flight is neither handed over nor guest-owned yet
                beyond = holes - handed_over
                checks.check(f"{kind}: nothing freed beyond the pages handed over", not beyond,
                             f"{len(holes)} pages freed of {len(handed_over)} handed over; "
                             f"{len(beyond)} beyond")
    finally:
        ram.close()


async def scenario(args, checks: Checks) -> None:
    rng = random.Random(args.seed)
    with scratch_dir() as sock_dir, captured_logs() as logs:
        async with backend_in_process(sock_dir) as backend:
            service = backend.service
            fds_before = fd_count()
            checks.did(f"back-end in this process on {backend.socket_path}; {fds_before} fds open")
            for number in range(args.rounds):
                kind = ROUND_KINDS[number % len(ROUND_KINDS)]
                await one_round(kind, args, checks, rng, backend)
                checks.check(f"{kind}: no fd leaked", fd_count() == fds_before,
                             f"{fd_count()} fds open, {fds_before} before")

            # The next front-end is served as if nothing happened.
            ram = GuestRAM(args.ram)
            try:
                ram.touch()
                target = args.ram - args.ram // 4
                async with guest_on(backend.socket_path, ram) as guest:
                    before = ram.allocated_bytes()
                    service.set_target(target)
                    await guest.driver.wait_for_target(pages(args.ram - target))
                    freed = await wait_until(
                        lambda: (before - ram.allocated_bytes()) >= (args.ram - target) - MiB and before - ram.allocated_bytes(),
                        timeout=15, what="the ballooned memory to be freed on the host",
                    )
                    checks.check("next front-end: ballooned to its target and the host freed it",
                                 freed >= args.ram - target - MiB, f"{freed // MiB} MiB freed of {(args.ram - target) // MiB}")
                    service.set_target(args.ram)
                    await guest.driver.wait_for_target(0)
                    damaged = ram.check_canary()
                    checks.check("next front-end: back to full size, every page intact", damaged == [],
                                 f"{len(damaged)} damaged")
                    await guest.frontend.stop()
                await wait_session_ended(service)
            finally:
                ram.close()
            checks.check("no fd leaked over all sessions", fd_count() == fds_before,
                         f"{fd_count()} fds open, {fds_before} before")
        text = log_text(logs)
        checks.check("no session crashed (the daemon's catch-all never ran)", "session failed" not in text)
        checks.check("every session ended cleanly", text.count("front-end session ended") == args.rounds + 1,
                     f"{text.count('front-end session ended')} of {args.rounds + 1}")


def main(argv: list[str] | None = None) -> int:
    return run_script("frontend_gone: the front-end disappears mid-inflate / mid-message",
                      scenario, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
