#!/usr/bin/env python3
"""Record what a real QEMU and vhostballoon say to each other.

    .venv/bin/python scripts/record_qemu_transcript.py [--scenario balloon|boot]
        [--qemu PATH] [--out FILE] [--memory MIB]

The script runs one whole scenario by itself:

1. starts the back-end, ``vhostballoon --socket-path BACKEND.sock``;
2. listens on a proxy socket and starts QEMU (the command line of
   ``/work/shared/e2e/QEMU.md``) with its vhost-user chardev on the proxy;
3. forwards every chunk in both directions exactly as received, bytes and
   fds (one ``recvmsg`` in, one ``sendmsg`` out with the same SCM_RIGHTS
   fds), and on the side feeds a copy (the bytes and ``os.dup`` s of the fds)
   to the codec's decoders to record each message;
4. interposes on the back-end channel (SET_BACKEND_REQ_FD): the back-end gets
   one end of a fresh socketpair instead of QEMU's socket, and the proxy
   relays between the two, so CONFIG_CHANGE_MSG and its ack are recorded
   too (``--no-backend-channel`` passes QEMU's fd through untouched);
5. ``balloon``: waits for ``@@VB READY``, runs ``vhostballoon-ctl ... balloon
   512M --wait`` and then ``balloon 1G --wait`` (scaled with --memory),
   then powers the guest off. ``boot``: powers off right after READY;
6. writes the transcript as JSON (format: ``protocol/README.md``), with long
   runs of the same message pattern (GET_CONFIG/SET_CONFIG while ballooning)
   collapsed into ``{"repeat": N, "of": [...]}`` entries.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import datetime
import enum
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from vhostballoon.testing import qemu as qemu_helpers
from vhostballoon.testing.qemu import QemuGuest, balloon_vhost_user_args, provisioning_problem
from vhostballoon.vhost_user.codec import Message, MessageDecoder, close_fds
from vhostballoon.vhost_user.constants import MAX_FDS, Request
from vhostballoon.vhost_user.errors import ProtocolError

REPO = Path(__file__).resolve().parent.parent
TRANSCRIPTS = REPO / "protocol" / "transcripts"
FORMAT_VERSION = 1
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

# Collapsing: a block of PERIOD entries with the same signature (channel,
# direction, request, flags, size, fds) that repeats back to back is kept
# KEEP_FULL times in full; the rest of the run becomes one repeat entry.
KEEP_FULL = 3
MIN_ELIDED = 5
PERIODS = (4, 2, 6, 8, 1)


class Channel(enum.Enum):
    VHOST_USER = "vhost-user"  # the chardev socket: front-end requests, back-end replies
    BACKEND = "backend"  # SET_BACKEND_REQ_FD's socket: back-end requests, front-end replies


# -- JSON form of a decoded message ------------------------------------------------


def payload_json(payload: Any) -> dict[str, Any]:
    """The payload dataclass as JSON: its type, ints as ints, bytes as hex."""
    out: dict[str, Any] = {"type": type(payload).__name__}
    for field in dataclasses.fields(payload):
        out[field.name] = _json_value(getattr(payload, field.name))
    return out


def _json_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if dataclasses.is_dataclass(value):
        return {f.name: _json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return int(value) if isinstance(value, enum.IntEnum) else value


class Recorder:
    """Collects entries from every stream, in the order the proxy saw them."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.entries: list[dict[str, Any]] = []
        self.problems: list[str] = []

    def _t(self) -> float:
        return round(time.monotonic() - self.start, 3)

    def message(self, channel: Channel, direction: str, message: Message) -> None:
        self.entries.append(
            {
                "t": self._t(),
                "channel": channel.value,
                "direction": direction,
                "request": message.name,
                "code": int(message.request),
                "flags": f"{message.flags:#x}",
                "size": message.size,
                "fds": len(message.fds),
                "payload": payload_json(message.payload),
            }
        )

    def operator(self, command: list[str], value: int) -> None:
        self.entries.append({"t": self._t(), "direction": "operator", "command": command, "value": value})

    def note(self, text: str) -> None:
        self.entries.append({"t": self._t(), "direction": "note", "text": text})

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.note(text)
        print(f"record: {text}", file=sys.stderr)


# -- the proxy ------------------------------------------------------------------------


def _fds_of(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", blob[: len(blob) - len(blob) % 4]))
    return fds


async def _recv_chunk(sock: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    data, ancdata, flags, _ = await sock.recvmsg(65536, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds = _fds_of(ancdata)
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise OSError("ancillary data truncated: more fds than a vhost-user message may carry")
    return data, fds


async def _send_chunk(sock: trio.socket.SocketType, data: bytes, fds: list[int]) -> None:
    """One sendmsg with the chunk's fds (so they stay with its first byte);
    any rest of the bytes follows without fds."""
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = await sock.sendmsg([data], anc)
    else:
        sent = await sock.send(data)
    view = memoryview(data)[sent:]
    while view:
        view = view[await sock.send(view) :]


class Tap:
    """Decodes a copy of one direction of one stream and records it."""

    def __init__(self, recorder: Recorder, channel: Channel, direction: str, decoder: MessageDecoder) -> None:
        self.recorder = recorder
        self.channel = channel
        self.direction = direction
        self.decoder = decoder
        self.broken = False

    def feed(self, data: bytes, fds: list[int]) -> list[Message]:
        """Record every message the chunk completes; returns them (their fds
        are dups owned by the caller, who must close them)."""
        if self.broken:
            return []
        dups = [os.dup(fd) for fd in fds]
        messages: list[Message] = []
        try:
            self.decoder.feed(data, dups)
            while (message := self.decoder.next_message()) is not None:
                self.recorder.message(self.channel, self.direction, message)
                messages.append(message)
        except ProtocolError as exc:
            self.broken = True  # keep forwarding; stop decoding this stream
            self.recorder.problem(f"{self.channel.value} {self.direction}: cannot decode: {exc}")
        return messages

    def close(self) -> None:
        self.decoder.close()


class Proxy:
    """Accepts QEMU on ``listen_path``, connects to the back-end on
    ``backend_path``, and forwards both ways until both sides are done."""

    def __init__(self, recorder: Recorder, listen_path: str, backend_path: str, *, interpose: bool) -> None:
        self.recorder = recorder
        self.listen_path = listen_path
        self.backend_path = backend_path
        self.interpose = interpose
        self.chunks = {"front-end": 0, "back-end": 0}
        self.done = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            await listener.bind(self.listen_path)
            listener.listen(1)
            task_status.started()
            qemu, _ = await listener.accept()
        backend = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await backend.connect(self.backend_path)
        to_backend = Tap(self.recorder, Channel.VHOST_USER, "front-end", MessageDecoder.for_requests())
        to_qemu = Tap(self.recorder, Channel.VHOST_USER, "back-end", MessageDecoder.for_replies())
        try:
            with qemu, backend:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._pump, qemu, backend, to_backend, True)
                    nursery.start_soon(self._pump, backend, qemu, to_qemu, False)
        finally:
            to_backend.close()
            to_qemu.close()
            self.done.set()

    async def _pump(self, src, dst, tap: Tap, from_frontend: bool) -> None:
        while True:
            try:
                data, fds = await _recv_chunk(src)
            except OSError as exc:
                self.recorder.problem(f"{tap.direction} side: receive failed: {exc}")
                data, fds = b"", []
            if not data:
                close_fds(fds)
                self.recorder.note(f"{tap.direction} closed the vhost-user socket")
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            self.chunks[tap.direction] += 1
            messages = tap.feed(data, fds)
            forward = fds
            substitute = None
            if from_frontend and self.interpose and fds and messages:
                last = messages[-1]
                if last.request == Request.SET_BACKEND_REQ_FD and len(fds) == 1:
                    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    substitute = theirs
                    forward = [theirs.fileno()]
                    self._nursery.start_soon(self._relay_backend_channel, fds[0], ours)
                    fds = []  # the relay owns QEMU's end now
            for message in messages:
                close_fds(message.fds)
            try:
                await _send_chunk(dst, data, forward)
            except OSError as exc:
                self.recorder.problem(f"{tap.direction} -> peer: send failed: {exc}")
                close_fds(fds)
                return
            finally:
                if substitute is not None:
                    substitute.close()
            close_fds(fds)  # the kernel passed its own copies on

    async def _relay_backend_channel(self, qemu_fd: int, ours: socket.socket) -> None:
        """The back-end channel, interposed: back-end <-> ours | qemu_fd <-> QEMU."""
        qemu_end = trio.socket.from_stdlib_socket(socket.socket(fileno=qemu_fd))
        backend_end = trio.socket.from_stdlib_socket(ours)
        requests = Tap(self.recorder, Channel.BACKEND, "back-end", MessageDecoder.for_backend_requests())
        replies = Tap(self.recorder, Channel.BACKEND, "front-end", MessageDecoder.for_backend_replies())
        self.recorder.note("back-end channel interposed by the recorder")
        try:
            with qemu_end, backend_end:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._relay, backend_end, qemu_end, requests)
                    nursery.start_soon(self._relay, qemu_end, backend_end, replies)
        finally:
            requests.close()
            replies.close()

    async def _relay(self, src, dst, tap: Tap) -> None:
        while True:
            try:
                data, fds = await _recv_chunk(src)
            except OSError:
                data, fds = b"", []
            if not data:
                close_fds(fds)
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            for message in tap.feed(data, fds):
                close_fds(message.fds)
            try:
                await _send_chunk(dst, data, fds)
            except OSError as exc:
                self.recorder.problem(f"back-end channel {tap.direction}: send failed: {exc}")
                return
            finally:
                close_fds(fds)


# -- collapsing repeated patterns ----------------------------------------------------------


def _signature(entry: dict[str, Any]) -> tuple:
    return (
        entry.get("channel"),
        entry["direction"],
        entry.get("request"),
        entry.get("flags"),
        entry.get("size"),
        entry.get("fds"),
    )


def _strip_time(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "t"}


def collapse(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace long back-to-back runs of one block of messages.

    A run of R >= KEEP_FULL + MIN_ELIDED blocks of PERIOD entries with equal
    signatures becomes: the first KEEP_FULL blocks in full, then
    ``{"repeat": R - KEEP_FULL, "of": LAST_BLOCK, "varying": [...],
    "t_first", "t_last"}``, where LAST_BLOCK is the run's last block (times
    removed) and ``varying`` names the payload fields, as ``i.field``, whose
    values differed among the elided blocks.
    """
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(entries):
        best = None
        for period in PERIODS:
            block = [_signature(e) for e in entries[i : i + period]]
            if len(block) < period or any(s[1] in ("operator", "note") for s in block):
                continue
            runs = 1
            while [_signature(e) for e in entries[i + runs * period : i + (runs + 1) * period]] == block:
                runs += 1
            if runs >= KEEP_FULL + MIN_ELIDED and (best is None or runs * period > best[0] * best[1]):
                best = (runs, period)
        if best is None:
            out.append(entries[i])
            i += 1
            continue
        runs, period = best
        out.extend(entries[i : i + KEEP_FULL * period])
        elided = entries[i + KEEP_FULL * period : i + runs * period]
        blocks = [elided[k : k + period] for k in range(0, len(elided), period)]
        varying = sorted(
            {
                f"{pos}.{name}"
                for pos in range(period)
                for name, value in blocks[0][pos]["payload"].items()
                if any(b[pos]["payload"][name] != value for b in blocks)
            }
        )
        out.append(
            {
                "repeat": len(blocks),
                "of": [_strip_time(e) for e in blocks[-1]],
                "varying": varying,
                "t_first": blocks[0][0]["t"],
                "t_last": blocks[-1][-1]["t"],
            }
        )
        i += runs * period
    return out


def expand(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The inverse of ``collapse`` for replaying: each repeat entry becomes
    its ``of`` block ``repeat`` times (payloads as in the last elided block)."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        if "repeat" in entry:
            for _ in range(entry["repeat"]):
                out.extend(entry["of"])
        else:
            out.append(entry)
    return out


# -- the scenario ----------------------------------------------------------------------------


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found next to {sys.executable} or on PATH (pip install -e . first)")
    return found


async def _wait_for_socket(path: str, process: trio.Process, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not os.path.exists(path):
            if process.poll() is not None:
                raise SystemExit(f"the back-end exited (rc {process.returncode}) before listening on {path}")
            await trio.sleep(0.02)


def _size_arg(mib: int) -> str:
    return f"{mib >> 10}G" if mib % 1024 == 0 else f"{mib}M"


async def _ctl(recorder: Recorder, socket_path: str, size: str, value: int) -> None:
    command = [_tool("vhostballoon-ctl"), "--socket-path", socket_path, "balloon", size, "--wait"]
    shown = ["vhostballoon-ctl", "--socket-path", "SOCK", "balloon", size, "--wait"]
    recorder.operator(shown, value)
    print(f"record: {' '.join(shown)}")
    started = time.monotonic()
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    took = time.monotonic() - started
    out = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()
    print(f"record:   rc {result.returncode} after {took:.1f} s: {out[-1] if out else ''}")
    if result.returncode != 0:
        recorder.problem(f"{' '.join(shown)} failed with rc {result.returncode}: {out[-3:]}")


async def record(args: argparse.Namespace) -> dict[str, Any]:
    if args.qemu is not None:
        qemu_helpers.QEMU_BIN = Path(args.qemu)  # QemuGuest.start reads the module's global
    problem = provisioning_problem()
    if problem:
        raise SystemExit(f"cannot boot the guest: {problem}")
    qemu_bin = str(qemu_helpers.QEMU_BIN)
    version = subprocess.run([qemu_bin, "--version"], capture_output=True, text=True, check=True).stdout
    version = version.splitlines()[0].strip()
    recorder = Recorder()
    workdir = Path(tempfile.mkdtemp(prefix="vb-rec-", dir="/tmp"))
    backend_path = str(workdir / "backend.sock")
    proxy_path = str(workdir / "proxy.sock")
    backend_cmd = [_tool("vhostballoon"), "--socket-path", backend_path, "--log-level", "warning"]
    backend_log = open(workdir / "backend.log", "wb")
    guest = None
    proxy_chunks: dict[str, int] = {}
    try:
        backend = await trio.lowlevel.open_process(backend_cmd, stdout=backend_log, stderr=subprocess.STDOUT)
        try:
            await _wait_for_socket(backend_path, backend)
            proxy = Proxy(recorder, proxy_path, backend_path, interpose=args.backend_channel)
            proxy_chunks = proxy.chunks
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.run)
                print(f"record: back-end on {backend_path}, proxy on {proxy_path}; booting {version}")
                guest = await QemuGuest.start(
                    workdir, balloon_vhost_user_args(proxy_path), memory_mib=args.memory, qmp=False
                )
                recorder.note("guest printed @@VB READY")
                print(f"record: guest ready after {time.monotonic() - recorder.start:.1f} s")
                if args.scenario == "balloon":
                    for mib in (args.memory // 2, args.memory):
                        await _ctl(recorder, backend_path, _size_arg(mib), mib << 20)
                recorder.note("guest told to power off")
                await guest.poweroff()
                print(f"record: QEMU exited with rc {guest.process.returncode}")
                with trio.move_on_after(10) as scope:
                    await proxy.done.wait()
                if scope.cancelled_caught:
                    recorder.problem("the proxy was still forwarding 10 s after QEMU exited")
                nursery.cancel_scope.cancel()
        finally:
            if guest is not None:
                await guest.kill()
            if backend.returncode is None:
                backend.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await backend.wait()
            if backend.returncode is None:
                backend.kill()
                await backend.wait()
        cmdline = (workdir / "qemu.cmdline").read_text().split()
    finally:
        backend_log.close()
        log_text = (workdir / "backend.log").read_text(errors="replace")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"record: kept {workdir}")
    raw = recorder.entries
    collapsed = collapse(raw)
    messages = [e for e in raw if "request" in e]
    cmdline = [_generic_path(a, workdir) for a in cmdline]
    return {
        "format": FORMAT_VERSION,
        "qemu_version": version,
        "qemu_command_line": cmdline,
        "backend_command_line": ["vhostballoon", "--socket-path", "BACKEND", "--log-level", "warning"],
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "description": SCENARIOS[args.scenario].format(memory=args.memory, half=args.memory // 2),
        "recorded_by": "scripts/record_qemu_transcript.py"
        + (" (back-end channel interposed)" if args.backend_channel else " (back-end channel not recorded)"),
        "message_count": len(messages),
        "problems": recorder.problems,
        "chunks_forwarded": proxy_chunks,
        "backend_log_tail": [line for line in log_text.splitlines() if line.strip()][-20:],
        "messages": collapsed,
    }


def _generic_path(arg: str, workdir: Path) -> str:
    arg = arg.replace(str(workdir), "WORKDIR")
    for path, name in (
        (qemu_helpers.GUEST_KERNEL, "vmlinuz"),
        (qemu_helpers.GUEST_INITRD, "initramfs.gz"),
    ):
        arg = arg.replace(str(path), f"/opt/vb-e2e/guest/{name}")
    return arg


SCENARIOS = {
    "balloon": (
        "Boot a {memory} MiB Linux guest (Debian 6.1 kernel, virtio_balloon) under QEMU with the balloon on "
        "vhost-user-test-device-pci (virtio-id 5, num_vqs 5, vq_size 128, config_size 16) served by vhostballoon; "
        "when the guest is ready, set the target to {half} MiB (vhostballoon-ctl balloon --wait), then back to "
        "{memory} MiB, then power the guest off. Operator steps and notes appear as entries in order."
    ),
    "boot": (
        "Boot a {memory} MiB Linux guest under QEMU with the balloon on vhost-user-test-device-pci (virtio-id 5, "
        "num_vqs 5, vq_size 128, config_size 16) served by vhostballoon, and power it off as soon as it is ready."
    ),
}


def dump(transcript: dict[str, Any]) -> str:
    """JSON with one message entry per line, so that diffs stay readable."""
    head = {k: v for k, v in transcript.items() if k != "messages"}
    text = json.dumps(head, indent=1)[:-2]
    lines = []
    for entry in transcript["messages"]:
        if "repeat" in entry:
            inner = ",\n   ".join(json.dumps(e) for e in entry["of"])
            rest = json.dumps({k: v for k, v in entry.items() if k != "of"})[1:-1]
            lines.append(f'  {{{rest}, "of": [\n   {inner}]}}')
        else:
            lines.append("  " + json.dumps(entry))
    return text + ',\n "messages": [\n' + ",\n".join(lines) + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="balloon")
    p.add_argument("--qemu", help=f"qemu-system-x86_64 to run (default: {qemu_helpers.QEMU_BIN})")
    p.add_argument("--out", help="transcript file (default: protocol/transcripts/qemu-VERSION-SCENARIO.json)")
    p.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB (default: 1024)")
    p.add_argument(
        "--no-backend-channel",
        dest="backend_channel",
        action="store_false",
        help="pass the back-end channel fd through untouched (CONFIG_CHANGE_MSG is then not recorded)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, console, sockets)")
    args = p.parse_args(argv)
    transcript = trio.run(record, args)
    version = transcript["qemu_version"].split()[-1]
    out = Path(args.out) if args.out else TRANSCRIPTS / f"qemu-{version}-{args.scenario}.json"
    if transcript["problems"]:  # never overwrite a good transcript with a broken one
        out = out.with_name(out.stem + ".failed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump(transcript))
    entries = transcript["messages"]
    repeats = [e for e in entries if "repeat" in e]
    print(
        f"record: {transcript['message_count']} messages recorded, {len(entries)} entries written "
        f"({len(repeats)} repeat entries covering {sum(e['repeat'] * len(e['of']) for e in repeats)} messages) "
        f"to {out} ({out.stat().st_size} bytes)"
    )
    for problem in transcript["problems"]:
        print(f"record: problem: {problem}")
    return 1 if transcript["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
