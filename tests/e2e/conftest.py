"""End-to-end fixtures: the real back-end process, a real QEMU, a real Linux guest.

The e2e tests are skipped, with the reason printed (pytest -ra), when the
QEMU and guest built by ../shared/e2e/build-qemu.sh and build-guest.sh are
not on this machine; .ci/run builds them first, so in CI they run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from vhostballoon.ctl import ControlClient
from vhostballoon.testing.host import THP_SYSFS, sysfs_choice
from vhostballoon.testing.qemu import GUEST_RAM_NAME, build_patched_qemu, provisioning_problem

PROBLEM = provisioning_problem()
REPO = Path(__file__).resolve().parents[2]
# QEMU patches this project ships (protocol/qemu/README.md) and the rig that
# builds them (.ci/run uses the same ../shared/e2e; VB_E2E_RIG overrides it).
QEMU_PATCHES = sorted((REPO / "protocol" / "qemu").glob("*.patch"))
BUILD_QEMU = Path(os.environ.get("VB_E2E_RIG", REPO.parent / "shared" / "e2e")) / "build-qemu.sh"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            if PROBLEM:
                item.add_marker(pytest.mark.skip(reason=f"e2e not provisioned: {PROBLEM}"))


class BackendProcess:
    """The daemon as a user runs it: its own process, its own socket."""

    def __init__(self, workdir: Path, name: str = "vb", *, prefix: tuple[str, ...] = (), env: dict | None = None) -> None:
        """``prefix``: a command that runs the daemon (e.g. ``setpriv`` to
        drop privileges); ``env``: extra environment variables."""
        self.workdir = workdir
        self.prefix = prefix
        self.env = env
        self.socket_path = str(workdir / f"{name}.sock")
        self.control_path = self.socket_path + ".ctl"
        self.log_path = workdir / f"{name}.backend.log"
        self.process: subprocess.Popen | None = None

    def start(self, *extra: str) -> "BackendProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "vhostballoon", "--socket-path", self.socket_path,
             "--log-level", "debug", *extra],
            env={**os.environ, **self.env} if self.env else None,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        # Ready when its control socket accepts: a killed predecessor may have
        # left the socket files behind (the back-end replaces stale ones).
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"back-end did not start: {self.log()[-2000:]}")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.control_path)
                return self
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=20)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    async def settled_fd_count(self, settle: float = 0.3, timeout: float = 5.0) -> int:
        """The fd count once it has stayed the same for ``settle`` seconds
        (the server end of a just-closed control connection, e.g. start()'s
        readiness probe, goes away a moment after the client's)."""
        with trio.move_on_after(timeout):
            count, since = self.fd_count(), trio.current_time()
            while True:
                await trio.sleep(0.02)
                now = self.fd_count()
                if now != count:
                    count, since = now, trio.current_time()
                elif trio.current_time() - since >= settle:
                    return count
        return self.fd_count()

    def fd_table(self) -> list[str]:
        fd_dir = f"/proc/{self.process.pid}/fd"
        out = []
        for name in sorted(os.listdir(fd_dir), key=int):
            try:
                out.append(f"{name} -> {os.readlink(f'{fd_dir}/{name}')}")
            except OSError:
                pass
        return out

    async def assert_fd_count(self, expected: int, settle: float = 5.0) -> None:
        """The count must come back to ``expected``; the server end of our own
        last control connection may take a moment to close."""
        with trio.move_on_after(settle):
            while self.fd_count() != expected:
                await trio.sleep(0.05)
            return
        raise AssertionError(f"back-end has {self.fd_count()} fds, expected {expected}: {self.fd_table()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _execute(self, command: str, **arguments):
        client = ControlClient(self.control_path)
        try:
            return client.execute(command, **arguments)
        finally:
            client.close()

    async def execute(self, command: str, **arguments):
        return await trio.to_thread.run_sync(lambda: self._execute(command, **arguments))

    async def query(self) -> dict:
        return await self.execute("query-balloon")

    async def balloon_and_time(self, target: int, timeout: float = 90.0, poll: float = 0.05) -> tuple[dict, float]:
        """Set the target; poll query-balloon until ``actual`` is there.
        Returns (that query, seconds from the command)."""
        start = time.monotonic()
        await self.execute("balloon", value=target)
        with trio.fail_after(timeout):
            while True:
                info = await self.query()
                if info["actual"] == target:
                    return info, time.monotonic() - start
                await trio.sleep(poll)

    async def wait_for(self, predicate, timeout: float, what: str) -> dict:
        """Poll query-balloon until predicate(info) holds."""
        info: dict = {}
        with trio.move_on_after(timeout):
            while True:
                info = await self.query()
                if predicate(info):
                    return info
                await trio.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last query-balloon: {info}")


@pytest.fixture
def backend_factory(tmp_path):
    started: list[BackendProcess] = []

    def make(name: str = "vb", *extra: str, workdir: Path | None = None, **options) -> BackendProcess:
        b = BackendProcess(workdir or tmp_path, name, **options).start(*extra)
        started.append(b)
        return b

    yield make
    for b in started:
        if b.alive:
            b.kill(signal.SIGTERM)


@pytest.fixture
def backend(backend_factory) -> BackendProcess:
    return backend_factory()


@pytest.fixture(scope="session")
def patched_qemu() -> Path:
    """qemu-system-x86_64 10.2.2 with protocol/qemu/*.patch applied, built by
    the rig on first use (minutes; cached by the patches' hash).  Tests that
    need it are skipped, with the reason, when it cannot be built here."""
    qemu, why = build_patched_qemu(QEMU_PATCHES, BUILD_QEMU)
    if qemu is None:
        pytest.skip(f"patched QEMU not available: {why}")
    return qemu


def shmem_knobs() -> tuple[str | None, ...]:
    """The shmem THP knobs the shmem_thp_advise fixture sets."""
    return tuple(sysfs_choice(os.path.join(THP_SYSFS, p)) for p in ("shmem_enabled", "hugepages-2048kB/shmem_enabled"))


@pytest.fixture
def thp_guest_ram(shmem_thp_advise):
    """A 1 GiB memfd for guest RAM, shmem THP on advise (sysfs restored after).
    The knobs are machine-wide: the test fails, saying so, if anything else
    changed them meanwhile (its figures would not be THP figures)."""
    knobs = shmem_knobs()
    fd = os.memfd_create(GUEST_RAM_NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 1 << 30)
        yield fd
    finally:
        os.close(fd)
    assert shmem_knobs() == knobs, f"another process changed the shmem THP knobs during the test: {knobs} -> {shmem_knobs()}"
