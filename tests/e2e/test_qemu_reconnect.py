"""What QEMU 10.2.2's generic vhost-user device allows when the back-end restarts.

Characterization tests: they pin down the real QEMU's behaviour (exit status,
the messages it prints, whether the guest's balloon worked) so that the README
can tell users exactly what to expect. If a newer QEMU changes any of this,
these tests fail and say what changed.

What they show (QEMU 10.2.2, ``vhost-user-test-device-pci``):

- ``-chardev socket,...,reconnect-ms=N`` with ``-device
  vhost-user-test-device-pci`` on the command line: QEMU exits with status 1
  at start-up (the chardev connects asynchronously, so the device's
  realize finds no connection to talk over).
- Starting with ``-S`` and a ``pcie-root-port``, waiting until the chardev is
  connected, then QMP ``device_add`` (``bus`` = the root port) and ``cont``
  works, and the balloon works. Without a root port ``device_add`` is refused
  (pcie.0 does not support hotplug).
- When the back-end is killed, QEMU and the guest keep running; when a back-end
  listens again and QEMU reconnects, QEMU aborts (SIGABRT) in
  ``vhost_dev_start`` (``vub_connect`` never re-initialises the vhost device
  that ``vub_disconnect`` cleaned up). So with stock QEMU the only recovery
  from a back-end restart is a fresh QEMU (see test_qemu_balloon.py); with
  protocol/qemu's patch the same guest carries on
  (test_qemu_patched_reconnect.py).
"""

from __future__ import annotations

import signal
from contextlib import asynccontextmanager

import trio

from vhostballoon.testing.qemu import (
    GuestError,
    QemuGuest,
    balloon_device_add_args,
    balloon_vhost_user_args,
    vhost_user_chardev_spec,
)

MiB = 1 << 20
RECONNECT_MS = 1000
ROOT_PORT = ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"]


@asynccontextmanager
async def killed_at_exit(guest: QemuGuest):
    try:
        yield guest
    finally:
        await guest.kill()


async def wait_chardev_connected(guest: QemuGuest, chardev_id: str = "vb", timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not await guest.chardev_connected(chardev_id):
            await trio.sleep(0.05)


async def start_hot_added(workdir, backend) -> QemuGuest:
    """QEMU paused (-S) with a reconnecting chardev and a root port; the
    balloon is hot-added once the chardev is up, then the guest boots."""
    guest = await QemuGuest.start(
        workdir,
        [],
        paused=True,
        wait_ready=False,
        extra_args=["-chardev", vhost_user_chardev_spec(backend.socket_path, reconnect_ms=RECONNECT_MS), *ROOT_PORT],
    )
    try:
        assert (await guest.wait_qmp())["status"] == "prelaunch"
        await wait_chardev_connected(guest)
        await guest.device_add(**balloon_device_add_args(bus="rp1"))
        await guest.qmp("cont")
        await guest.wait_ready()
    except BaseException:
        await guest.kill()
        raise
    return guest


async def balloon_to_768m(guest: QemuGuest, backend) -> None:
    await backend.execute("balloon", value=768 * MiB)
    await backend.wait_for(lambda i: i["actual"] == 768 * MiB, 60, "guest at 768 MiB")
    vm = await guest.vmstat()
    assert vm["balloon_inflate"] - vm["balloon_deflate"] == 256 * MiB // 4096


async def test_qemu_10_2_exits_at_startup_with_reconnecting_chardev_and_device_on_command_line(tmp_path, backend):
    guest = await QemuGuest.start(
        tmp_path, balloon_vhost_user_args(backend.socket_path, reconnect_ms=RECONNECT_MS), wait_ready=False
    )
    async with killed_at_exit(guest):
        rc = await guest.wait_exit(30)
        out = guest.output()
        assert rc == 1, out
        assert "vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs=5,config_size=16,vq_size=128: Failed to set msg fds." in out
        assert "vhost_backend_init failed: Protocol error" in out
        assert "@@VB" not in out, "the guest should never have started"
    # The back-end saw the (late) connection come and go, and is still serving.
    assert backend.alive
    await backend.wait_for(lambda i: not i["connected"], 10, "back-end back to waiting")


async def test_qemu_10_2_hot_adds_balloon_on_reconnecting_chardev_behind_root_port(tmp_path, backend):
    guest = await QemuGuest.start(
        tmp_path,
        [],
        paused=True,
        wait_ready=False,
        extra_args=["-chardev", vhost_user_chardev_spec(backend.socket_path, reconnect_ms=RECONNECT_MS), *ROOT_PORT],
    )
    async with killed_at_exit(guest):
        assert (await guest.wait_qmp())["status"] == "prelaunch"
        await wait_chardev_connected(guest)
        # The q35 root bus refuses hotplug even before the guest runs: the
        # root port is required.
        try:
            await guest.device_add(**balloon_device_add_args())
            raise AssertionError("device_add on pcie.0 unexpectedly succeeded")
        except GuestError as exc:
            assert "Bus 'pcie.0' does not support hotplugging" in str(exc)
        assert await guest.device_add(**balloon_device_add_args(bus="rp1")) == {}
        await guest.qmp("cont")
        await guest.wait_ready()

        balloons = [d for d in await guest.devices() if d["device"] == "0x0005"]
        assert len(balloons) == 1 and balloons[0]["driver"] == "virtio_balloon", balloons
        await balloon_to_768m(guest, backend)
        assert guest.process.poll() is None


async def test_qemu_10_2_aborts_when_backend_reconnects(tmp_path, backend_factory):
    backend = backend_factory()
    guest = await start_hot_added(tmp_path, backend)
    async with killed_at_exit(guest):
        await balloon_to_768m(guest, backend)  # the balloon worked before the restart

        assert backend.kill(signal.SIGKILL) == -signal.SIGKILL
        # With no back-end listening, QEMU retries every reconnect-ms and the
        # guest keeps running.
        await trio.sleep(2.5 * RECONNECT_MS / 1000)
        assert guest.process.poll() is None
        assert (await guest.run("mem")).rc == 0

        restarted = backend_factory()  # same socket path
        rc = await guest.wait_exit(20)
        out = guest.output()
        assert rc == -signal.SIGABRT, out
        assert "vhost_dev_start: Assertion `hdev->vhost_ops' failed." in out
        # What QEMU printed when the back-end went away (GET_VRING_BASE on a
        # dead socket).
        assert "vhost VQ 0 ring restore failed: -22: Invalid argument (22)" in out
    # The restarted back-end saw QEMU connect and vanish, and is still serving.
    assert restarted.alive
    await restarted.wait_for(lambda i: not i["connected"] and i["sessions-served"] >= 1, 10, "QEMU gone")
    # (both back-ends append to the same log file; look at the second one's part)
    restarted_log = restarted.log().rsplit("] starting ", 1)[1]
    assert restarted_log.count("front-end connected") == 1
    assert "front-end left" in restarted_log
