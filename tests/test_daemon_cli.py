"""The daemon and vhostballoon-ctl as an operator (or QEMU) runs them: real
processes, real signals, real sockets; and the control socket over a real
connection."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from backend_support import MiB, PAGE, SMALL_GUEST, wait_until
from vhostballoon.testing import Frontend, model_guest

DAEMON = [sys.executable, "-m", "vhostballoon"]
CTL = [sys.executable, "-m", "vhostballoon.ctl"]
STARTUP_TIMEOUT = 20.0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DAEMON, *args], capture_output=True, text=True, timeout=30)


def listening_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    return sock


class Daemon:
    def __init__(self, process: trio.Process, log_path: str) -> None:
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    async def wait(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def daemon(sock_dir: str, *args: str, ready: list[str], pass_fds: tuple[int, ...] = ()) -> AsyncIterator[Daemon]:
    """Run the daemon; yield once every path in ``ready`` exists (empty: at once).
    Killed on the way out if the test did not end it."""
    log_path = os.path.join(sock_dir, "daemon.log")
    with open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            [*DAEMON, *args], stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=pass_fds
        )
    proc = Daemon(process, log_path)
    try:
        if ready:
            await wait_until(
                lambda: process.returncode is not None or all(os.path.exists(p) for p in ready),
                timeout=STARTUP_TIMEOUT,
                what="the daemon to listen",
            )
            assert process.returncode is None, f"daemon exited with {process.returncode}: {proc.log()}"
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class ControlConnection:
    """A client of the control socket that stays connected: lines in, lines out."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, path: str) -> "ControlConnection":
        return cls(await trio.open_unix_socket(path))

    async def send_line(self, line: bytes) -> None:
        await self.stream.send_all(line + b"\n")

    async def receive(self, timeout: float = 10.0) -> dict:
        with trio.fail_after(timeout):
            while (newline := self.buffer.find(b"\n")) < 0:
                data = await self.stream.receive_some(65536)
                assert data, "the back-end closed the control connection"
                self.buffer += data
        line = bytes(self.buffer[:newline])
        del self.buffer[: newline + 1]
        return json.loads(line)

    async def execute(self, command: str, **arguments) -> dict:
        """One command; events that arrive first are skipped."""
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        await self.send_line(json.dumps(request).encode())
        while "event" in (reply := await self.receive()):
            pass
        return reply

    async def aclose(self) -> None:
        await self.stream.aclose()


# -- the command line ---------------------------------------------------------------------


def test_print_capabilities_prints_json_and_exits_0():
    result = run_cli("--print-capabilities")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["type"] == "balloon"


def test_help_names_the_options():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--socket-path", "--fd", "--control-socket", "--print-capabilities"):
        assert option in result.stdout


def test_no_socket_argument_is_a_usage_error():
    result = run_cli()
    assert result.returncode == 2
    assert "one of --socket-path PATH or --fd N is required" in result.stderr


# -- the daemon's life --------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_ends_the_daemon_cleanly_and_removes_its_sockets(sock_dir, signum):
    path = os.path.join(sock_dir, "vb.sock")
    control = os.path.join(sock_dir, "control.sock")
    async with daemon(sock_dir, "--socket-path", path, "--control-socket", control, ready=[path, control]) as d:
        d.process.send_signal(signum)
        assert await d.wait() == 0, d.log()
    assert not os.path.exists(path)
    assert not os.path.exists(control)
    assert f"signal={signal.Signals(signum).name}" in d.log()


async def test_listening_fd_is_served(sock_dir):
    path = os.path.join(sock_dir, "qemu-made.sock")
    listener = listening_socket(path)
    with listener:
        fd = listener.fileno()
        args = ("--fd", str(fd))  # no --control-socket: the default is the socket's path + .ctl
        async with daemon(sock_dir, *args, ready=[path + ".ctl"], pass_fds=(fd,)) as d:
            listener.close()  # the daemon has its own copy now
            control = await ControlConnection.connect(path + ".ctl")
            async with model_guest(path, ram_size=64 * MiB) as guest:
                before = guest.ram.allocated_bytes()
                assert await control.execute("balloon", value=60 * MiB) == {"return": {}}
                await guest.wait_for_target(4 * MiB // PAGE)
                assert before - guest.ram.allocated_bytes() >= 4 * MiB - PAGE
                info = (await control.execute("query-balloon"))["return"]
                assert info["actual"] == 60 * MiB and info["connected"] is True
            await control.aclose()
            d.process.send_signal(signal.SIGTERM)
            assert await d.wait() == 0, d.log()
    assert not os.path.exists(path + ".ctl")
    assert os.path.exists(path)  # not the daemon's to remove: whoever passed the fd made it


async def test_stale_socket_file_is_replaced(sock_dir):
    path = os.path.join(sock_dir, "vb.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays behind, nobody listens: a crashed back-end's leftover
    with pytest.raises(ConnectionRefusedError):
        await Frontend.connect(path)
    async with daemon(sock_dir, "--socket-path", path, ready=[path + ".ctl"]) as d:
        async with await Frontend.connect(path) as frontend:
            await frontend.initialize()  # answered: the new socket is served
            assert frontend.max_mem_slots == 32
        d.process.send_signal(signal.SIGTERM)
        assert await d.wait() == 0, d.log()


async def test_socket_with_a_live_listener_is_refused(sock_dir):
    path = os.path.join(sock_dir, "vb.sock")
    with listening_socket(path):
        async with daemon(sock_dir, "--socket-path", path, ready=[]) as d:
            assert await d.wait() == 1
        assert os.path.exists(path)  # the other back-end's socket is left alone
    assert f"{path}: another process is already listening on it" in d.log()
    assert not os.path.exists(path + ".ctl")


async def test_log_format_json_gives_json_lines(sock_dir):
    path = os.path.join(sock_dir, "vb.sock")
    async with daemon(sock_dir, "--socket-path", path, "--log-format", "json", ready=[path, path + ".ctl"]) as d:
        async with await Frontend.connect(path) as frontend:
            await frontend.initialize()
        d.process.send_signal(signal.SIGTERM)
        assert await d.wait() == 0
    lines = [line for line in d.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    events = [r["event"] for r in records]
    assert "listening" in events and "front-end connected" in events
    listening = records[events.index("listening")]
    assert listening["socket"] == path and listening["level"] == "info"
    assert any(r.get("frontend") == 1 for r in records)  # the session's context travels along


# -- the control socket over a real connection ----------------------------------------------------


async def test_control_socket_commands_errors_and_events(backend):
    control = await ControlConnection.connect(backend.control_path)
    listener = await ControlConnection.connect(backend.control_path)  # stays connected for events
    try:
        assert await control.execute("balloon", value=200 * MiB) == {"return": {}}
        info = (await control.execute("query-balloon"))["return"]
        assert info["target"] == 200 * MiB and info["connected"] is False

        # Garbage gets an error each time, and the connection stays usable.
        for line, klass, fragment in [
            (b"{not json", "GenericError", "not a JSON object"),
            (b"[1, 2]", "GenericError", "expected a JSON object, got list"),
            (b'{"execute": "quit", "id": 9}', "CommandNotFound", "unknown command 'quit'"),
            (b'{"execute": "balloon", "arguments": {"value": -5}}', "GenericError", "-5"),
        ]:
            await control.send_line(line)
            reply = await control.receive()
            assert reply["error"]["class"] == klass
            assert fragment in reply["error"]["desc"]
        assert reply.get("id") is None
        await control.send_line(b'{"execute": "query-balloon", "id": 7}')
        reply = await control.receive()
        assert reply["id"] == 7 and reply["return"]["target"] == 200 * MiB

        # A client that stays connected sees BALLOON_CHANGE during the inflates:
        # the kept target (200 MiB) as the guest connects, then 128 MiB.
        async with model_guest(backend.socket_path, ram_size=SMALL_GUEST) as guest:
            await guest.wait_for_target((SMALL_GUEST - 200 * MiB) // PAGE)
            assert await control.execute("balloon", value=128 * MiB) == {"return": {}}
            actuals = []
            while not actuals or actuals[-1] != 128 * MiB:
                event = await listener.receive()
                assert event["event"] == "BALLOON_CHANGE"
                assert set(event["timestamp"]) == {"seconds", "microseconds"}
                actuals.append(event["data"]["actual"])
            # The guest's writes of actual after each inflate buffer of 256
            # PFNs (1 MiB), in order; a burst of writes is one event, the
            # latest (as QEMU throttles BALLOON_CHANGE), so some steps may be
            # skipped but none comes out of order and the last is there.
            steps = set(range(SMALL_GUEST - 1 * MiB, 128 * MiB - 1, -1 * MiB))
            assert actuals == sorted(set(actuals), reverse=True)
            assert set(actuals) <= steps and actuals[-1] == 128 * MiB
            assert guest.actual_pages == (SMALL_GUEST - 128 * MiB) // PAGE
    finally:
        await control.aclose()
        await listener.aclose()


# -- vhostballoon-ctl ---------------------------------------------------------------------------------


async def test_ctl_balloon_wait_reaches_the_target(backend):
    async with model_guest(backend.socket_path, ram_size=SMALL_GUEST) as guest:
        before = guest.ram.allocated_bytes()
        result = await trio.run_process(
            [*CTL, "--socket-path", backend.socket_path, "balloon", "64M", "--wait"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        stdout = result.stdout.decode()
        assert result.returncode == 0, result.stderr.decode()
        assert "target set: 64.0 MiB" in stdout
        assert "reached: guest has 64.0 MiB (67108864 bytes)" in stdout
        assert backend.service.query()["actual"] == 64 * MiB
        assert guest.actual_pages == (SMALL_GUEST - 64 * MiB) // PAGE
        assert before - guest.ram.allocated_bytes() >= 190 * MiB


async def test_ctl_balloon_wait_without_a_frontend_says_so(backend):
    result = await trio.run_process(
        [*CTL, "--socket-path", backend.socket_path, "balloon", "64M", "--wait"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert "no front-end is connected" in result.stderr.decode()
    assert backend.service.target_bytes == 64 * MiB  # kept for the next guest
