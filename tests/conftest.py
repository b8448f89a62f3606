"""Shared fixtures for the back-end's integration tests (helpers: backend_support.py).

Everything here is real: the back-end listens on a real unix socket in the
test's own trio run, the model guest's RAM is a real memfd, kicks and calls
are real eventfds, and discards are real ``fallocate`` calls.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import partial

import pytest
import structlog
import trio

from vhostballoon.testing.host import THP_SYSFS, shmem_thp
from vhostballoon.server.daemon import Backend, run_backend
from vhostballoon.server.service import BalloonService


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short directory for unix sockets (sun_path holds 108 bytes; pytest's
    tmp_path can be longer than that)."""
    path = tempfile.mkdtemp(prefix="vb-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def socket_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "vb.sock")


@pytest.fixture
def logs() -> Iterator[list[dict]]:
    """Every structlog entry logged during the test, as dicts (event, values, log_level)."""
    with structlog.testing.capture_logs() as entries:
        yield entries


@pytest.fixture
async def backend(nursery: trio.Nursery, socket_path: str, logs: list[dict]) -> Backend:
    """A back-end serving ``socket_path`` (control socket ``socket_path + '.ctl'``)
    in the test's nursery; cancelled when the test ends. Its log goes to ``logs``."""
    return await nursery.start(partial(run_backend, socket_path, service=BalloonService()))


@pytest.fixture
def shmem_thp_advise():
    """shmem THP on "advise" for the test (huge page tests)."""
    if not os.path.exists(os.path.join(THP_SYSFS, "shmem_enabled")):
        pytest.skip("THP not available: this kernel has no shmem THP (no shmem_enabled in sysfs)")
    try:
        with shmem_thp("advise"):
            yield
    except PermissionError as exc:
        pytest.skip(f"THP not available: cannot set {exc.filename}: {exc.strerror}")


@pytest.fixture(autouse=True)
def _shmem_thp_never_unless_asked(request):
    """Every other test sees shmem THP off, whatever the host was left at:
    with THP possible, the back-end defers partial huge pages (by policy), and
    tests about plain freeing would depend on the machine's setting."""
    if "shmem_thp_advise" in request.fixturenames or not os.path.exists(os.path.join(THP_SYSFS, "shmem_enabled")):
        yield
        return
    try:
        cm = shmem_thp("never")
        cm.__enter__()
    except PermissionError:
        yield  # not root: leave the machine's setting alone
        return
    try:
        yield
    finally:
        cm.__exit__(None, None, None)
