"""``vhostballoon-policy``: move memory between the VMs of one host.

    vhostballoon-policy run --sockets '/run/vhostballoon/*/vb.sock.ctl' --budget 48G \\
        --floor vm1=2G --ceiling vm1=8G [--dry-run] [--metrics-address 127.0.0.1:9102]
    vhostballoon-policy status --sockets '/run/vhostballoon/*/vb.sock.ctl' [--json]

Every ``--interval`` seconds: read /proc/meminfo, /proc/pressure/memory and
each back-end's query-balloon, decide (``policy.core``, the README's rules),
log every decision with its reasons, and set the changed targets (not with
``--dry-run``, which prints what it would do).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import structlog

from ..logs import configure_logging
from ..sizes import format_size, parse_size
from .core import Plan, Policy, PolicyConfig
from .driver import apply, discover, read_guest, read_host

DESCRIPTION = """\
Drive every vhostballoon back-end on this host from the guests' statistics
and the host's memory pressure: shrink guests with memory to spare when the
host runs short (MemAvailable, memory PSI) or the sum of targets exceeds
--budget, give memory back to guests that show pressure, never under a VM's
floor, never more than --step per cycle. The rules are in the README
('Host policy')."""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _per_vm(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=SIZE, e.g. vm1=2G")
    return name, _size(size)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
        return value
    return parse


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a share in [0, 1), e.g. 0.2")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostballoon-policy", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="apply the policy every --interval seconds (or print it: --dry-run)")
    status = sub.add_parser("status", help="one look: each VM's figures, bounds and what the policy would do now")
    for q in (run, status):
        q.add_argument("--sockets", nargs="+", required=True, metavar="GLOB",
                       help="control sockets: globs, paths or NAME=PATH (e.g. '/run/vhostballoon/*/vb.sock.ctl'); "
                       "a VM is named by its socket's directory (…/NAME/vb.sock.ctl) or file (NAME.sock.ctl)")
        q.add_argument("--budget", type=_size, metavar="SIZE", help="the most all guest targets may add up to (e.g. 48G)")
        q.add_argument("--floor", type=_per_vm, action="append", default=[], metavar="NAME=SIZE",
                       help="a VM's floor: its target is never set lower")
        q.add_argument("--ceiling", type=_per_vm, action="append", default=[], metavar="NAME=SIZE",
                       help="a VM's ceiling: its target is never set higher (default: its RAM)")
        q.add_argument("--default-floor", type=_size, default="256M", metavar="SIZE", help="floor of VMs not named by --floor (default 256M)")
        q.add_argument("--step", type=_size, default="128M", metavar="SIZE", help="the most a target moves per cycle (default 128M)")
        q.add_argument("--min-step", type=_size, default="8M", metavar="SIZE", help="smaller moves are not made (default 8M)")
        q.add_argument("--keep-free", type=_share, default=0.2, metavar="SHARE",
                       help="a guest keeps this share of its memory available (default 0.2)")
        q.add_argument("--keep-free-min", type=_size, default="128M", metavar="SIZE", help="and at least this much (default 128M)")
        q.add_argument("--hysteresis", type=float, default=0.5, metavar="X",
                       help="shrink a guest only while available > keep x (1 + X) (default 0.5)")
        q.add_argument("--host-low", type=_share, default=0.10, metavar="SHARE",
                       help="host reclaim starts when MemAvailable < SHARE x MemTotal (default 0.10)")
        q.add_argument("--host-high", type=_share, default=0.20, metavar="SHARE",
                       help="and ends when MemAvailable > SHARE x MemTotal (default 0.20)")
        q.add_argument("--psi-high", type=float, default=10.0, metavar="PCT",
                       help="reclaim also starts when memory PSI 'some avg10' exceeds PCT (default 10)")
        q.add_argument("--psi-low", type=float, default=2.0, metavar="PCT", help="and ends only under PCT (default 2)")
        q.add_argument("--cooldown", type=int, default=3, metavar="CYCLES", help="cycles after a grow without a shrink (default 3)")
        q.add_argument("--meminfo", default="/proc/meminfo", help=argparse.SUPPRESS)
        q.add_argument("--psi", default="/proc/pressure/memory", help=argparse.SUPPRESS)
    run.add_argument("--interval", type=_positive(float), default=5.0, metavar="SECONDS", help="seconds between cycles (default 5)")
    run.add_argument("--cycles", type=_positive(int), metavar="N", help="stop after N cycles (default: run until SIGTERM/SIGINT)")
    run.add_argument("--dry-run", action="store_true", help="decide and print, set nothing")
    run.add_argument("--metrics-address", metavar="HOST:PORT", help="serve the policy's own metrics at /metrics (default: off)")
    run.add_argument("--log-format", choices=["console", "json"], default="json", help="decision logs (default: json)")
    status.add_argument("--json", action="store_true", help="everything as JSON")
    return p


def config_from(args: argparse.Namespace) -> PolicyConfig:
    return PolicyConfig(
        step=args.step, min_step=args.min_step, keep_free_share=args.keep_free, keep_free_min=args.keep_free_min,
        hysteresis=args.hysteresis, default_floor=args.default_floor, host_low_share=args.host_low,
        host_high_share=args.host_high, psi_high=args.psi_high, psi_low=args.psi_low, budget=args.budget,
        cooldown=args.cooldown,
    )


class PolicyMetrics:
    """The policy's own figures, with prometheus_client's standard types."""

    def __init__(self, address: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        from ..server.metrics import parse_address

        host, port = parse_address(address)
        self.registry = CollectorRegistry()
        r = self.registry
        self.cycles = Counter("vhostballoon_policy_cycles", "policy cycles run", registry=r)
        self.changes = Counter("vhostballoon_policy_target_changes", "targets changed (or, dry-run, that would be)",
                               ["vm", "rule"], registry=r)
        self.target = Gauge("vhostballoon_policy_target_bytes", "the target the policy decided", ["vm"], registry=r)
        self.actual = Gauge("vhostballoon_policy_guest_actual_bytes", "the guest's size as last read", ["vm"], registry=r)
        self.floor = Gauge("vhostballoon_policy_floor_bytes", "the VM's floor", ["vm"], registry=r)
        self.host_available = Gauge("vhostballoon_policy_host_available_bytes", "host MemAvailable", registry=r)
        self.psi = Gauge("vhostballoon_policy_host_memory_pressure_some_avg10", "host memory PSI 'some avg10' (%)", registry=r)
        self.reclaim = Gauge("vhostballoon_policy_host_reclaim", "1 while the host is in reclaim", registry=r)
        self.total = Gauge("vhostballoon_policy_total_target_bytes", "sum of the connected guests' targets", registry=r)
        self.budget = Gauge("vhostballoon_policy_budget_bytes", "the budget (absent: none)", registry=r)
        self.vms = Gauge("vhostballoon_policy_vms", "back-ends found, by state", ["state"], registry=r)
        self.server, self.thread = start_http_server(port, addr=host, registry=r)
        self.port = self.server.server_address[1]


def _log_plan(log, plan: Plan, host, dry_run: bool) -> None:
    for d in plan.decisions:
        log.info("decision", vm=d.name, rule=d.rule, old_target=d.old_target, new_target=d.new_target,
                 change=(d.new_target - d.old_target) if d.changed and d.old_target is not None else 0,
                 reasons=d.reasons, dry_run=dry_run)
    log.info("cycle", reclaim=plan.reclaim, host_reasons=plan.host_reasons, mem_available=host.mem_available,
             psi_some_avg10=host.psi_some_avg10, total_target=plan.total_target, dry_run=dry_run)


def one_cycle(policy: Policy, args, backends) -> tuple[Plan, object, dict]:
    floors, ceilings = dict(args.floor), dict(args.ceiling)
    guests, unreachable = [], {}
    for b in backends:
        figures, why = read_guest(b, floors.get(b.name), ceilings.get(b.name))
        guests.append(figures)
        if why:
            unreachable[b.name] = why
    host = read_host(args.meminfo, args.psi)
    return policy.decide(host, guests), host, {"guests": guests, "unreachable": unreachable}


def run(args) -> int:
    configure_logging(args.log_format, "info", stream=sys.stdout)
    log = structlog.get_logger("vhostballoon.policy")
    policy = Policy(config_from(args))
    metrics = PolicyMetrics(args.metrics_address) if args.metrics_address else None
    if metrics:
        log.info("metrics listening", address=f"{args.metrics_address.rpartition(':')[0]}:{metrics.port}")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    cycles = 0
    try:
        while not stop:
            backends = discover(args.sockets)
            by_name = {b.name: b for b in backends}
            plan, host, seen = one_cycle(policy, args, backends)
            for name, why in seen["unreachable"].items():
                log.warning("back-end unreachable", vm=name, reason=why)
            _log_plan(log, plan, host, args.dry_run)
            failures = {} if args.dry_run else apply(plan, by_name)
            for name, why in failures.items():
                log.error("could not set the target", vm=name, reason=why)
            if metrics:
                metrics.cycles.inc()
                metrics.host_available.set(host.mem_available)
                metrics.psi.set(host.psi_some_avg10 or 0)
                metrics.reclaim.set(1 if plan.reclaim else 0)
                metrics.total.set(plan.total_target)
                if args.budget:
                    metrics.budget.set(args.budget)
                metrics.vms.labels("connected").set(sum(1 for g in seen["guests"] if g.connected))
                metrics.vms.labels("disconnected").set(sum(1 for g in seen["guests"] if not g.connected))
                for g in seen["guests"]:
                    if g.connected:
                        metrics.actual.labels(g.name).set(g.actual)
                        metrics.floor.labels(g.name).set(min(dict(args.floor).get(g.name, args.default_floor), g.ram))
                for d in plan.decisions:
                    if d.new_target is not None:
                        metrics.target.labels(d.name).set(d.new_target)
                    if d.changed:
                        metrics.changes.labels(d.name, d.rule).inc()
            cycles += 1
            if args.cycles and cycles >= args.cycles:
                break
            deadline = time.monotonic() + args.interval
            while not stop and time.monotonic() < deadline:
                time.sleep(min(0.1, args.interval))
    except KeyboardInterrupt:
        pass
    finally:
        if metrics:
            metrics.server.shutdown()
    return 0


def status(args) -> int:
    policy = Policy(config_from(args))
    backends = discover(args.sockets)
    plan, host, seen = one_cycle(policy, args, backends)
    guests = {g.name: g for g in seen["guests"]}
    if args.json:
        print(json.dumps({
            "host": {"mem-total": host.mem_total, "mem-available": host.mem_available, "psi-some-avg10": host.psi_some_avg10,
                     "reclaim": plan.reclaim, "reasons": plan.host_reasons},
            "budget": args.budget, "total-target": plan.total_target,
            "vms": [{"name": d.name, "connected": guests[d.name].connected, "actual": guests[d.name].actual,
                     "ram": guests[d.name].ram, "available": guests[d.name].available, "target": d.old_target,
                     "would-set": d.new_target, "rule": d.rule, "reasons": d.reasons,
                     "unreachable": seen["unreachable"].get(d.name)} for d in plan.decisions],
        }, indent=2))
        return 0
    print(f"host: MemAvailable {format_size(host.mem_available)} of {format_size(host.mem_total)}, "
          f"memory PSI some avg10 {host.psi_some_avg10 if host.psi_some_avg10 is not None else '-'}"
          f"{', in reclaim' if plan.reclaim else ''}; budget {format_size(args.budget) if args.budget else 'none'}, "
          f"targets {format_size(plan.total_target)}")
    header = f"{'vm':<16} {'ram':>10} {'actual':>10} {'available':>10} {'target':>10} {'would set':>10}  rule: reasons"
    print(header)
    for d in plan.decisions:
        g = guests[d.name]
        if not g.connected:
            print(f"{d.name:<16} {'-':>10} {'-':>10} {'-':>10} {format_size(d.old_target):>10} {'-':>10}  "
                  f"{seen['unreachable'].get(d.name) or 'no guest connected'}")
            continue
        print(f"{d.name:<16} {format_size(g.ram):>10} {format_size(g.actual):>10} {format_size(g.available):>10} "
              f"{format_size(d.old_target):>10} {format_size(d.new_target) if d.changed else '=':>10}  "
              f"{d.rule}: {'; '.join(d.reasons)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        config_from(args)
        backends = discover(args.sockets)
    except ValueError as exc:
        p.error(str(exc))
    if not backends:
        print(f"vhostballoon-policy: no control socket matches {' '.join(args.sockets)}", file=sys.stderr)
        if args.command == "status":
            return 1
    try:
        return run(args) if args.command == "run" else status(args)
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
