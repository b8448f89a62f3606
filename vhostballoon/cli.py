"""``vhostballoon``: the daemon (QEMU's vhost-user back-end program conventions)
and ``vhostballoon demo``."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .device.features import FeatureSpecError, feature_names, parse_feature_spec
from .device.queues import queue_roles
from .device.stats import DEFAULT_STATS_INTERVAL
from .server.state import DEFAULT_SNAPSHOT_INTERVAL

DAEMON_DESCRIPTION = """\
A vhost-user virtio-balloon back-end. QEMU connects to --socket-path (or to the
listening socket passed with --fd) and carries the guest's balloon queues to
this process, which frees the ballooned guest pages on the host
(fallocate PUNCH_HOLE on the shared memfd behind guest RAM).

Set the guest's target memory over the control socket:
  vhostballoon-ctl --socket-path PATH balloon 512M --wait
  vhostballoon-ctl --socket-path PATH query

Try it without QEMU:  vhostballoon demo
"""

FEATURES_HELP = """which balloon features to offer the guest (default: all). Comma-separated,
applied left to right: 'all', 'none', NAME or +NAME (add), -NAME (remove); a
list that starts with a removal starts from 'all' (write --features=-NAME).
Names: must-tell-host; stats (statistics queue); oom (deflate-on-OOM: the
guest deflates by itself under memory pressure, and keeps ballooned pages in
its MemTotal); poison (page poisoning: reported pages are kept while the guest
poisons free pages; a guest that poisons turns reporting off without it);
reporting (free page reporting queue). Queues are packed: inflate, deflate,
then stats and reporting when offered, so QEMU's num_vqs must be at least
2 + stats + reporting (4 by default; 5 always works)."""



def capabilities() -> dict:
    """What --print-capabilities prints (vhost-user.rst, "Backend program
    conventions"; schema: QEMU docs/interop/vhost-user.json,
    VHostUserBackendCapabilities, where "balloon" has no feature list)."""
    return {"type": "balloon"}


def _feature_spec(value: str) -> int:
    try:
        return parse_feature_spec(value)
    except FeatureSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: give seconds >= 0 (0: off)")
    return seconds


def _daemon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostballoon",
        description=DAEMON_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Subcommand: 'vhostballoon demo --help'.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="create a unix socket at PATH and wait for QEMU on it")
    where.add_argument("--fd", type=int, metavar="N", help="use the already listening unix socket on file descriptor N")
    p.add_argument("--print-capabilities", action="store_true", help="print the back-end's capabilities as JSON and exit")
    p.add_argument(
        "--control-socket",
        metavar="PATH",
        help="where the JSON control socket listens (default: the socket path with '.ctl' appended)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the operator's target and the balloon's page state (ballooned pages, pending "
        "partial huge pages) are kept, so that a back-end killed and restarted while QEMU reconnects "
        "carries on (default: the socket path with '.state' appended; 'none' keeps nothing). "
        "README: 'Restarting the back-end' says what is and is not recovered",
    )
    p.add_argument(
        "--snapshot-interval",
        type=_seconds,
        default=DEFAULT_SNAPSHOT_INTERVAL,
        metavar="SECONDS",
        help=f"rewrite the page snapshot in --state-dir this often while the balloon changes "
        f"(default {DEFAULT_SNAPSHOT_INTERVAL:g}; changes in between are kept by a journal)",
    )
    p.add_argument(
        "--huge-policy",
        choices=["auto", "whole", "eager"],
        default="auto",
        help="partly ballooned huge pages: 'whole' frees only whole huge pages (never splits a THP); "
        "'eager' frees every ballooned page at once (splits THPs); 'auto' (default) frees whole huge pages "
        "at once and the rest when --flush-bytes are pending, after --flush-after seconds, or when the "
        "guest reaches its target. Settable at run time: vhostballoon-ctl huge-policy",
    )
    p.add_argument("--features", type=_feature_spec, default="all", metavar="LIST", help=FEATURES_HELP)
    p.add_argument(
        "--stats-interval",
        type=_seconds,
        default=DEFAULT_STATS_INTERVAL,
        metavar="SECONDS",
        help=f"ask the guest for fresh memory statistics this often; 0: never (default {DEFAULT_STATS_INTERVAL:g}). "
        "Settable at run time: vhostballoon-ctl stats-interval",
    )
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="once the sockets are bound, allow only the system calls the back-end needs (seccomp); "
        "any other kills the process. Uses pyseccomp (installed with vhostballoon) over the system's "
        "libseccomp.so.2 (Debian: libseccomp2)",
    )
    p.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off), e.g. 127.0.0.1:9101; "
        "bound before --sandbox applies. README: 'Metrics' lists every metric",
    )
    p.add_argument(
        "--name",
        metavar="VM",
        help="the VM's name: the 'vm' label of every metric (default: the socket path)",
    )
    p.add_argument("--flush-bytes", default="1G", metavar="SIZE", help="auto: pending partial bytes that trigger a flush (default 1G)")
    p.add_argument("--flush-after", type=float, default=5.0, metavar="SECONDS", help="auto: longest wait of a pending page (default 5)")
    p.add_argument("--log-format", choices=["console", "json"], default="console", help="log line format (default: console)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info", help="default: info")
    p.add_argument("--version", action="version", version=f"vhostballoon {__version__}")
    return p


def _demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostballoon demo",
        description="Run the back-end against the built-in front-end and model guest on a memfd "
        "'guest', balloon it to half and back, and show the host's own figures.",
    )
    p.add_argument("--size", default="1G", help="guest RAM size (default: 1G)")
    p.add_argument("--order", choices=["random", "linux", "sequential"], default="random", help="PFN order of the model guest")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from .demo import run_demo

        args = _demo_parser().parse_args(argv[1:])
        return run_demo(args)
    parser = _daemon_parser()
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(capabilities()))
        return 0
    if args.socket_path is None and args.fd is None:
        parser.error("one of --socket-path PATH or --fd N is required (or --print-capabilities)")
    if args.metrics_address is not None:
        from .server.metrics import parse_address

        try:
            parse_address(args.metrics_address)
        except ValueError as exc:
            parser.error(str(exc))
    return run_daemon(args)


def run_daemon(args: argparse.Namespace) -> int:
    import gc

    import structlog
    import trio

    from .logs import configure_logging
    from .server.daemon import StartupError, run_until_signalled
    from .server.service import BalloonService
    from .device.hugepages import FlushPolicy, HugePolicy
    from .server.state import StateStore
    from .sizes import parse_size

    configure_logging(args.log_format, args.log_level, final=True)
    log = structlog.get_logger("vhostballoon")
    state_dir = args.state_dir or (f"{args.socket_path}.state" if args.socket_path else None)
    state = StateStore(state_dir, snapshot_interval=args.snapshot_interval) if state_dir and state_dir != "none" else None
    try:
        flush_policy = FlushPolicy(HugePolicy(args.huge_policy), parse_size(args.flush_bytes), args.flush_after)
    except ValueError as exc:
        log.error("bad huge page options", error=str(exc))
        return 2
    features = args.features
    service = BalloonService(
        features=features, state=state, flush_policy=flush_policy, stats_interval=args.stats_interval
    )
    roles = [r.value for r in queue_roles(features)]
    log.info(
        "starting",
        version=__version__,
        features=feature_names(features),
        queues=dict(enumerate(roles)),
        min_num_vqs=len(roles),
        stats_interval=args.stats_interval,
    )
    # Everything imported and set up so far lives as long as the process: keep
    # it out of the cyclic collector's scans (they showed in the profile).
    gc.freeze()
    try:
        return trio.run(
            lambda: run_until_signalled(
                socket_path=args.socket_path,
                listen_fd=args.fd,
                control_path=args.control_socket,
                service=service,
                sandbox=args.sandbox,
                metrics_address=args.metrics_address,
                name=args.name,
            )
        )
    except (StartupError, ExceptionGroup) as exc:
        # run_until_signalled starts the back-end in a nursery, so trio
        # hands a start-up failure over wrapped in an ExceptionGroup.
        startup = exc if isinstance(exc, StartupError) else _sole(exc, StartupError)
        if startup is None:
            raise
        log.error("cannot start", error=str(startup))
        return 1


def _sole(group: BaseExceptionGroup, kind: type[BaseException]) -> BaseException | None:
    """The one exception of ``kind`` a (nested) group holds, if that is all it holds."""
    matched, rest = group.split(kind)
    if matched is None or rest is not None:
        return None
    leaves = list(_leaves(matched))
    return leaves[0] if len(leaves) == 1 else None


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


if __name__ == "__main__":
    sys.exit(main())
