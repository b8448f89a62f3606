"""A real QEMU and a real Linux guest, driven over the guest's serial console.

The guest is the one ``../shared/e2e/build-guest.sh`` builds: its /init prints
``@@VB READY`` and then answers one command per line between ``@@VB BEGIN``
and ``@@VB END <rc>`` (mem, feat, vmstat, fill N, unfill, sleep, sh, off).

Guest RAM is a shared memfd, so the host memory behind the guest is the
memfd's allocated blocks, read through ``/proc/<qemu pid>/fd``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

E2E_DIR = Path(os.environ.get("VB_E2E_DIR", "/opt/vb-e2e"))
QEMU_BIN = E2E_DIR / "qemu" / "bin" / "qemu-system-x86_64"
GUEST_KERNEL = E2E_DIR / "guest" / "vmlinuz"
GUEST_INITRD = E2E_DIR / "guest" / "initramfs.gz"
BOOT_TIMEOUT = 90.0  # TCG boot takes ~9 s here; leave room for a loaded machine
MARK = "@@VB"


def provisioning_problem() -> str | None:
    """Why a real QEMU guest cannot run here, or None when it can."""
    for path in (QEMU_BIN, GUEST_KERNEL, GUEST_INITRD):
        if not path.exists():
            return f"{path} is missing (run ../shared/e2e/build-qemu.sh and build-guest.sh)"
    if not os.access(QEMU_BIN, os.X_OK):
        return f"{QEMU_BIN} is not executable"
    return None


class GuestError(Exception):
    pass


@dataclass
class CommandResult:
    command: str
    rc: int
    lines: list[str]

    def field(self, tag: str) -> dict[str, str]:
        """key=value pairs of the first ``@@VB <tag>`` line."""
        for line in self.lines:
            if line.startswith(f"{MARK} {tag} "):
                return dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
        raise GuestError(f"no '{MARK} {tag}' line in the answer to {self.command!r}: {self.lines}")


def balloon_vhost_user_args(socket_path: str, *, num_vqs: int = 5, vq_size: int = 128, chardev_id: str = "vb") -> list[str]:
    return [
        "-chardev", f"socket,id={chardev_id},path={socket_path}",
        "-device",
        f"vhost-user-test-device-pci,chardev={chardev_id},virtio-id=5,num_vqs={num_vqs},config_size=16,vq_size={vq_size}",
    ]


def balloon_builtin_args(*, free_page_reporting: bool = True) -> list[str]:
    return ["-device", f"virtio-balloon-pci,free-page-reporting={'on' if free_page_reporting else 'off'}"]


class QemuGuest:
    """One QEMU process with a guest on its serial console (stdio)."""

    def __init__(self, process: trio.Process, workdir: Path, memory_bytes: int) -> None:
        self.process = process
        self.workdir = workdir
        self.memory_bytes = memory_bytes
        self.console: list[str] = []  # every line the guest printed
        self._buffer = b""
        self._lock = trio.Lock()

    @classmethod
    async def start(
        cls,
        workdir: Path,
        device_args: list[str],
        *,
        memory_mib: int = 1024,
        qmp: bool = True,
        extra_args: list[str] = (),
        append: str = "",
    ) -> "QemuGuest":
        workdir = Path(workdir)
        args = [
            str(QEMU_BIN), "-accel", "tcg", "-cpu", "max", "-smp", "2",
            "-m", f"{memory_mib}M",
            "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-machine", "q35,memory-backend=mem",
            "-nodefaults", "-nographic", "-serial", "stdio",
            "-kernel", str(GUEST_KERNEL), "-initrd", str(GUEST_INITRD),
            "-append", f"console=ttyS0 quiet {append}".strip(),
        ]
        if qmp:
            args += ["-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off"]
        args += list(device_args) + list(extra_args)
        (workdir / "qemu.cmdline").write_text(" ".join(args) + "\n")
        process = await trio.lowlevel.open_process(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        guest = cls(process, workdir, memory_mib << 20)
        try:
            await guest.wait_for(rf"^{MARK} READY", BOOT_TIMEOUT)
        except BaseException:
            await guest.kill()
            raise
        return guest

    # -- console -----------------------------------------------------------------

    async def _read_line(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise GuestError(f"QEMU exited (rc {self.process.poll()}); last output: {self.console[-5:]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode(errors="replace").replace("\r", "")
        # The guest's escape sequences (SeaBIOS clears the screen) end up mid-line.
        text = text[text.find(MARK):] if MARK in text else text
        self.console.append(text)
        with open(self.workdir / "console.log", "a") as f:
            f.write(text + "\n")
        return text

    async def wait_for(self, pattern: str, timeout: float) -> str:
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                line = await self._read_line()
                if regex.search(line):
                    return line

    async def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        async with self._lock:
            await self.process.stdin.send_all(command.encode() + b"\n")
            await self.wait_for(rf"^{MARK} BEGIN {re.escape(command.split()[0])}", timeout)
            lines: list[str] = []
            with trio.fail_after(timeout):
                while True:
                    line = await self._read_line()
                    m = re.match(rf"^{MARK} END (\d+)", line)
                    if m:
                        return CommandResult(command, int(m.group(1)), lines)
                    lines.append(line)

    async def meminfo(self) -> dict[str, int]:
        return {k: int(v) for k, v in (await self.run("mem")).field("MEM").items()}

    async def vmstat(self) -> dict[str, int]:
        """The guest's balloon and compaction counters (``name value`` pairs)."""
        result = await self.run("vmstat")
        for line in result.lines:
            if line.startswith(f"{MARK} VMSTAT "):
                words = line.split()[2:]
                return {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}
        raise GuestError(f"no '{MARK} VMSTAT' line in the answer: {result.lines}")

    async def devices(self) -> list[dict[str, str]]:
        result = await self.run("feat")
        return [
            dict(kv.split("=", 1) for kv in line.split()[3:] if "=" in kv) | {"name": line.split()[2]}
            for line in result.lines
            if line.startswith(f"{MARK} DEV ")
        ]

    # -- host side -----------------------------------------------------------------

    def memfd_path(self) -> str:
        """/proc path of QEMU's guest-RAM memfd (memory-backend-memfd id=mem)."""
        fd_dir = f"/proc/{self.process.pid}/fd"
        for name in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if target.startswith("/memfd:mem"):
                return f"{fd_dir}/{name}"
        raise GuestError(f"QEMU pid {self.process.pid} has no guest-RAM memfd open")

    def host_allocated(self) -> int:
        """Bytes of host memory really behind guest RAM (the memfd's blocks)."""
        return os.stat(self.memfd_path()).st_blocks * 512

    async def qmp(self, command: str, **arguments) -> dict:
        """One QMP command on a fresh connection (capabilities negotiated)."""
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with sock:
            await sock.connect(str(self.workdir / "qmp.sock"))
            stream = trio.SocketStream(sock)
            buffer = b""

            async def reply() -> dict:
                nonlocal buffer
                while True:
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        msg = json.loads(line)
                        if "return" in msg or "error" in msg:
                            return msg
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise GuestError("QMP connection closed")
                    buffer += chunk

            for name, args in (("qmp_capabilities", {}), (command, arguments)):
                msg = {"execute": name, **({"arguments": args} if args else {})}
                await stream.send_all(json.dumps(msg).encode() + b"\n")
                answer = await reply()
                if "error" in answer:
                    raise GuestError(f"QMP {name}: {answer['error']}")
            return answer["return"]

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.move_on_after(10):
            await self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def poweroff(self, timeout: float = 20.0) -> None:
        if self.process.returncode is None:
            try:
                await self.process.stdin.send_all(b"off\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(timeout):
                await self.process.wait()
        await self.kill()
