"""``vhostballoon-ctl``: talk to a running back-end's control socket.

    vhostballoon-ctl --socket-path /run/vb.sock balloon 512M --wait
    vhostballoon-ctl --socket-path /run/vb.sock query
    vhostballoon-ctl --socket-path /run/vb.sock huge-policy whole
    vhostballoon-ctl --socket-path /run/vb.sock stats
    vhostballoon-ctl --socket-path /run/vb.sock stats-interval 2
    vhostballoon-ctl --control-socket /run/vb.sock.ctl raw '{"execute": "query-balloon"}'
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from .sizes import format_size, parse_size


class ControlError(Exception):
    pass


class ControlClient:
    """A blocking client: one request, one reply; events are kept aside."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"cannot connect to the control socket {path}: {exc.strerror or exc}") from exc
        self.reader = self.sock.makefile("rb")
        self.events: list[dict] = []

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def execute(self, command: str, **arguments) -> dict:
        request: dict = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall((json.dumps(request) + "\n").encode())
        while True:
            line = self.reader.readline()
            if not line:
                raise ControlError("the back-end closed the control connection")
            reply = json.loads(line)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise ControlError(reply["error"].get("desc", str(reply["error"])))
            return reply["return"]


def _control_path(args) -> str:
    if args.control_socket:
        return args.control_socket
    if args.socket_path:
        return args.socket_path + ".ctl"
    raise SystemExit("vhostballoon-ctl: give --socket-path PATH (the back-end's) or --control-socket PATH")


def _print_query(info: dict) -> None:
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = value
        if isinstance(value, int) and not isinstance(value, bool) and ("bytes" in key or key in ("actual", "target")):
            shown = f"{value} ({format_size(value)})"
        print(f"{key:<{width}}  {shown}")


def _print_stats(info: dict) -> None:
    stats = info.get("stats") or {}
    if not stats:
        why = "no front-end is connected" if not info.get("connected") else "the guest has sent none yet"
        print(f"no statistics: {why} (statistics queue negotiated: {info.get('negotiated')})")
    width = max([len(k) for k in stats] + [len("age-seconds")])
    for key, value in stats.items():
        shown = f"{value} ({format_size(value)})" if key.endswith(("-memory", "-caches", "swap-in", "swap-out")) else value
        print(f"{key:<{width}}  {shown}")
    for key in ("age-seconds", "stats-interval", "updates"):
        print(f"{key:<{width}}  {info.get(key)}")


def wait_for_target(client: ControlClient, target: int, timeout: float, interval: float = 0.25) -> int:
    """Show progress until the guest reaches the target; say why not otherwise."""
    last_actual = None
    last_progress = time.monotonic()
    while True:
        info = client.execute("query-balloon")
        if not info.get("connected"):
            print("no front-end is connected: the target is kept and applied when a guest connects", file=sys.stderr)
            return 2
        ram = info.get("guest-ram-bytes") or 0
        goal = min(target, ram) if ram else target
        actual = info.get("actual")
        if actual is not None and actual != last_actual:
            last_actual = actual
            last_progress = time.monotonic()
            freed = info.get("freed-bytes-measured", 0)
            print(f"guest {format_size(actual):>10}  target {format_size(goal):>10}  host memory freed {format_size(freed)}", flush=True)
        # The guest works in 4 KiB pages: the target is reached to the page.
        if actual is not None and abs(actual - goal) < 4096:
            print(f"reached: guest has {format_size(actual)} ({actual} bytes)")
            return 0
        if time.monotonic() - last_progress > timeout:
            print(
                f"no progress for {timeout:.0f} s: guest at {format_size(actual)}, target {format_size(goal)}; "
                "the guest driver may be unable to give (or take back) more memory, or is not running",
                file=sys.stderr,
            )
            return 1
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vhostballoon-ctl", description="Control a running vhostballoon back-end.")
    p.add_argument("--socket-path", metavar="PATH", help="the back-end's vhost-user socket (control socket is PATH.ctl)")
    p.add_argument("--control-socket", metavar="PATH", help="the control socket itself")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("balloon", help="set the guest's target memory size (like QMP balloon)")
    b.add_argument("size", help="target guest memory: 512M, 2G, or bytes")
    b.add_argument("--wait", action="store_true", help="show progress until the guest reaches the target")
    b.add_argument("--timeout", type=float, default=30.0, help="with --wait: give up after this many seconds without progress")
    sub.add_parser("query", help="show the balloon's figures (query-balloon)")
    h = sub.add_parser("huge-policy", help="set how partly ballooned huge pages are freed (auto, whole, eager)")
    h.add_argument("policy", choices=["auto", "whole", "eager"])
    h.add_argument("--flush-bytes", metavar="SIZE", help="auto: flush once this much is pending (e.g. 64M)")
    h.add_argument("--flush-after", type=float, metavar="SECONDS", help="auto: flush pages pending this long")
    sub.add_parser("stats", help="show the guest's latest memory statistics (query-stats)")
    si = sub.add_parser("stats-interval", help="how often to ask the guest for fresh statistics (seconds; 0: never)")
    si.add_argument("seconds", type=float)
    sub.add_parser("watch", help="print events (BALLOON_CHANGE) as they come")
    r = sub.add_parser("raw", help="send one JSON command line, print the reply")
    r.add_argument("json")
    args = p.parse_args(argv)
    try:
        client = ControlClient(_control_path(args))
    except ControlError as exc:
        print(f"vhostballoon-ctl: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "balloon":
            try:
                target = parse_size(args.size)
            except ValueError as exc:
                p.error(str(exc))
            client.execute("balloon", value=target)
            print(f"target set: {format_size(target)} ({target} bytes)")
            return wait_for_target(client, target, args.timeout) if args.wait else 0
        if args.command == "huge-policy":
            options = {"policy": args.policy}
            if args.flush_bytes is not None:
                try:
                    options["flush-bytes"] = parse_size(args.flush_bytes)
                except ValueError as exc:
                    p.error(str(exc))
            if args.flush_after is not None:
                options["flush-after"] = args.flush_after
            _print_query(client.execute("set-huge-policy", **options))
            return 0
        if args.command == "stats":
            _print_stats(client.execute("query-stats"))
            return 0
        if args.command == "stats-interval":
            _print_query(client.execute("set-stats-interval", interval=args.seconds))
            return 0
        if args.command == "query":
            _print_query(client.execute("query-balloon"))
            return 0
        if args.command == "watch":
            client.sock.settimeout(None)
            for line in client.reader:
                print(line.decode().rstrip(), flush=True)
            return 0
        if args.command == "raw":
            client.sock.sendall(args.json.encode().rstrip(b"\n") + b"\n")
            print(client.reader.readline().decode().rstrip())
            return 0
    except ControlError as exc:
        print(f"vhostballoon-ctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
