"""``--sandbox``: a seccomp allow-list applied once the sockets are bound.

After start-up the back-end only needs to accept front-ends and control
clients, read and write on their sockets (fds ride on SCM_RIGHTS), map the
memfds QEMU passes, wait on eventfds with epoll (trio), run discards in
worker threads (fallocate, madvise), read a few /proc and sysfs files
(fstatfs of a region, the THP knobs, its own fd table) and save the target
in the state directory.  Everything else (execve, ptrace, mount, bpf, kexec,
io_uring, opening network sockets of other families...) kills the whole
process: the filter's default action is SECCOMP_RET_KILL_PROCESS, as
virtiofsd's ``--seccomp=kill``.  The filter is synchronised to every thread
that exists (TSYNC) and inherited by the ones started later.

The binding is pyseccomp (PyPI, ctypes over the system's libseccomp.so.2;
Debian: ``libseccomp2``, present on every systemd machine).  Without it,
``--sandbox`` refuses to start rather than run unconfined.
"""

from __future__ import annotations

import os

import structlog

log = structlog.get_logger("vhostballoon.sandbox")

# Set to "execve" to make the back-end try a forbidden call right after the
# filter is loaded (tests check that it dies of SIGSYS).
SELFTEST_ENV = "VHOSTBALLOON_SANDBOX_SELFTEST"

# x86-64 and aarch64 names; libseccomp skips the ones an architecture lacks.
ALLOWED_SYSCALLS = (
    # I/O on fds we hold: sockets, eventfds, the memfds, the state file, logs
    "read", "readv", "pread64", "write", "writev", "pwrite64", "lseek", "close", "close_range",
    "recvmsg", "sendmsg", "recvfrom", "sendto", "shutdown", "accept", "accept4",
    "getsockname", "getpeername", "getsockopt", "setsockopt",
    "fcntl", "ioctl", "dup", "dup2", "dup3", "pipe2",
    # trio's event loop and its wakeups
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd2",
    "poll", "ppoll", "select", "pselect6",
    # memory: guest RAM mappings, the allocator, worker thread stacks
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk", "fallocate", "ftruncate",
    # threads (trio.to_thread for discards), locks, signals, time
    "clone", "clone3", "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address",
    "exit", "exit_group", "gettid", "getpid", "getppid", "tgkill", "kill",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
    "sched_yield", "sched_getaffinity", "getrandom", "prctl", "prlimit64", "getrlimit",
    "getuid", "geteuid", "getgid", "getegid", "uname", "sysinfo", "getcwd",
    # files: fstatfs of a region's fd, THP knobs in sysfs, /proc/self/fd, the state directory
    "openat", "open", "newfstatat", "fstat", "stat", "lstat", "statx", "fstatfs", "statfs",
    "getdents64", "readlink", "readlinkat", "access", "faccessat", "faccessat2",
    "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat", "fsync", "fdatasync",
)


class SandboxError(Exception):
    """The sandbox cannot be applied; the daemon must not start unconfined."""


def apply_sandbox() -> int:
    """Load the allow-list into this process (all threads).  Returns how
    many syscalls it allows.  Raises SandboxError when it cannot."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as exc:  # pyseccomp raises OSError when libseccomp.so.2 is missing
        raise SandboxError(
            f"--sandbox needs the pyseccomp package and libseccomp.so.2 ({exc}); "
            "pyseccomp is a dependency of vhostballoon (pip install vhostballoon); the library: apt-get install libseccomp2"
        ) from None
    try:
        sandbox = seccomp.SyscallFilter(defaction=seccomp.KILL_PROCESS)
        sandbox.set_attr(seccomp.Attr.CTL_TSYNC, 1)
        allowed = 0
        for name in ALLOWED_SYSCALLS:
            try:
                sandbox.add_rule(seccomp.ALLOW, name)
            except (ValueError, OSError):  # not a syscall on this architecture
                continue
            allowed += 1
        sandbox.load()
    except OSError as exc:
        raise SandboxError(f"--sandbox: loading the seccomp filter failed: {exc}") from None
    log.info("sandbox applied: seccomp allow-list, anything else kills the process", allowed_syscalls=allowed)
    selftest = os.environ.get(SELFTEST_ENV)
    if selftest == "execve":
        log.warning("sandbox self-test: calling execve, which must kill this process", env=SELFTEST_ENV)
        os.execv("/bin/true", ["true"])
    elif selftest:
        raise SandboxError(f"{SELFTEST_ENV}={selftest!r}: only 'execve' is known")
    return allowed
