"""``vhostballoon-ctl``: talk to a running back-end's control socket.

    vhostballoon-ctl --socket-path /run/vb.sock balloon 512M --wait
    vhostballoon-ctl --socket-path /run/vb.sock query            # a short summary
    vhostballoon-ctl --socket-path /run/vb.sock query --json     # every figure, as JSON
    vhostballoon-ctl --socket-path /run/vb.sock huge-policy whole
    vhostballoon-ctl --socket-path /run/vb.sock stats
    vhostballoon-ctl --socket-path /run/vb.sock stats-interval 2
    vhostballoon-ctl --control-socket /run/vb.sock.ctl raw '{"execute": "query-balloon"}'
"""

from __future__ import annotations

import argparse
import json
import os
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


def _summary_lines(info: dict) -> list[tuple[str, str]]:
    """The figures an operator looks at first, as (label, text) rows."""

    def size(value) -> str:
        return format_size(value) if isinstance(value, int) and not isinstance(value, bool) else "-"

    rows: list[tuple[str, str]] = []
    if not info.get("connected"):
        rows.append(("guest", "no front-end connected"))
        rows.append(("target", size(info.get("target")) if info.get("target") is not None else "none set"))
        return rows
    ram = info.get("guest-ram-bytes")
    rows.append(("guest size", f"{size(info.get('actual'))} of {size(ram)} RAM"))
    target = info.get("target")
    rows.append(("target", size(target) if target is not None else "none set (the guest keeps all its RAM)"))
    rows.append(("in the balloon", size(info.get("ballooned-bytes"))))
    rows.append(("host memory freed", f"{size(info.get('freed-bytes-measured'))} (measured)"))
    rows.append(("pending", size(info.get("pending-bytes"))))
    # negotiated balloon features first, by their virtio names; ring features after
    names = info.get("features") or []
    balloon = [n.split(":", 1)[1] for n in names if n.startswith("balloon:")]
    other = [n.split(":", 1)[-1] for n in names if not n.startswith("balloon:")]
    rows.append(("features", " ".join(balloon + other) or "none negotiated yet"))
    guest = info.get("guest-stats") or {}
    stats = guest.get("stats") or {}
    if "stat-free-memory" in stats:
        age = guest.get("age-seconds")
        free = f"{size(stats['stat-free-memory'])}"
        if "stat-available-memory" in stats:
            free += f", available {size(stats['stat-available-memory'])}"
        free += f" ({age:.1f} s ago)" if isinstance(age, (int, float)) else ""
        rows.append(("guest free memory", free))
    else:
        rows.append(("guest free memory", "no statistics from the guest yet"))
    return rows


def _print_summary(info: dict) -> None:
    rows = _summary_lines(info)
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"{label:<{width}}  {text}")


def wait_for_target(client: ControlClient, target: int, timeout: float, interval: float = 0.25,
                    start: int | None = None) -> int:
    """A progress bar (bytes moved, rate, time left) until the guest reaches
    the target; say why not otherwise. ``start``: the guest's size before the
    target was set. The bar goes to stderr, the outcome to stdout."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    info = client.execute("query-balloon")
    if not info.get("connected"):
        print("no front-end is connected: the target is kept and applied when a guest connects", file=sys.stderr)
        return 2
    ram = info.get("guest-ram-bytes") or 0
    goal = min(target, ram) if ram else target
    if start is None:
        start = info.get("actual") or 0
    total = max(abs(start - goal), 1)
    verb = "inflating" if goal < start else "deflating"
    began = last_progress = time.monotonic()
    last_actual = start
    progress = Progress(
        TextColumn(f"{verb} {format_size(start)} -> {format_size(goal)}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=Console(stderr=True),
    )

    def show(moved: int) -> None:
        elapsed = max(time.monotonic() - began, 1e-6)
        rate = moved / elapsed
        left = total - moved
        eta = "0 s" if left <= 0 else (f"{left / rate:.1f} s" if rate > 0 else "?")
        progress.update(task, completed=moved, rate=f"{format_size(int(rate))}/s", eta=eta)

    with progress:
        task = progress.add_task("balloon", total=total, rate="-", eta="?")
        while True:
            actual = info.get("actual")
            if actual is not None:
                # bytes moved toward the goal (none if the guest went the other way)
                moved = min(abs(start - actual), total) if (goal - start) * (actual - start) >= 0 else 0
                show(moved)
                if actual != last_actual:
                    last_actual = actual
                    last_progress = time.monotonic()
            # The guest works in 4 KiB pages: the target is reached to the page.
            if actual is not None and abs(actual - goal) < 4096:
                show(total)
                break
            if time.monotonic() - last_progress > timeout:
                progress.stop()
                print(
                    f"no progress for {timeout:.0f} s: guest at {format_size(actual)}, target {format_size(goal)}; "
                    "the guest driver may be unable to give (or take back) more memory, or is not running",
                    file=sys.stderr,
                )
                return 1
            time.sleep(interval)
            info = client.execute("query-balloon")
            if not info.get("connected"):
                progress.stop()
                print("the front-end went away before the guest reached the target (the target is kept)", file=sys.stderr)
                return 2
    freed = info.get("freed-bytes-measured", 0)
    took = time.monotonic() - began
    print(f"reached: guest has {format_size(actual)} ({actual} bytes); host memory freed {format_size(freed)}; took {took:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # Our reader (``| head``) left: not an error of ours. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell shows for a writer killed by it


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vhostballoon-ctl", description="Control a running vhostballoon back-end.")
    p.add_argument("--socket-path", metavar="PATH", help="the back-end's vhost-user socket (control socket is PATH.ctl)")
    p.add_argument("--control-socket", metavar="PATH", help="the control socket itself")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("balloon", help="set the guest's target memory size (like QMP balloon)")
    b.add_argument("size", help="target guest memory: 512M, 2G, or bytes")
    b.add_argument("--wait", action="store_true", help="show a progress bar (bytes moved, rate, time left) until the guest reaches the target")
    b.add_argument("--timeout", type=float, default=30.0, help="with --wait: give up after this many seconds without progress")
    q = sub.add_parser("query", help="a short summary of the balloon (query-balloon); --json for every figure")
    q.add_argument("--json", action="store_true", help="print query-balloon's whole reply as JSON")
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
            before = client.execute("query-balloon").get("actual") if args.wait else None
            client.execute("balloon", value=target)
            print(f"target set: {format_size(target)} ({target} bytes)", flush=True)
            return wait_for_target(client, target, args.timeout, start=before) if args.wait else 0
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
            info = client.execute("query-balloon")
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_summary(info)
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
