"""``--sandbox``: the seccomp allow-list (vhostballoon/server/sandbox.py).

That the sandboxed daemon does its whole job is shown by the canary run
with ``--sandbox`` (tests/test_canary.py) and, with a real QEMU, by
tests/e2e/test_qemu_least_privilege.py.  Here: a call outside the list
kills the process (SIGSYS), and without the binding the daemon refuses to
start instead of running unconfined."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from vhostballoon.server.sandbox import ALLOWED_SYSCALLS, SELFTEST_ENV

DAEMON = [sys.executable, "-m", "vhostballoon", "--log-format", "json"]


def run_daemon(sock_dir: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DAEMON, "--socket-path", os.path.join(sock_dir, "vb.sock"), *args],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=30,
    )


def test_a_forbidden_syscall_kills_the_process(sock_dir):
    pytest.importorskip("pyseccomp")
    done = run_daemon(sock_dir, "--sandbox", env={SELFTEST_ENV: "execve"})
    assert done.returncode == -signal.SIGSYS, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "sandbox applied" in done.stderr
    assert "calling execve" in done.stderr  # it got as far as the forbidden call, and no further


def test_without_the_binding_sandbox_refuses_to_start(sock_dir, tmp_path):
    (tmp_path / "pyseccomp.py").write_text("raise ImportError('pyseccomp hidden by the test')\n")
    done = run_daemon(sock_dir, "--sandbox", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "--sandbox needs the pyseccomp package" in done.stderr
    assert not os.path.exists(os.path.join(sock_dir, "vb.sock"))  # nothing left listening


def test_the_allow_list_leaves_out_what_a_balloon_never_needs():
    for dangerous in ("execve", "execveat", "fork", "vfork", "ptrace", "mount", "bpf", "kexec_load",
                      "init_module", "setuid", "io_uring_setup", "connect", "socket", "process_vm_writev"):
        assert dangerous not in ALLOWED_SYSCALLS, dangerous
