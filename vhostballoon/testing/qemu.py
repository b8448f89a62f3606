"""A real QEMU and a real Linux guest, driven over the guest's serial console.

The guest is the one ``../shared/e2e/build-guest.sh`` builds: its /init prints
``@@VB READY`` and then answers one command per line between ``@@VB BEGIN``
and ``@@VB END <rc>`` (mem, feat, vmstat, fill N, unfill, sleep, sh, off).

Guest RAM is a shared memfd, so the host memory behind the guest is the
memfd's allocated blocks, read through ``/proc/<qemu pid>/fd``.  By default
QEMU creates it (``memory-backend-memfd``); ``QemuGuest.start(ram_fd=...)``
uses a file the caller opened instead (``memory-backend-file`` on
``/proc/self/fd/N``, 2 MiB aligned), which is how guest RAM gets transparent
huge pages: QEMU maps ``memory-backend-memfd`` only 4 KiB-aligned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

E2E_DIR = Path(os.environ.get("VB_E2E_DIR", "/opt/vb-e2e"))
QEMU_BIN = E2E_DIR / "qemu" / "bin" / "qemu-system-x86_64"
GUEST_DIR = E2E_DIR / "guest"  # Debian 12's 6.1 kernel
GUEST_612_DIR = E2E_DIR / "guest-6.12"  # Debian 12's 6.12 kernel, when the rig built it
GUEST_KERNEL = GUEST_DIR / "vmlinuz"
GUEST_INITRD = GUEST_DIR / "initramfs.gz"
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


# The name of a memfd the caller creates for guest RAM (QemuGuest.start(ram_fd=...)):
# it finds QEMU's mapping of it in /proc/PID/smaps.
GUEST_RAM_NAME = "vb-guest-ram"


def build_patched_qemu(patches: list[Path], build_script: Path) -> tuple[Path | None, str]:
    """The ``qemu-system-x86_64`` that ``build_script`` (the rig's
    build-qemu.sh) builds with ``patches`` applied, or (None, why not).

    The rig caches each build by the patches' hash, so this returns at once
    when that build exists; else it compiles QEMU (minutes).  When it fails,
    the reason ends with the script's last lines."""
    if not patches:
        return None, "no patches given"
    if not build_script.exists():
        return None, f"{build_script} is missing"
    result = subprocess.run(
        ["bash", str(build_script)],
        env={**os.environ, "QEMU_PATCHES": " ".join(str(p) for p in patches)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = result.stdout.splitlines()
    prefix = next((line.split("=", 1)[1] for line in reversed(lines) if line.startswith("QEMU_PREFIX=")), None)
    if result.returncode != 0 or prefix is None:
        return None, f"{build_script} with QEMU_PATCHES failed (rc {result.returncode}): " + " | ".join(lines[-8:])
    qemu = Path(prefix) / "bin" / "qemu-system-x86_64"
    if not os.access(qemu, os.X_OK):
        return None, f"{build_script} printed QEMU_PREFIX={prefix} but {qemu} is not executable"
    return qemu, ""


def build_guest_module(source: Path, guest_dir: Path, out_dir: Path) -> tuple[Path | None, str]:
    """Build the kernel module in ``source`` (a directory with a kbuild
    Makefile taking ``KDIR``) for the rig's guest in ``guest_dir`` (its
    ``build`` link to the guest kernel's headers), in a copy under
    ``out_dir``; returns (the .ko, "") or (None, why not)."""
    kdir = guest_dir / "build"
    if not (kdir / "Makefile").exists():
        return None, f"no guest kernel headers at {kdir} (run the rig's build-guest.sh)"
    copy = out_dir / source.name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.o", "*.ko", "*.mod*", ".*.cmd", "Module.symvers", "modules.order"))
    result = subprocess.run(
        ["make", "-C", str(copy), f"KDIR={kdir}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    kos = sorted(copy.glob("*.ko"))
    if result.returncode != 0 or len(kos) != 1:
        return None, f"make -C {copy} KDIR={kdir} failed (rc {result.returncode}): " + " | ".join(result.stdout.splitlines()[-10:])
    return kos[0], ""


def guest_initrd_with_modules(out: Path, modules: list[Path], guest_dir: Path, rig_script: Path) -> Path:
    """The guest's initramfs plus ``modules`` (the rig's add-guest-modules.sh);
    boot it with ``append="vb.balloon=NAME"`` to load NAME.ko as the balloon."""
    subprocess.run(
        ["bash", str(rig_script), str(out), *map(str, modules)], env={**os.environ, "GUEST": str(guest_dir)},
        check=True, stdout=subprocess.DEVNULL,
    )
    return out


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


def balloon_vhost_user_args(
    socket_path: str, *, num_vqs: int = 5, vq_size: int = 128, chardev_id: str = "vb", reconnect_ms: int | None = None
) -> list[str]:
    return [
        "-chardev", vhost_user_chardev_spec(socket_path, chardev_id=chardev_id, reconnect_ms=reconnect_ms),
        "-device",
        f"vhost-user-test-device-pci,chardev={chardev_id},virtio-id=5,num_vqs={num_vqs},config_size=16,vq_size={vq_size}",
    ]


def vhost_user_chardev_spec(socket_path: str, *, chardev_id: str = "vb", reconnect_ms: int | None = None) -> str:
    """The ``-chardev`` value for a client socket to the back-end."""
    spec = f"socket,id={chardev_id},path={socket_path}"
    return spec + (f",reconnect-ms={reconnect_ms}" if reconnect_ms is not None else "")


def balloon_device_add_args(
    *, chardev_id: str = "vb", bus: str | None = None, device_id: str = "balloon0", num_vqs: int = 5, vq_size: int = 128
) -> dict:
    """QMP ``device_add`` arguments for the balloon over vhost-user (same
    properties as :func:`balloon_vhost_user_args`), e.g. for hot-adding it
    behind a ``pcie-root-port``."""
    args = {
        "driver": "vhost-user-test-device-pci", "id": device_id, "chardev": chardev_id,
        "virtio-id": 5, "num_vqs": num_vqs, "config_size": 16, "vq_size": vq_size,
    }
    if bus is not None:
        args["bus"] = bus
    return args


def balloon_builtin_args(*, free_page_reporting: bool = True) -> list[str]:
    return ["-device", f"virtio-balloon-pci,free-page-reporting={'on' if free_page_reporting else 'off'}"]


class QmpSession:
    """One open QMP connection; events that arrive are kept in ``events``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.events: list[dict] = []
        self._buffer = b""

    async def _reply(self) -> dict:
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                msg = json.loads(line)
                if "return" in msg or "error" in msg:
                    return msg
                if "event" in msg:
                    self.events.append(msg)
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise GuestError("QMP connection closed")
            self._buffer += chunk

    async def execute(self, command: str, **arguments) -> dict:
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        await self.stream.send_all(json.dumps(msg).encode() + b"\n")
        answer = await self._reply()
        if "error" in answer:
            raise GuestError(f"QMP {command}: {answer['error']}")
        return answer["return"]


class QemuGuest:
    """One QEMU process with a guest on its serial console (stdio)."""

    def __init__(self, process: trio.Process, workdir: Path, memory_bytes: int, ram_fd: int | None = None) -> None:
        self.process = process
        self.workdir = workdir
        self.memory_bytes = memory_bytes
        self.ram_fd = ram_fd  # the caller's guest-RAM file (start(ram_fd=...)), else None
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
        paused: bool = False,
        wait_ready: bool = True,
        ram_fd: int | None = None,
        ram_align: str = "2M",
        qemu_bin: Path | str | None = None,
        kernel: Path | str | None = None,
        initrd: Path | str | None = None,
        ram_options: str = "",
    ) -> "QemuGuest":
        """Start QEMU; by default wait until the guest is ready for commands.

        ``paused`` passes ``-S`` (the vCPUs wait for QMP ``cont``; give
        ``wait_ready=False`` too, then :meth:`wait_ready` after ``cont``).
        ``wait_ready=False`` returns as soon as the process is started.

        ``ram_fd``: guest RAM is this already open file (e.g. a memfd the
        caller created and sized to ``memory_mib``), inherited by QEMU and
        opened there as ``memory-backend-file,mem-path=/proc/self/fd/N,
        share=on,align=<ram_align>``.  With the default 2 MiB alignment QEMU's
        mapping can hold PMD-size transparent huge pages (QEMU madvises guest
        RAM MADV_HUGEPAGE).  The caller keeps the fd open and closes it after
        :meth:`kill`; :meth:`host_allocated` then measures that file.

        ``qemu_bin``: another ``qemu-system-x86_64`` than the stock one, e.g.
        a patched build (:func:`build_patched_qemu`).

        ``kernel``/``initrd``: another guest than the rig's default one, e.g.
        an initramfs that carries a guest module (:func:`guest_initrd_with_modules`;
        pick the driver with ``append="vb.balloon=NAME"``) or the rig's
        Linux 6.12 guest.

        ``ram_options``: more properties of QEMU's own memfd backend, e.g.
        ``hugetlb=on,hugetlbsize=2M`` for hugetlbfs guest RAM (reserve
        ``nr_hugepages`` first).
        """
        workdir = Path(workdir)
        if ram_fd is None:
            ram_backend = f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on" + (f",{ram_options}" if ram_options else "")
        else:
            ram_backend = (
                f"memory-backend-file,id=mem,mem-path=/proc/self/fd/{ram_fd},share=on,"
                f"align={ram_align},size={memory_mib}M"
            )
        args = [
            str(qemu_bin or QEMU_BIN), "-accel", "tcg", "-cpu", "max", "-smp", "2",
            "-m", f"{memory_mib}M",
            "-object", ram_backend,
            "-machine", "q35,memory-backend=mem",
            "-nodefaults", "-nographic", "-serial", "stdio",
            "-kernel", str(kernel or GUEST_KERNEL), "-initrd", str(initrd or GUEST_INITRD),
            "-append", f"console=ttyS0 quiet {append}".strip(),
        ]
        if qmp:
            args += ["-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off"]
        if paused:
            args.append("-S")
        args += list(device_args) + list(extra_args)
        (workdir / "qemu.cmdline").write_text(" ".join(args) + "\n")
        process = await trio.lowlevel.open_process(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=() if ram_fd is None else (ram_fd,),
        )
        guest = cls(process, workdir, memory_mib << 20, ram_fd=ram_fd)
        if wait_ready:
            try:
                await guest.wait_ready()
            except BaseException:
                await guest.kill()
                raise
        return guest

    async def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait for the guest's ``@@VB READY`` line."""
        return await self.wait_for(rf"^{MARK} READY", timeout)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        """Keep reading QEMU's output until it exits; return its exit status
        (negative: the signal that ended it). The output is in :meth:`output`."""
        with trio.fail_after(timeout):
            try:
                while True:
                    await self._read_line()
            except GuestError:
                pass
            if self._buffer:
                self.console.append(self._buffer.decode(errors="replace").replace("\r", ""))
                self._buffer = b""
            return await self.process.wait()

    def output(self) -> str:
        """Everything QEMU and the guest printed so far (stdout and stderr)."""
        return "\n".join(self.console)

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
        """/proc path of QEMU's guest-RAM file: its memory-backend-memfd id=mem,
        or, with ``ram_fd``, an fd of QEMU's on the caller's file."""
        fd_dir = f"/proc/{self.process.pid}/fd"
        want = None
        if self.ram_fd is not None:
            st = os.fstat(self.ram_fd)
            want = (st.st_dev, st.st_ino)
        for name in os.listdir(fd_dir):
            path = f"{fd_dir}/{name}"
            try:
                if want is None:
                    if os.readlink(path).startswith("/memfd:mem"):
                        return path
                else:
                    st = os.stat(path)
                    if (st.st_dev, st.st_ino) == want:
                        return path
            except OSError:
                continue
        raise GuestError(f"QEMU pid {self.process.pid} has no guest-RAM memfd open")

    def host_allocated(self) -> int:
        """Bytes of host memory really behind guest RAM (the memfd's blocks)."""
        if self.ram_fd is not None:  # the same file QEMU maps: no /proc walk needed
            return os.fstat(self.ram_fd).st_blocks * 512
        return os.stat(self.memfd_path()).st_blocks * 512

    async def qmp(self, command: str, **arguments) -> dict:
        """One QMP command on a fresh connection (capabilities negotiated)."""
        async with self.qmp_session() as session:
            return await session.execute(command, **arguments)

    @asynccontextmanager
    async def qmp_session(self):
        """A QMP connection kept open for several commands (e.g. polling
        ``query-balloon`` without reconnecting each time)."""
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with sock:
            await sock.connect(str(self.workdir / "qmp.sock"))
            session = QmpSession(trio.SocketStream(sock))
            await session.execute("qmp_capabilities")
            yield session

    async def wait_qmp(self, timeout: float = 20.0) -> dict:
        """Wait until QEMU's QMP socket answers; returns ``query-status``."""
        with trio.fail_after(timeout):
            while True:
                if self.process.poll() is not None:
                    raise GuestError(f"QEMU exited (rc {self.process.returncode}) before QMP answered")
                try:
                    return await self.qmp("query-status")
                except (OSError, GuestError):
                    await trio.sleep(0.05)

    async def device_add(self, driver: str, **properties) -> dict:
        """QMP ``device_add`` (e.g. to hot-add a device behind a pcie-root-port)."""
        return await self.qmp("device_add", driver=driver, **properties)

    async def chardev_connected(self, chardev_id: str) -> bool:
        """Whether a socket chardev is connected now (``query-chardev``: a
        client socket's filename starts with ``disconnected:`` until it is)."""
        for dev in await self.qmp("query-chardev"):
            if dev["label"] == chardev_id:
                return not dev["filename"].startswith("disconnected:")
        raise GuestError(f"no chardev {chardev_id!r}")

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


@asynccontextmanager
async def balloon_guest(workdir, socket_path: str, name: str = "guest", *, num_vqs: int = 5, **start_options):
    """A real guest whose balloon is the back-end on ``socket_path``, in its
    own ``workdir/name`` directory; QEMU is killed on exit.  ``num_vqs``:
    the queues QEMU's generic device gives the guest (7 covers the range
    queues with every other feature)."""
    d = Path(workdir) / name
    d.mkdir()
    guest = await QemuGuest.start(d, balloon_vhost_user_args(socket_path, num_vqs=num_vqs), **start_options)
    try:
        yield guest
    finally:
        await guest.kill()
