"""The daemon: a vhost-user listener (one front-end at a time), the control
socket, and a clean exit on SIGTERM/SIGINT."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
from dataclasses import dataclass

import structlog
import trio

from .control import serve_control
from .metrics import open_metrics_listener, registry_for, serve_metrics
from .sandbox import SandboxError, apply_sandbox
from .service import BalloonService
from .session import FrontendSession
from .transport import FdStream

log = structlog.get_logger("vhostballoon.daemon")


class StartupError(Exception):
    """The daemon cannot start as asked (socket in use, bad --fd, ...)."""


def _remove_stale_socket(path: str) -> None:
    """A socket file nobody listens on is left from a previous run: remove it.
    One somebody listens on means another back-end: refuse."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as exc:
        raise StartupError(f"cannot probe existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise StartupError(f"{path}: another process is already listening on it")


def bind_unix_listener(path: str, backlog: int = 4) -> socket.socket:
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from exc
    return sock


def adopt_listening_fd(fd: int) -> socket.socket:
    """--fd N: an already bound and listening unix stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise StartupError(f"--fd {fd}: not a socket ({exc.strerror})") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise StartupError(f"--fd {fd}: not a unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise StartupError(f"--fd {fd}: the socket is not listening")
    os.set_inheritable(fd, False)
    return sock


@dataclass
class Backend:
    """What a started back-end tells the code that started it."""

    service: BalloonService
    socket_path: str | None
    control_path: str | None
    metrics_address: tuple[str, int] | None = None  # where /metrics listens (port 0 resolved)


async def serve_frontends(listener: socket.socket, service: BalloonService) -> None:
    """Accept front-ends one at a time; the next is accepted when one leaves."""
    tl = trio.socket.from_stdlib_socket(listener)
    while True:
        conn, _ = await tl.accept()
        service.sessions_served += 1
        number = service.sessions_served
        with structlog.contextvars.bound_contextvars(frontend=number):
            log.info("front-end connected")
            session = FrontendSession(FdStream(conn), service, features=service.features,
                                      fast_config=service.fast_config)
            service.session = session
            try:
                await session.run()
            except Exception:  # a bug must not take the daemon down with it
                log.exception("session failed; serving the next front-end")
            finally:
                service.session = None
                log.info("front-end session ended")


async def run_backend(
    socket_path: str | None = None,
    *,
    listen_fd: int | None = None,
    control_path: str | None = None,
    service: BalloonService | None = None,
    sandbox: bool = False,
    metrics_address: str | None = None,
    name: str | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the back-end until cancelled. Exactly one of socket_path/listen_fd.
    ``control_path`` None means socket_path + ".ctl"; "" disables it.
    ``sandbox``: once both sockets are bound, load the seccomp allow-list
    (server.sandbox) before serving anything. ``metrics_address``
    HOST:PORT: serve /metrics there (server.metrics), every metric labelled
    ``vm=name`` (default: the socket path)."""
    if (socket_path is None) == (listen_fd is None):
        raise StartupError("give exactly one of a socket path or a listening fd")
    service = service or BalloonService()
    created: list[str] = []
    listener = bind_unix_listener(socket_path) if socket_path else adopt_listening_fd(listen_fd)
    if socket_path:
        created.append(socket_path)
    if control_path is None:
        bound = socket_path or listener.getsockname()
        control_path = f"{bound}.ctl" if isinstance(bound, str) and bound and not bound.startswith("\0") else ""
    control_listener = None
    metrics_listener = None
    try:
        if metrics_address:
            try:
                metrics_listener = await open_metrics_listener(metrics_address)
            except (OSError, ValueError) as exc:
                raise StartupError(str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)) from None
        if control_path:
            control_sock = bind_unix_listener(control_path, backlog=16)
            created.append(control_path)
            control_listener = trio.SocketListener(trio.socket.from_stdlib_socket(control_sock))
        else:
            log.warning("no control socket (give --control-socket PATH to have one)")
        if sandbox:
            try:
                apply_sandbox()
            except SandboxError as exc:
                raise StartupError(str(exc)) from None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_frontends, listener, service)
            if control_listener is not None:
                nursery.start_soon(serve_control, control_listener, service)
            bound_metrics = None
            if metrics_listener is not None:
                label = name or socket_path or f"fd {listen_fd}"
                nursery.start_soon(serve_metrics, metrics_listener, registry_for(service.query, service.query_stats, label))
                bound_metrics = metrics_listener.socket.getsockname()[:2]
                log.info("metrics listening", address=f"{bound_metrics[0]}:{bound_metrics[1]}", vm=label)
            log.info("listening", socket=socket_path or f"fd {listen_fd}", control=control_path or None)
            task_status.started(Backend(service, socket_path, control_path or None, bound_metrics))
    finally:
        # Synchronous clean-up only: we may be inside a cancelled scope here,
        # where any checkpoint would raise Cancelled and skip the unlinks.
        listener.close()
        if control_listener is not None:
            control_listener.socket.close()
        if metrics_listener is not None:
            metrics_listener.socket.close()
        for path in created:
            try:
                os.unlink(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("could not remove socket file", path=path, error=exc.strerror)


async def run_until_signalled(**kwargs) -> int:
    """The daemon's main: serve until SIGTERM or SIGINT, then exit cleanly."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_backend(task_status=task_status, **kwargs))
            async for signum in signals:
                log.info("signal received: shutting down", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0
