"""What the fault-injection scripts share: a report of checks, the back-end
in this process or as a real daemon process, a model guest whose RAM
outlives its front-end, a control-socket client, and the kernel's figures
(open fds, CPU time, eventfd counters).

Every script in this folder runs on its own (``python scripts/faults/NAME.py
--help``), prints what it injected and what it checked, and exits 1 when a
check failed; ``tests/test_faults.py`` runs each one with small sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
import trio

from vhostballoon.server.daemon import Backend, run_backend
from vhostballoon.server.service import BalloonService
from vhostballoon.sizes import parse_size
from vhostballoon.testing import BalloonDriver, DriverError, Frontend, FrontendError, GuestRAM
from vhostballoon.testing.model import running_driver
from vhostballoon.testing.fds import fd_count  # noqa: F401
from vhostballoon.testing.waiting import wait_until  # noqa: F401  (the scripts import them from here)

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
# -P: "python -m" would put the current directory first on sys.path, and from
# a checkout after `pip install .` (not editable) that is the source tree's
# package, which has no compiled _native: the installed package must win.
DAEMON = [sys.executable, "-P", "-m", "vhostballoon"]
STARTUP_TIMEOUT = 20.0


# ---- the report --------------------------------------------------------------------


class Checks:
    """What a script did and what it checked; ``exit_code`` is 1 if a check failed."""

    def __init__(self, title: str, *, quiet: bool = False) -> None:
        self.title = title
        self.quiet = quiet
        self.failures: list[str] = []
        self.passed = 0
        self._print(f"== {title}")

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def did(self, text: str) -> None:
        """One thing the script injected or measured."""
        self._print(f"   * {text}")

    def check(self, what: str, ok: object, detail: str = "") -> bool:
        """Record one check; ``detail`` says what was seen (printed either way)."""
        suffix = f": {detail}" if detail else ""
        if ok:
            self.passed += 1
            self._print(f"   [ok]   {what}{suffix}")
        else:
            self.failures.append(f"{what}{suffix}")
            self._print(f"   [FAIL] {what}{suffix}")
        return bool(ok)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def summary(self) -> str:
        verdict = "FAILED" if self.failures else "passed"
        return f"== {self.title}: {verdict} ({self.passed} checks passed, {len(self.failures)} failed)"


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    return p


def run_script(title: str, body: Callable[[argparse.Namespace, Checks], Any], args: argparse.Namespace) -> int:
    """Run ``body(args, checks)`` under trio; print the verdict; return the exit code.
    An exception from the body is a failed check (with its text), not a crash."""
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    checks = Checks(title, quiet=args.quiet)
    checks.did(f"seed {args.seed} (rerun with --seed {args.seed})")
    try:
        trio.run(body, args, checks)
    except Exception as exc:  # a script must report, not die with a traceback only
        checks.check("the scenario ran to the end", False, f"{type(exc).__name__}: {exc}")
        if not args.quiet:
            import traceback

            traceback.print_exc()
    print(checks.summary(), flush=True)
    return checks.exit_code


# ---- waiting and measuring ----------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (fraction 0.99: p99) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def eventfd_count(fd: int, pid: int | str = "self") -> int:
    """An eventfd's counter, read from fdinfo (reading the fd would reset it)."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("eventfd-count:"):
                return int(line.split()[1], 16)
    raise ValueError(f"fd {fd} of process {pid} is not an eventfd")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (/proc/PID/stat, all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def host_holes(ram: GuestRAM) -> set[int]:
    """Guest pages (outside the reserved area) that the host no longer holds."""
    return ram.host_holes()


def log_text(entries: Iterable[dict]) -> str:
    return "\n".join(" ".join(f"{k}={v}" for k, v in e.items()) for e in entries)


@contextmanager
def scratch_dir():
    """A short directory for unix sockets (sun_path holds 108 bytes)."""
    path = tempfile.mkdtemp(prefix="vbf-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- the back-end in this process ----------------------------------------------------------


@asynccontextmanager
async def backend_in_process(sock_dir: str, service: BalloonService | None = None) -> AsyncIterator[Backend]:
    """The back-end on ``sock_dir/vb.sock`` (control: ``.ctl``) in this trio
    run; cancelled on the way out."""
    service = service or BalloonService()
    async with trio.open_nursery() as nursery:
        backend = await nursery.start(partial(run_backend, os.path.join(sock_dir, "vb.sock"), service=service))
        try:
            yield backend
        finally:
            nursery.cancel_scope.cancel()


@contextmanager
def captured_logs():
    """Every structlog entry of the back-end in this process, as dicts
    (not printed: the script prints its own report)."""
    with structlog.testing.capture_logs() as entries:
        yield entries


async def wait_session_ended(service: BalloonService, *, timeout: float = 10.0) -> None:
    await wait_until(lambda: service.session is None, timeout=timeout, what="the front-end session to end")


# ---- the back-end as a real daemon process -------------------------------------------------


class DaemonProcess:
    """``python -m vhostballoon --socket-path ...`` in its own process."""

    def __init__(self, process: trio.Process, socket_path: str, log_path: str) -> None:
        self.process = process
        self.socket_path = socket_path
        self.control_path = socket_path + ".ctl"
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_entries(self) -> list[dict]:
        """The daemon's log lines (it runs with --log-format json)."""
        entries = []
        for line in self.log().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                entries.append({"event": line, "level": "unparsed"})
        return entries

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        self.process.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def daemon_process(sock_dir: str, *args: str, log_name: str = "daemon.log") -> AsyncIterator[DaemonProcess]:
    """Start the daemon on ``sock_dir/vb.sock`` (JSON log in ``sock_dir/log_name``);
    yield once its front-end and control sockets accept connections; kill it on
    the way out if it is still running."""
    socket_path = os.path.join(sock_dir, "vb.sock")
    log_path = os.path.join(sock_dir, log_name)
    with open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            [*DAEMON, "--socket-path", socket_path, "--log-format", "json", *args],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
    daemon = DaemonProcess(process, socket_path, log_path)
    try:
        await wait_until(
            lambda: process.returncode is not None or (os.path.exists(socket_path) and _accepts(daemon.control_path)),
            timeout=STARTUP_TIMEOUT, what="the daemon to listen",
        )
        if process.returncode is not None:
            raise RuntimeError(f"the daemon exited with {process.returncode}: {daemon.log()}")
        try:
            yield daemon
        except Exception as exc:
            exc.add_note(f"last lines of the daemon's log ({log_path}):\n" + "\n".join(daemon.log().splitlines()[-15:]))
            raise
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(10):
                await process.wait()


def _accepts(path: str) -> bool:
    """Something listens on the unix socket ``path`` (a stale socket file
    left by a killed daemon refuses).  Only used on the control socket: the
    daemon binds its front-end socket first, and a probe there would count
    as a front-end session."""
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


# ---- a control-socket client -------------------------------------------------------------


class ControlClient:
    """A client of the control socket that stays connected (events included)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.events: list[dict] = []

    @classmethod
    async def connect(cls, path: str) -> "ControlClient":
        # A blocking connect (in a thread), as an ordinary client does: when
        # the listen backlog is full it waits its turn.  (A non-blocking
        # connect to a unix socket fails with EAGAIN then, and trio's
        # open_unix_socket takes that for "in progress".)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            await trio.to_thread.run_sync(sock.connect, path)
        except BaseException:
            sock.close()
            raise
        return cls(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self, timeout: float = 10.0) -> dict | None:
        """The next line as JSON; None when the back-end closed the connection."""
        with trio.fail_after(timeout):
            while (newline := self.buffer.find(b"\n")) < 0:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.buffer += data
        line = bytes(self.buffer[:newline])
        del self.buffer[: newline + 1]
        return json.loads(line)

    async def reply(self, timeout: float = 10.0) -> dict | None:
        """The next reply (events that come first are kept in ``events``)."""
        while True:
            message = await self.receive(timeout)
            if message is None or "event" not in message:
                return message
            self.events.append(message)

    async def execute(self, command: str, timeout: float = 10.0, **arguments: Any) -> dict:
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        await self.send(json.dumps(request).encode() + b"\n")
        reply = await self.reply(timeout)
        if reply is None:
            raise ConnectionError(f"{command}: the back-end closed the control connection")
        return reply

    async def aclose(self) -> None:
        await self.stream.aclose()


# ---- a model guest whose RAM outlives the front-end ------------------------------------------


@dataclass
class Guest:
    ram: GuestRAM
    frontend: Frontend
    driver: BalloonDriver
    device_gone: BaseException | None = None  # what the driver saw when the back-end died (backend_may_die)

    def guest_owned_intact(self) -> list[int]:
        """Guest-owned pages whose canary is wrong or that the host freed ([]: none)."""
        return self.ram.check_canary(self.driver.guest_owned_pfns())


@asynccontextmanager
async def guest_on(
    socket_path: str, ram: GuestRAM, *, seed: int = 0, backend_may_die: bool = False, **driver_options: Any
) -> AsyncIterator[Guest]:
    """Like ``vhostballoon.testing.model_guest``, but the caller owns the RAM:
    it stays mapped after the front-end is gone, so what the back-end freed
    can be checked afterwards.  Leaving the block drops the connection as a
    killed QEMU does (no stop messages), wherever the driver is.

    ``backend_may_die``: when the back-end goes away the driver stops (its
    error is kept in ``device_gone``) and the guest goes on, as with QEMU,
    instead of failing the block."""
    frontend = await Frontend.connect(socket_path)
    try:
        await frontend.initialize()
        driver = BalloonDriver(ram, frontend, seed=seed, **driver_options)
        guest = Guest(ram, frontend, driver)

        async def run_driver(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                await driver.run(task_status=task_status)
            except* (OSError, FrontendError, DriverError) as group:
                if not backend_may_die:
                    raise
                guest.device_gone = group.exceptions[0]

        async with running_driver(frontend, driver, run_driver):
            yield guest
    finally:
        await frontend.aclose()


def pages(nbytes: int) -> int:
    return nbytes // PAGE


__all__ = [
    "Checks",
    "ControlClient",
    "DaemonProcess",
    "GiB",
    "Guest",
    "MiB",
    "PAGE",
    "backend_in_process",
    "captured_logs",
    "cpu_seconds",
    "daemon_process",
    "eventfd_count",
    "fd_count",
    "guest_on",
    "host_holes",
    "log_text",
    "ms",
    "pages",
    "parser",
    "percentile",
    "run_script",
    "scratch_dir",
    "size_arg",
    "wait_session_ended",
    "wait_until",
]
