"""The control socket: one JSON object per line, QMP-style.

    -> {"execute": "balloon", "arguments": {"value": 536870912}}
    <- {"return": {}}
    -> {"execute": "query-balloon", "id": 7}
    <- {"return": {"actual": 1073741824, ...}, "id": 7}
    <- {"event": "BALLOON_CHANGE", "data": {"actual": 1065353216}, "timestamp": {...}}
    -> {"execute": "set-huge-policy", "arguments": {"policy": "whole"}}
    <- {"return": {"huge-page-policy": "whole", "flush-bytes": 1073741824, "flush-after": 5.0}}
    -> {"execute": "query-stats"}
    <- {"return": {"stats": {"stat-free-memory": 812609536, ...}, "last-update": 1767225600,
                   "age-seconds": 1.2, "stats-interval": 5.0, "updates": 12, ...}}
    -> {"execute": "set-stats-interval", "arguments": {"interval": 2}}
    <- {"return": {"stats-interval": 2.0}}

Errors are {"error": {"class": "GenericError", "desc": "..."}}. A client that
sends garbage gets an error and may go on; one whose line grows past
MAX_LINE is told so and disconnected; one that never reads its events is
dropped once EVENT_BACKLOG events wait for it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import structlog
import trio

from .service import BalloonService, CommandError

log = structlog.get_logger("vhostballoon.control")

MAX_LINE = 64 * 1024
SEND_TIMEOUT = 5.0  # a client that does not take a reply for this long is dropped


def _command_balloon(service: BalloonService, args: dict[str, Any]) -> dict:
    if set(args) != {"value"}:
        raise CommandError(f"balloon takes exactly one argument 'value', got {sorted(args)}")
    service.set_target(args["value"])
    return {}


def _command_query_balloon(service: BalloonService, args: dict[str, Any]) -> dict:
    if args:
        raise CommandError(f"query-balloon takes no arguments, got {sorted(args)}")
    return service.query()


def _command_set_huge_policy(service: BalloonService, args: dict[str, Any]) -> dict:
    allowed = {"policy", "flush-bytes", "flush-after"}
    if "policy" not in args or set(args) - allowed:
        raise CommandError(f"set-huge-policy takes 'policy' and optionally 'flush-bytes', 'flush-after'; got {sorted(args)}")
    flush_bytes = args.get("flush-bytes")
    flush_after = args.get("flush-after")
    if flush_bytes is not None and (not isinstance(flush_bytes, int) or isinstance(flush_bytes, bool)):
        raise CommandError(f"'flush-bytes' must be a whole number of bytes, got {flush_bytes!r}")
    if flush_after is not None and (
        not isinstance(flush_after, (int, float)) or isinstance(flush_after, bool) or not math.isfinite(flush_after)
    ):
        raise CommandError(f"'flush-after' must be a number of seconds, got {flush_after!r}")
    policy = service.set_huge_policy(args["policy"], flush_bytes, flush_after)
    return {"huge-page-policy": policy.mode.value, "flush-bytes": policy.flush_bytes, "flush-after": policy.flush_after}


def _command_query_stats(service: BalloonService, args: dict[str, Any]) -> dict:
    if args:
        raise CommandError(f"query-stats takes no arguments, got {sorted(args)}")
    return service.query_stats()


def _command_set_stats_interval(service: BalloonService, args: dict[str, Any]) -> dict:
    if set(args) != {"interval"}:
        raise CommandError(f"set-stats-interval takes exactly one argument 'interval' (seconds, 0: off), got {sorted(args)}")
    return {"stats-interval": service.set_stats_interval(args["interval"])}


def _command_capabilities(service: BalloonService, args: dict[str, Any]) -> dict:
    return {}  # accepted for QMP clients' sake; there is no capability negotiation


COMMANDS = {
    "balloon": _command_balloon,
    "query-balloon": _command_query_balloon,
    "set-huge-policy": _command_set_huge_policy,
    "query-stats": _command_query_stats,
    "set-stats-interval": _command_set_stats_interval,
    "qmp_capabilities": _command_capabilities,
}


def execute_line(service: BalloonService, line: bytes) -> dict:
    """One request line -> one reply object (never raises for bad input)."""
    request_id = None
    try:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            # ValueError covers JSONDecodeError and integers over Python's digit
            # limit; RecursionError, JSON nested deeper than the parser goes.
            raise CommandError(f"not a JSON object: {type(exc).__name__}: {str(exc)[:200]}") from None
        if not isinstance(request, dict):
            raise CommandError(f"expected a JSON object, got {type(request).__name__}")
        request_id = request.get("id")
        name = request.get("execute")
        if not isinstance(name, str):
            raise CommandError("missing 'execute' (a command name)")
        handler = COMMANDS.get(name)
        if handler is None:
            raise CommandError(f"unknown command {name!r} (known: {', '.join(sorted(COMMANDS))})", "CommandNotFound")
        args = request.get("arguments", {})
        if not isinstance(args, dict):
            raise CommandError("'arguments' must be a JSON object")
        reply: dict[str, Any] = {"return": handler(service, args)}
    except CommandError as exc:
        reply = {"error": {"class": exc.qmp_class, "desc": exc.desc}}
    if request_id is not None:
        reply["id"] = request_id
    return reply


# A client that went away mid-write or stopped reading: its problem, not the daemon's.
_CLIENT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError)


class _Client:
    def __init__(self, stream: trio.SocketStream, service: BalloonService) -> None:
        self.stream = stream
        self.service = service
        self.send_lock = trio.Lock()

    async def send(self, obj: dict) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        async with self.send_lock:
            with trio.fail_after(SEND_TIMEOUT):
                await self.stream.send_all(data)

    async def forward_events(self, receive: trio.MemoryReceiveChannel, done: trio.CancelScope) -> None:
        try:
            async for event in receive:
                await self.send(event)
        except _CLIENT_GONE as exc:
            log.info("control client gone while sending an event", reason=type(exc).__name__)
        done.cancel()  # the service dropped us (backlog full) or the client left

    async def serve(self) -> None:
        """Never raises for anything the client does; each task ends the
        other, so no error can leave this nursery as an exception group."""
        send_channel, receive = self.service.subscribe()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.forward_events, receive, nursery.cancel_scope)
                try:
                    await self.read_commands()
                except _CLIENT_GONE as exc:
                    log.info("control client dropped", reason=type(exc).__name__)
                nursery.cancel_scope.cancel()
        finally:
            self.service.unsubscribe(send_channel)

    async def read_commands(self) -> None:
        buffer = bytearray()
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return
            buffer += data
            while (newline := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:newline]).strip()
                del buffer[: newline + 1]
                if line:
                    await self.send(execute_line(self.service, line))
            if len(buffer) > MAX_LINE:
                await self.send({"error": {"class": "GenericError", "desc": f"line longer than {MAX_LINE} bytes"}})
                return


async def serve_control(listener: trio.SocketListener, service: BalloonService) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _Client(stream, service).serve()
        except Exception:  # one client's trouble must never stop the daemon
            log.exception("control client failed")
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, [listener])
