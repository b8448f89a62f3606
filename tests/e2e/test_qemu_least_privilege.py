"""Least privilege: the back-end as an unprivileged user (no capability, no
group, no way back to root), given only its socket directory and the memfd
QEMU passes, balloons a real guest and really frees host memory; and the
same under its seccomp sandbox.  QEMU runs as root here and connects to the
socket the unprivileged back-end created."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

from vhostballoon.testing.qemu import balloon_guest

MiB = 1 << 20
NOBODY = 65534  # Debian's nobody/nogroup
# No uid 0, no supplementary groups, no inheritable or bounding-set
# capabilities, and no_new_privs: nothing can give privileges back.
SETPRIV = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
           "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs")


@pytest.fixture
def nobody_dir():
    """The back-end's own directory (sockets and state), owned by nobody, 0700."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start the back-end as another user")
    path = Path(tempfile.mkdtemp(prefix="vb-nobody-", dir="/tmp"))
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_unprivileged(pid: int) -> dict[str, str]:
    status = proc_status(pid)
    assert status["Uid"].split() == [str(NOBODY)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(NOBODY)] * 4, status["Gid"]
    assert status["Groups"].strip() == "", status["Groups"]
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, f"{caps} {status[caps]}"
    assert status["NoNewPrivs"].strip() == "1"
    return status


async def balloon_and_measure(tmp_path, backend, capsys) -> dict:
    """Fill 800 MiB in the guest (so the host backs it), balloon to 512 MiB,
    check the host memory behind the guest dropped; then give it back."""
    async with balloon_guest(tmp_path, backend.socket_path) as guest:
        assert (await guest.run("fill 800", timeout=120)).rc == 0
        await guest.run("unfill")
        host0 = guest.host_allocated()
        assert host0 > 800 * MiB, f"the guest's fill should be backed on the host: {host0}"
        await backend.execute("balloon", value=512 * MiB)
        info = await backend.wait_for(lambda i: i["actual"] == 512 * MiB, 90, "guest at 512 MiB")
        host1 = guest.host_allocated()
        assert host0 - host1 >= 480 * MiB, f"host memory dropped only {(host0 - host1) / MiB:.1f} MiB"
        assert info["freed-bytes-measured"] >= 480 * MiB, info
        with capsys.disabled():
            print(f"\nhost memory behind the guest: {host0 / MiB:.0f} -> {host1 / MiB:.0f} MiB "
                  f"({(host0 - host1) / MiB:.0f} MiB freed for a 512 MiB balloon)")
        await backend.execute("balloon", value=1024 * MiB)
        await backend.wait_for(lambda i: i["actual"] == 1024 * MiB, 90, "guest back at 1 GiB")
        assert (await guest.run("fill 300", timeout=120)).rc == 0  # the pages given back are usable
        return {"freed": host0 - host1, **info}


async def test_unprivileged_backend_balloons_a_real_guest(tmp_path, backend_factory, nobody_dir, capsys):
    backend = backend_factory("vb", "--features=-reporting", workdir=nobody_dir, prefix=SETPRIV)
    assert_unprivileged(backend.process.pid)
    assert os.stat(backend.socket_path).st_uid == NOBODY
    await balloon_and_measure(tmp_path, backend, capsys)
    # The target was saved where nobody may write: its own state directory.
    state = Path(backend.socket_path + ".state")
    assert state.is_dir() and state.stat().st_uid == NOBODY and any(state.iterdir())
    assert backend.alive
    assert backend.kill(signal.SIGTERM) == 0
    assert "Permission denied" not in backend.log() and "Operation not permitted" not in backend.log()


async def test_sandboxed_unprivileged_backend_balloons_a_real_guest(tmp_path, backend_factory, nobody_dir, capsys):
    backend = backend_factory("vb", "--features=-reporting", "--sandbox", workdir=nobody_dir, prefix=SETPRIV)
    assert_unprivileged(backend.process.pid)
    # The sockets accept (start() returned) a moment before the filter is loaded.
    await backend.wait_for(lambda i: "sandbox applied" in backend.log(), 10, "the sandbox")
    seccomp = proc_status(backend.process.pid)["Seccomp"].strip()
    assert seccomp == "2", f"no seccomp filter (Seccomp: {seccomp}): {backend.log()[-1000:]}"
    await balloon_and_measure(tmp_path, backend, capsys)
    assert backend.alive, backend.log()[-2000:]
    assert backend.kill(signal.SIGTERM) == 0, backend.log()[-2000:]
