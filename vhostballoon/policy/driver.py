"""The policy's I/O: find the back-ends, read their figures and the host's,
apply a plan. The rules themselves are in ``policy.core`` (no I/O)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from ..ctl import ControlClient, ControlError
from .core import GuestFigures, HostFigures, Plan


@dataclass(frozen=True)
class Backend:
    name: str
    control_path: str


def vm_name(control_path: str) -> str:
    """``/run/vhostballoon/vm1/vb.sock.ctl`` -> ``vm1``; ``/x/vm2.sock.ctl`` -> ``vm2``."""
    base = os.path.basename(control_path)
    stem = base.removesuffix(".ctl").removesuffix(".sock")
    if stem in ("vb", "vhostballoon", "balloon"):
        return os.path.basename(os.path.dirname(control_path)) or stem
    return stem


def discover(patterns: list[str]) -> list[Backend]:
    """Every control socket the patterns name (globs, paths, or NAME=PATH), by name;
    two sockets with one name is an error."""
    found: dict[str, Backend] = {}
    for pattern in patterns:
        name = None
        if "=" in pattern and not pattern.startswith("/") and "/" not in pattern.split("=", 1)[0]:
            name, pattern = pattern.split("=", 1)
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for path in paths:
            backend = Backend(name or vm_name(path), path)
            other = found.get(backend.name)
            if other is not None and other.control_path != path:
                raise ValueError(f"two control sockets for VM {backend.name!r}: {other.control_path} and {path} "
                                 "(name them: NAME=PATH)")
            found[backend.name] = backend
    return sorted(found.values(), key=lambda b: b.name)


def read_host(meminfo: str = "/proc/meminfo", psi: str = "/proc/pressure/memory") -> HostFigures:
    fields = {}
    with open(meminfo) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    for key in ("MemTotal", "MemAvailable"):
        if key not in fields:
            raise ValueError(f"{meminfo}: no {key} line")
    some = None
    try:
        with open(psi) as f:
            for line in f:
                if line.startswith("some "):
                    some = float(dict(kv.split("=") for kv in line.split()[1:])["avg10"])
    except FileNotFoundError:
        pass  # a kernel without PSI: MemAvailable alone
    return HostFigures(fields["MemTotal"], fields["MemAvailable"], some)


def guest_figures(name: str, info: dict, floor: int | None = None, ceiling: int | None = None) -> GuestFigures:
    """query-balloon's reply as the policy sees it."""
    guest = info.get("guest-stats") or {}
    stats = guest.get("stats") or {}
    available = stats.get("stat-available-memory")
    if available is None and "stat-free-memory" in stats:
        available = stats["stat-free-memory"] + stats.get("stat-disk-caches", 0)
    return GuestFigures(
        name=name,
        connected=bool(info.get("connected")) and info.get("actual") is not None,
        ram=info.get("guest-ram-bytes") or 0,
        actual=info.get("actual") or 0,
        target=info.get("target"),
        available=available,
        stats_age=guest.get("age-seconds"),
        swap_in=stats.get("stat-swap-in"),
        major_faults=stats.get("stat-major-faults"),
        oom_kills=stats.get("stat-oom-kills"),
        alloc_stalls=stats.get("stat-alloc-stalls"),
        floor=floor,
        ceiling=ceiling,
    )


def read_guest(backend: Backend, floor: int | None, ceiling: int | None, timeout: float = 5.0) -> tuple[GuestFigures, str | None]:
    """The guest's figures, or a disconnected stand-in and why."""
    try:
        client = ControlClient(backend.control_path, timeout=timeout)
    except ControlError as exc:
        return GuestFigures(backend.name, connected=False), str(exc)
    try:
        return guest_figures(backend.name, client.execute("query-balloon"), floor, ceiling), None
    except (ControlError, OSError, ValueError) as exc:
        return GuestFigures(backend.name, connected=False), f"query-balloon failed: {exc}"
    finally:
        client.close()


def apply(plan: Plan, backends: dict[str, Backend], timeout: float = 5.0) -> dict[str, str]:
    """Send every changed target; returns the failures by VM name."""
    failures = {}
    for decision in plan.decisions:
        if not decision.changed:
            continue
        try:
            client = ControlClient(backends[decision.name].control_path, timeout=timeout)
            try:
                client.execute("balloon", value=decision.new_target)
            finally:
                client.close()
        except (ControlError, OSError) as exc:
            failures[decision.name] = str(exc)
    return failures
