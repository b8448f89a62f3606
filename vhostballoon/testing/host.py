"""The host kernel's own figures and knobs, for tests, benchmarks and fault
scripts: /proc/meminfo, /proc/vmstat, and shmem THP switched for a while."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from ..device.hugepages import THP_SYSFS, pmd_size, sysfs_choice

__all__ = ["meminfo", "vmstat", "shmem_thp", "sysfs_choice", "THP_SYSFS"]


def meminfo(key: str) -> int:
    """A /proc/meminfo figure: bytes for kB lines, a count for HugePages_*."""
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            if name == key:
                parts = value.split()
                return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    raise KeyError(key)


def vmstat(key: str) -> int:
    """A /proc/vmstat counter (e.g. thp_split_page)."""
    with open("/proc/vmstat") as f:
        for line in f:
            name, value = line.split()
            if name == key:
                return int(value)
    raise KeyError(key)


@contextmanager
def shmem_thp(value: str) -> Iterator[None]:
    """Set shmem THP (the top-level knob, and the PMD size's own knob on
    "inherit") to ``value``; what was there before comes back afterwards.
    Raises PermissionError where sysfs is not writable."""
    top = os.path.join(THP_SYSFS, "shmem_enabled")
    per_size = os.path.join(THP_SYSFS, f"hugepages-{pmd_size() >> 10}kB", "shmem_enabled")
    wanted = [(top, value)] + ([(per_size, "inherit")] if os.path.exists(per_size) else [])
    saved = []
    try:
        for path, setting in wanted:
            old = sysfs_choice(path)
            saved.append((path, old))
            if old != setting:
                with open(path, "w") as f:
                    f.write(setting)
        yield
    finally:
        for path, old in reversed(saved):
            if old is not None:
                with open(path, "w") as f:
                    f.write(old)
